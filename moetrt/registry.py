"""The table of engine backends, keyed by the `backend` field of an engine's manifest.

Polygraphy's shape: per backend one small builder (engines/) and one loader + runner (runtime/) behind one
interface (`moetrt.runtime.backend.Backend`). Every caller that needs "which backends exist, what do they
build, how do I open one" reads this table: the CLI, the demo, the benchmark, `load_backend` and validation.
Nothing else branches on backend names.

Entries name their builder and loader as "module:attribute" strings imported on use, so reading the table
imports neither TensorRT nor onnxruntime nor engines/ into runtime/ (the arrows stay one-way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.progress import Progress


@dataclass(frozen=True)
class BackendEntry:
    """One backend: what it builds and how an engine of it is opened.

    name         the manifest's `backend` field and the CLI's `--backend` value
    precisions   precision name -> the export dtype it is built from (e.g. "fp16" -> "float16")
    builder      "module:function" with signature
                 `(export_dir, output_dir, precision, threads, device, progress) -> Path` (progress: moetrt.progress)
    loader       "module:class" whose `load(path, max_batch=None, threads=None, extra_outputs=())` opens an
                 engine directory (the `Backend` protocol)
    requirement  a module that must import for the backend to build or run, and the one-line error if not
    accelerator  what runs it ("cpu" or "cuda"), for the demo's and benchmark's choice of backend
    """

    name: str
    precisions: dict[str, str]
    builder: str
    loader: str
    requirement: tuple[str, str] | None = None
    accelerator: str = "cpu"

    @property
    def default_precision(self) -> str:
        return next(iter(self.precisions))

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise MoetrtError(f"precision {precision!r}: the {self.name} backend builds {', '.join(self.precisions)}")
        return precision

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (one line), or None when it can."""
        if self.requirement is None:
            return None
        module, message = self.requirement
        try:
            importlib.import_module(module)
        except ImportError:
            return message
        return None

    def require(self) -> None:
        """Raise the backend's one-line MoetrtError when it cannot run here."""
        reason = self.unavailable()
        if reason is not None:
            raise MoetrtError(reason)

    def build(
        self,
        export_dir: str | Path,
        output_dir: str | Path,
        precision: str | None = None,
        threads: int | None = None,
        device: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Build an engine directory from an export (see the builder's docstring for what each argument means
        to it); MoetrtError for a precision this backend does not build."""
        precision = self.check_precision(precision or self.default_precision)
        build = _resolve(self.builder)
        return build(export_dir, output_dir, precision=precision, threads=threads, device=device, progress=progress)

    def load(
        self,
        path: str | Path,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> Any:
        """Open an engine directory of this backend (a `Backend`); same signature for every backend."""
        return _resolve(self.loader).load(path, max_batch=max_batch, threads=threads, extra_outputs=extra_outputs)


TENSORRT_MISSING = (
    "TensorRT is not installed: pip install 'moetrt[trt]' (TensorRT with a CUDA GPU) to build or run TensorRT engines"
)

BACKENDS: dict[str, BackendEntry] = {
    entry.name: entry
    for entry in (
        BackendEntry(
            name="ort",
            precisions={"fp32": "float32", "int8": "float32", "int4": "float32"},
            builder="moetrt.engines.ort:build_ort_engine",
            loader="moetrt.runtime.ort_backend:OrtBackend",
        ),
        BackendEntry(
            name="trt",
            precisions={"fp16": "float16", "bf16": "bfloat16"},
            builder="moetrt.engines.trt:build_trt_engine",
            loader="moetrt.runtime.trt_backend:TrtBackend",
            requirement=("tensorrt", TENSORRT_MISSING),
            accelerator="cuda",
        ),
    )
}


DEFAULT_BACKEND = "ort"  # runs on any CPU: what `moetrt build` builds and the demo falls back to


def builds_from(dtype: str) -> str:
    """One line saying which engines an export of `dtype` can be built into (`BackendEntry.precisions`), which
    of those cannot run on this machine, and what the other backends need instead."""
    into, others = [], []
    for entry in BACKENDS.values():
        precisions = [p for p, d in entry.precisions.items() if d == dtype]
        needs = sorted({d for d in entry.precisions.values()})
        if precisions:
            missing = entry.requirement[0] if entry.unavailable() and entry.requirement else None
            into.append(f"{entry.name} {', '.join(precisions)}"
                        + (f" (not on this machine: {missing} is not installed)" if missing else ""))  # fmt: skip
        else:
            others.append(f"{entry.name} needs a {' or '.join(needs)} export")
    head = f"a {dtype} export builds into " + ("; ".join(into) if into else "no engine")
    return head + ("; " + "; ".join(others) if others else "")


def backend_entry(name: Any, where: str = "backend") -> BackendEntry:
    """The entry for `name`, or a one-line MoetrtError naming `where` the name came from and the choices."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise MoetrtError(f"{where}: {name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def _resolve(target: str) -> Callable[..., Any] | Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
