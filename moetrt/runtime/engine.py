"""Open whatever directory the user points at as a `Backend`: an engine directory (its `moetrt.json`
manifest names the backend that built it) or a Hugging Face checkpoint (run eagerly), so `generate` and
validation work the same on both.

The ONNX Runtime and TensorRT backends are imported only when an engine of theirs is opened: TensorRT (and
a GPU build of onnxruntime) may be missing where a user only runs the other. Likewise the eager model (and
torch) only for a checkpoint: an ONNX Runtime engine is served without torch in the process (mid preset:
~200 MB less peak RSS and ~3 s less start-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrt.artifacts import MANIFEST as MANIFEST_FILE
from moetrt.artifacts import read_manifest
from moetrt.errors import MoetrtError
from moetrt.runtime.backend import Backend

BACKENDS = ("ort", "trt")


def load_backend(
    path: str | Path,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> Backend:
    """Load an engine directory with the backend its manifest names, or a checkpoint directory (config.json,
    no moetrt.json) as an `EagerBackend`.

    For a checkpoint, max_batch defaults to 1, max_seq_len to the config's max_position_embeddings, dtype to
    the config's and device to "cpu". For an engine, max_batch (when given) goes to its loader, which
    defaults to the manifest's; its max_seq_len, precision and device were fixed when it was built, so
    passing any of those is refused rather than ignored.
    """
    path = Path(path)
    if not path.is_dir():
        raise MoetrtError(f"{path}: not a directory; expected an engine directory or a Hugging Face checkpoint")
    if (path / MANIFEST_FILE).is_file():
        fixed = {"max_seq_len": max_seq_len, "dtype": dtype, "device": device}
        given = [name for name, value in fixed.items() if value is not None]
        if given:
            raise MoetrtError(f"{path}: {', '.join(given)} apply to checkpoints; an engine fixes them when it is built")
        return _load_engine(path, read_manifest(path, "engine"), max_batch)
    if (path / "config.json").is_file():
        from moetrt.model.checkpoint import load_model
        from moetrt.runtime.eager_backend import EagerBackend

        model = load_model(path, dtype=dtype, device=device or "cpu")
        return EagerBackend(model, max_batch or 1, max_seq_len or model.config.max_position_embeddings)
    raise MoetrtError(
        f"{path}: neither an engine ({MANIFEST_FILE}) nor a Hugging Face checkpoint (config.json) directory"
    )


def _load_engine(path: Path, manifest: dict[str, Any], max_batch: int | None) -> Backend:
    options = {} if max_batch is None else {"max_batch": max_batch}
    backend = manifest.get("backend")
    if backend == "ort":
        from moetrt.runtime.ort_backend import OrtBackend

        return OrtBackend.load(path, **options)
    if backend == "trt":
        from moetrt.runtime.trt_backend import TrtBackend

        return TrtBackend.load(path, **options)
    raise MoetrtError(
        f"{path / MANIFEST_FILE}: field 'backend' is {backend!r} (kind {manifest.get('kind')!r}); "
        f"expected an engine directory built for one of {', '.join(BACKENDS)}"
    )
