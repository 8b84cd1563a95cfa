"""The artifacts a benchmark run measures: one export per dtype, then each requested engine built from it.

Backends are named `eager` (the checkpoint itself, moetrt's eager reference `EagerBackend`) or
`{backend}-{precision}` for every backend and precision in `moetrt.registry` (ort-fp32, ort-int8, ort-int4,
trt-fp16, trt-bf16); a bare backend name means its default precision (`trt` = trt-fp16). Each engine is built
from an export in the dtype its precision needs (the registry's table).

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
from moetrt.registry import BACKENDS as ENGINE_BACKENDS
from moetrt.registry import BackendEntry

EAGER = "eager"


@dataclass(frozen=True)
class Artifact:
    """What a step produced, and what it cost (0 when reused)."""

    step: str
    path: Path
    seconds: float
    reused: bool


def bench_backends() -> dict[str, tuple[BackendEntry, str] | None]:
    """Every name `--backends` accepts -> (registry entry, precision); None for eager."""
    names: dict[str, tuple[BackendEntry, str] | None] = {EAGER: None}
    for entry in ENGINE_BACKENDS.values():
        names.update({f"{entry.name}-{precision}": (entry, precision) for precision in entry.precisions})
    return names


def eager_dtype(backends: list[str], checkpoint_dtype: str) -> str:
    """The dtype the eager reference runs in: the engines' (so its tokens and speed compare like with like),
    float32 when engines of several dtypes are measured and float32 is among them, else the checkpoint's."""
    known = bench_backends()
    dtypes = {entry.precisions[precision] for entry, precision in (known[b] for b in backends if known[b])}
    if len(dtypes) == 1:
        return dtypes.pop()
    return "float32" if "float32" in dtypes else checkpoint_dtype


def parse_backends(spec: str) -> list[str]:
    """'eager,ort-fp32,trt' -> ['eager', 'ort-fp32', 'trt-fp16'], refusing unknown names, and backends this
    machine cannot run (e.g. TensorRT not installed), with one line."""
    known = bench_backends()
    names = []
    for name in (name.strip() for name in spec.split(",")):
        if name in ENGINE_BACKENDS:
            name = f"{name}-{ENGINE_BACKENDS[name].default_precision}"
        if name and name not in known:
            raise MoetrtError(f"--backends {spec!r}: expected a comma-separated subset of {', '.join(known)}")
        if name:
            names.append(name)
    if not names:
        raise MoetrtError(f"--backends {spec!r}: expected a comma-separated subset of {', '.join(known)}")
    for name in names:
        if known[name] is not None:
            known[name][0].require()
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
    from moetrt.export import export_checkpoint

    known = bench_backends()
    paths: dict[str, Path] = {}
    steps: list[Artifact] = []
    for backend in backends:
        if known[backend] is None:
            paths[backend] = checkpoint_dir
            continue
        entry, precision = known[backend]
        dtype = entry.precisions[precision]
        export = workdir / f"export-{dtype}"
        if not any(step.path == export for step in steps):
            limits = {"max_seq_len": max_seq_len, "max_batch": max_batch}
            expect = {"parent": checkpoint_hash(checkpoint_dir), "dtype": dtype, **limits}
            make = partial(export_checkpoint, checkpoint_dir, export, dtype=dtype, **limits)
            steps.append(_run_step(f"export {dtype}", export, "export", expect if reuse else None, make))
        engine = workdir / f"engine-{backend}"
        expect = {"parent": artifact_hash(export), "precision": precision}
        if entry.accelerator == "cpu":
            expect["threads"] = threads  # CPU engines are built for their serving threads
        make = partial(entry.build, export, engine, precision=precision, threads=threads)
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
