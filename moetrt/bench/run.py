"""`moetrt bench`: export once, build each requested engine, measure every backend in its own process.

Rounds are interleaved (round 1 runs every backend, then round 2, ...) and each figure is the median over
rounds: on a shared machine throughput drifts over minutes, and interleaving spreads the drift over all
backends instead of charging it to whichever ran during a busy spell. Read the ratios (to the eager
reference, measured in the same run) and the fractions of the bandwidth bound; absolute numbers move with
the machine's load.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetrt.bench import report
from moetrt.bench.isolate import run_isolated
from moetrt.bench.prepare import bench_backends, eager_dtype, parse_backends, prepare
from moetrt.cachedir import cache_root, preset_checkpoint
from moetrt.errors import MoetrtError
from moetrt.model.config import PRECISION_OF_DTYPE, MixtralConfig

BANDWIDTH = "read bandwidth"  # the pseudo-backend of measure_rounds
Say = Callable[[str], None]  # how the benchmark reports what it does, one line at a time (the CLI prints it)


def default_threads() -> int:
    """Physical cores, like ONNX Runtime's default (hyper-threads slow bandwidth-bound decode down)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def resolve_checkpoint(checkpoint_dir: Path | None, preset: str | None, say: Say) -> Path:
    """The checkpoint to benchmark: a directory, or the cached seeded checkpoint of a preset."""
    if (checkpoint_dir is None) == (preset is None):
        raise MoetrtError("bench: give exactly one of CHECKPOINT_DIR or --preset NAME")
    if checkpoint_dir is not None:
        return checkpoint_dir
    say(f"seeded checkpoint for preset {preset!r}")
    path, reused = preset_checkpoint(preset)
    say(f"checkpoint ({'reused' if reused else 'made'}): {path}")
    return path


