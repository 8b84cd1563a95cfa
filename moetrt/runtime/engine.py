"""Open whatever directory the user points at as a `Backend`: an engine directory (its `moetrt.json`
manifest names the backend that built it) or a Hugging Face checkpoint (run eagerly), so `generate` and
validation work the same on both.

The ONNX Runtime and TensorRT backends are imported only when an engine of theirs is opened: TensorRT (and
a GPU build of onnxruntime) may be missing where a user only runs the other. Likewise the eager model (and
torch) only for a checkpoint: an ONNX Runtime engine is served without torch in the process (mid preset:
~200 MB less peak RSS and ~3 s less start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moetrt.artifacts import Artifact, open_artifact, verify_artifact
from moetrt.errors import MoetrtError
from moetrt.names import MANIFEST
from moetrt.registry import backend_entry
from moetrt.runtime.backend import Backend


def load_backend(
    path: str | Path,
    max_batch: int | None = None,
    threads: int | None = None,
    extra_outputs: Sequence[str] = (),
    max_seq_len: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    verify: bool = False,
) -> Backend:
    """Load an engine directory with the backend its manifest names (`moetrt.registry`), or a checkpoint
    directory (config.json, no moetrt.json) as an `EagerBackend`: `open_backend(open_artifact(path), ...)`."""
    return open_backend(open_artifact(path), max_batch, threads, extra_outputs, max_seq_len, dtype, device, verify)


def open_backend(
    artifact: Artifact,
    max_batch: int | None = None,
    threads: int | None = None,
    extra_outputs: Sequence[str] = (),
    max_seq_len: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    verify: bool = False,
) -> Backend:
    """The backend for an artifact opened by `moetrt.artifacts.open_artifact` (an engine or a checkpoint).

    max_batch (cache slots), threads and extra_outputs go to the backend's `load` (see `Backend.load`). For a
    checkpoint, max_batch defaults to 1, max_seq_len to the config's max_position_embeddings, dtype to the
    config's and device to "cpu"; an engine fixed its max_seq_len, precision and device when it was built,
    so passing any of those for an engine is refused rather than ignored. verify: check every engine file
    against the sha256 its manifest records first (`moetrt.artifacts.verify_artifact`; sizes are checked
    always). Raises MoetrtError (one line).
    """
    path = artifact.path
    if artifact.kind == "engine":
        fixed = {"max_seq_len": max_seq_len, "dtype": dtype, "device": device}
        given = [name for name, value in fixed.items() if value is not None]
        if given:
            raise MoetrtError(f"{path}: {', '.join(given)} apply to checkpoints; an engine fixes them when it is built")
        if verify:
            verify_artifact(path, "engine")
        entry = backend_entry(artifact.manifest.get("backend"), f"{path / MANIFEST}: field 'backend'")
        entry.require()
        return entry.load(path, max_batch=max_batch, threads=threads, extra_outputs=extra_outputs)
    if artifact.kind == "checkpoint":
        from moetrt.runtime.eager_backend import EagerBackend

        return EagerBackend.from_checkpoint(
            path, max_batch=max_batch or 1, max_seq_len=max_seq_len, dtype=dtype, device=device or "cpu",
            threads=threads, extra_outputs=extra_outputs,
        )  # fmt: skip
    raise MoetrtError(f"{path}: this is a {artifact.kind!r} artifact; expected an engine or a checkpoint")
