"""Which ONNX Runtime execution providers serve a device: checked at build (refuse a device before any work)
and at load (the session's providers), so both stages agree. Imported by engines/ and runtime/ alike."""

from __future__ import annotations

from moetrt.errors import MoetrtError

DEVICES = ("cpu", "cuda")


def providers(device: str) -> list[str]:
    """Execution providers for `device`, checked against the installed onnxruntime wheel."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise MoetrtError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MoetrtError(
            "device 'cuda': this onnxruntime has no CUDAExecutionProvider; install the GPU wheel with "
            "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