def run_bench(
    checkpoint_dir: Path | None = None,
    preset: str | None = None,
    backends: str = "eager,ort-fp32,ort-int8,ort-int4",
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch: int = 1,
    threads: int | None = None,
    rounds: int = 1,
    workdir: Path | None = None,
    reuse: bool = False,
    json_out: Path | None = None,
    plot_out: Path | None = None,
    say: Say | None = None,
    max_seq_len: int | None = None,
    contexts: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Benchmark `backends` on one checkpoint; write JSON / PNG when asked; return the rows (one per backend
    and context, `moetrt.bench.report`) and the table's title. `say` hears each step as one line of text.

    max_seq_len: the KV capacity engines are exported with (default: the config's max_position_embeddings,
        what `moetrt export` gives a user); the eager backend gets the same.
    contexts: a context sweep, e.g. "256,1024,2048,4000": for each context C one measurement with a prompt of
        C - new_tokens tokens, so decode runs at contexts C - new_tokens .. C; replaces prompt_len.
    A backend that fails is reported and the others still run; the call then raises MoetrtError naming it
    (after writing what it has)."""
    say = say or (lambda line: None)
    names = parse_backends(backends)
    limits = {"--prompt-len": (prompt_len, 1), "--new-tokens": (new_tokens, 2), "--batch": (batch, 1),
              "--rounds": (rounds, 1), "--threads": (1 if threads is None else threads, 1)}  # fmt: skip
    for flag, (value, least) in limits.items():
        if value < least:
            raise MoetrtError(f"{flag}: expected an integer >= {least}, found {value}")
    threads = threads or default_threads()
    checkpoint_dir = resolve_checkpoint(checkpoint_dir, preset, say)
    config = MixtralConfig.from_pretrained(checkpoint_dir)
    max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
    prompts = sweep_prompts(contexts, new_tokens) if contexts else [prompt_len]
    if max(prompts) + new_tokens > max_seq_len or max_seq_len > config.max_position_embeddings:
        raise MoetrtError(f"prompt + new tokens = {max(prompts) + new_tokens} must fit --max-seq-len {max_seq_len}, "
                          f"at most max_position_embeddings {config.max_position_embeddings}")  # fmt: skip
    workdir = workdir or cache_root() / "bench" / checkpoint_dir.resolve().name
    paths, steps = prepare(checkpoint_dir, names, workdir, max_seq_len, batch, threads, reuse)
    for step in steps:
        took = "reused" if step.reused else f"{step.seconds:.1f} s"
        say(f"{step.step}: {took} -> {step.path}")

    reference_dtype = eager_dtype(names, config.dtype)
    rows = []
    bandwidths = []
    errors: dict[str, str] = {}
    for prompt in prompts:
        workload = {"prompt_len": prompt, "new_tokens": new_tokens, "batch": batch, "threads": threads,
                    "max_seq_len": max_seq_len}  # fmt: skip
        todo = {n: p for n, p in paths.items() if n not in errors}
        runs, failed = measure_rounds(todo, workload, rounds, say, reference_dtype)
        errors |= failed
        bandwidths += [run["gbs"] for run in runs.pop(BANDWIDTH)]
        for name in names:
            if runs.get(name):
                row = report.summarize(runs[name])
                engine = bench_backends()[name]
                precision = PRECISION_OF_DTYPE[reference_dtype] if engine is None else engine[1]
                rows.append({**row, "precision": precision, **workload})
    bandwidth_gbs = statistics.median(bandwidths)
    reference = "eager" if any(row["backend"] == "eager" for row in rows) else names[0]
    for prompt in prompts:
        report.annotate([row for row in rows if row["prompt_len"] == prompt], config, bandwidth_gbs, reference)
    shown = f"contexts {contexts} (prompt = context - new tokens)" if contexts else f"prompt {prompt_len}"
    title = (f"moetrt bench {checkpoint_dir.name}: {shown}, {new_tokens} new tokens, batch {batch}, max_seq_len "
             f"{max_seq_len}, {threads} threads, median of {rounds} round(s); ratios to {reference}")  # fmt: skip
    if json_out is not None:
        report.write_json(rows, json_out)
        say(f"JSON: {json_out}")
    if plot_out is not None and rows:
        from moetrt.bench.plot import plot

        say(f"plot: {plot(rows, plot_out, title)}")
    if errors:
        raise MoetrtError("; ".join(f"{name} failed: {err.splitlines()[0]}" for name, err in errors.items()))
    return rows, title


def sweep_prompts(contexts: str, new_tokens: int) -> list[int]:
    """'256,1024' -> the prompt lengths [256 - new_tokens, 1024 - new_tokens], refused with one line unless
    every context exceeds new_tokens."""
    try:
        values = [int(c) for c in contexts.split(",") if c.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= new_tokens:
        raise MoetrtError(f"--contexts {contexts!r}: expected comma-separated integers > --new-tokens {new_tokens}")
    return [c - new_tokens for c in values]


def measure_rounds(
    paths: dict[str, Path], workload: dict[str, int], rounds: int, say: Say, reference_dtype: str | None = None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Interleaved rounds of `moetrt.bench.measure.measure`, one process per measurement, each round also
    measuring the read bandwidth (under `BANDWIDTH`): on a shared machine it drifts like the speeds do.
    The eager reference runs in `reference_dtype` (default: the checkpoint's).

    Returns the runs per backend and, for each backend that failed, the child's error (it is not retried)."""
    threads = workload["threads"]
    runs: dict[str, list[dict[str, Any]]] = {BANDWIDTH: [], **{name: [] for name in paths}}
    errors: dict[str, str] = {}
    for rnd in range(1, rounds + 1):
        runs[BANDWIDTH].append(run_isolated("moetrt.bench.bandwidth:read_bandwidth_gbs", {"threads": threads}, threads))
        say(f"round {rnd}/{rounds} read bandwidth: {runs[BANDWIDTH][-1]['gbs']:.1f} GB/s ({threads} threads)")
        for name, path in paths.items():
            if name in errors:
                continue
            kwargs = {"path": str(path.resolve()), "backend": name, **workload}  # the child runs elsewhere
            if name == "eager":
                kwargs["dtype"] = reference_dtype
            try:
                run = run_isolated("moetrt.bench.measure:measure", kwargs, threads)
            except RuntimeError as err:
                errors[name] = str(err)
                say(f"{name}: failed\n{err}")
                continue
            runs[name].append(run)
            speed = f"prefill {run['prefill_ms']:.1f} ms, decode {run['decode_tokens_per_s']:.1f} tok/s"
            say(f"round {rnd}/{rounds} {name}: {speed}")
    return runs, errors
