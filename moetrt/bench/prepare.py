"""The artifacts a benchmark run measures: one export per dtype, then each requested engine built from it.

    eager      the checkpoint itself (moetrt's eager reference, `EagerBackend`)
    ort-fp32   ONNX Runtime, com.microsoft::MoE          (fp32 export)
    ort-int8   ONNX Runtime, block-32 int8 experts (QMoE), attention and lm_head (MatMulNBits)
    ort-int4   ONNX Runtime, the same in block-32 int4
    trt        TensorRT fp16 (fp16 export; needs tensorrt and a CUDA GPU)

Everything goes into `workdir` (export-float32/, engine-ort-fp32/, ...). With `reuse`, an artifact already
there is kept when its manifest says it was made from this very parent with these limits; otherwise every
run exports and builds afresh, so a benchmark never measures an engine an older build of moetrt wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from moetrt.artifacts import artifact_hash, read_manifest
from moetrt.errors import MoetrtError
from moetrt.model.checkpoint import checkpoint_hash

# backend -> (engine kind, precision); "eager" runs the checkpoint in its own dtype (fp32 for the presets).
BACKENDS: dict[str, tuple[str, str]] = {
    "eager": ("eager", "fp32"),
    "ort-fp32": ("ort", "fp32"),
    "ort-int8": ("ort", "int8"),
    "ort-int4": ("ort", "int4"),
    "trt": ("trt", "fp16"),
}


@dataclass(frozen=True)
class Artifact:
    """What a step produced, and what it cost (0 when reused)."""

    step: str
    path: Path
    seconds: float
    reused: bool


def parse_backends(spec: str) -> list[str]:
    """'eager,ort-fp32' -> ['eager', 'ort-fp32'], refusing unknown names with one line."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise MoetrtError(f"--backends {spec!r}: expected a comma-separated subset of {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def prepare(
    checkpoint_dir: Path,
    backends: list[str],
    workdir: Path,
    max_seq_len: int,
    max_batch: int,
    threads: int | None,
    reuse: bool = False,
) -> tuple[dict[str, Path], list[Artifact]]:
    """Export and build what `backends` need; returns (backend -> directory to measure, the steps taken)."""
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint

    paths: dict[str, Path] = {}
    steps: list[Artifact] = []
    for backend in backends:
        kind, precision = BACKENDS[backend]
        if kind == "eager":
            paths[backend] = checkpoint_dir
            continue
        dtype = "float16" if kind == "trt" else "float32"
        export = workdir / f"export-{dtype}"
        if not any(step.path == export for step in steps):
            limits = {"max_seq_len": max_seq_len, "max_batch": max_batch}
            expect = {"parent": checkpoint_hash(checkpoint_dir), "dtype": dtype, **limits}
            make = partial(export_checkpoint, checkpoint_dir, export, dtype=dtype, **limits)
            steps.append(_run_step(f"export {dtype}", export, "export", expect if reuse else None, make))
        engine = workdir / f"engine-{backend}"
        expect = {"parent": artifact_hash(export), "precision": precision}
        if kind == "ort":
            expect["threads"] = threads
            make = partial(build_ort_engine, export, engine, precision=precision, threads=threads)
        else:
            make = partial(_build_trt, export, engine)
        steps.append(_run_step(f"build {backend}", engine, "engine", expect if reuse else None, make))
        paths[backend] = engine
    return paths, steps


def _run_step(step: str, path: Path, kind: str, expect: dict[str, Any] | None, make: Callable[[], Any]) -> Artifact:
    """Run `make` unless `expect` is given and the artifact in `path` has those manifest fields."""
    if expect is not None and _matches(path, kind, expect):
        return Artifact(step, path, 0.0, reused=True)
    t0 = time.perf_counter()
    make()
    return Artifact(step, path, time.perf_counter() - t0, reused=False)


def _matches(path: Path, kind: str, expect: dict[str, Any]) -> bool:
    try:
        manifest = read_manifest(path, kind)  # also refuses another moetrt or op-contract version
    except MoetrtError:
        return False
    return all(manifest.get(key) == value for key, value in expect.items())


def _build_trt(export: Path, out: Path) -> Path:
    from moetrt.engines.trt import build_trt_engine

    return build_trt_engine(export, out, precision="fp16")
