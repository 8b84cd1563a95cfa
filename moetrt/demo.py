"""`moetrt demo`: the whole pipeline on a built-in model, so a new user sees every stage work in a minute.

    checkpoint   seeded-random Mixtral (the `tiny` preset: 2 layers, 4 experts top-2), made once and
                 reused from the cache ($MOETRT_CACHE or ~/.cache/moetrt) while intact
    export       torch.onnx -> model.onnx with one moetrt::TopKMoE node per layer
    build        the best engine this machine runs: TensorRT fp16 when `tensorrt` imports and CUDA is
                 available, else ONNX Runtime fp32 on the CPU
    generate     a prompt through the engine, text streamed as it is decoded
    validate     the engine against the eager model (moetrt.validate)
then a table of what each step cost and where its artifact is, and a one-line verdict. The export and the
engine are made afresh on every run (their timings are part of the point); only the checkpoint is cached.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moetrt.cachedir import cache_root, preset_checkpoint
from moetrt.registry import BACKENDS, DEFAULT_BACKEND, BackendEntry

PRESET = "tiny"
PROMPT = "Mixture-of-Experts language models route every token to"
NEW_TOKENS = 40
MAX_SEQ_LEN = 256  # the prompt, the generated tokens and the validation suite's prompts + steps fit
MAX_BATCH = 2  # the validation suite runs its prompts two at a time


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    artifact: Path | None = None
    note: str = ""


def best_engine() -> tuple[BackendEntry, str]:
    """(backend, precision): the first registered GPU backend that can run here (TensorRT fp16 when tensorrt
    imports and torch sees a CUDA GPU), else the default backend at its default precision (ORT fp32)."""
    for entry in BACKENDS.values():
        if entry.accelerator == "cuda" and entry.unavailable() is None:
            import torch

            if torch.cuda.is_available():
                return entry, entry.default_precision
    fallback = BACKENDS[DEFAULT_BACKEND]
    return fallback, fallback.default_precision


def run_demo(console: Console) -> bool:
    """Run every stage, printing as it goes; True when the engine was built, ran, and passed validation."""
    startup_s = time.time() - psutil.Process().create_time()  # interpreter start and imports, before any step
    root = cache_root() / "demo"
    entry, precision = best_engine()
    backend = entry.name
    console.rule(Text(f"moetrt demo: {PRESET} Mixtral -> {backend} {precision} engine, artifacts in {root}"))
    steps: list[Step] = []

    with _step(console, steps, "checkpoint") as step:
        step.artifact, reused = preset_checkpoint(PRESET)
        step.note = "reused from the cache" if reused else "made (seeded random weights, trained BPE tokenizer)"
    checkpoint = step.artifact

    with _step(console, steps, "export") as step:
        from moetrt.export import export_checkpoint

        dtype = entry.precisions[precision]
        step.artifact = export_checkpoint(
            checkpoint, root / "export", max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH, dtype=dtype
        )
        step.note = f"{dtype}, one moetrt::TopKMoE node per layer"
    export = step.artifact

    with _step(console, steps, "build") as step:
        step.artifact = entry.build(export, root / f"engine-{backend}-{precision}", precision)
        step.note = f"{backend} {precision}"
    engine = step.artifact

    with _step(console, steps, "generate") as step:
        from moetrt.cli import print_literal
        from moetrt.runtime.textgen import run_generate

        result = run_generate(
            engine, prompts=[PROMPT], max_new_tokens=NEW_TOKENS,
            on_prompt=lambda text: print_literal(text, style="dim", out=console),
            on_text=lambda text: print_literal(text, out=console),
        )  # fmt: skip
        console.print("\n[dim](random weights: the text is noise; validation checks it is the eager model's noise)[/]")
        step.artifact = engine
        step.note = (f"{len(result['token_ids'])} tokens: prefill {result['prefill_ms']:.1f} ms, "
                     f"decode {result['decode_tokens_per_s']:.0f} tokens/s")  # fmt: skip

    with _step(console, steps, "validate") as step:
        report = _validate(checkpoint, engine, root / "validation.json", console)
        step.artifact = root / "validation.json"
        step.note = ("PASS" if report.passed else "FAIL") + f", {len(report.checks)} checks"

    console.print(_summary(steps, startup_s))
    console.print(Text(f"verdict: {report.verdict()}", style=f"bold {'green' if report.passed else 'red'}"))
    return report.passed


@contextmanager
def _step(console: Console, steps: list[Step], name: str) -> Iterator[Step]:
    """Announce a step, time it, record it."""
    step = Step(name)
    steps.append(step)
    console.rule(f"[bold]{len(steps)}. {name}", align="left", style="dim")
    t0 = time.perf_counter()
    try:
        yield step
    finally:
        step.seconds = time.perf_counter() - t0
        console.print(f"[dim]{name}: {step.seconds:.1f} s[/dim]")


def _validate(checkpoint: Path, engine: Path, json_out: Path, console: Console) -> Any:
    """The validation report of the engine against the eager model (shown as a table)."""
    from moetrt.cli import print_validation
    from moetrt.validate import validate

    with console.status("comparing the engine with the eager model"):
        report = validate(checkpoint, engine, json_out=json_out)
    print_validation(report, console)
    return report


def _summary(steps: list[Step], startup_s: float) -> Table:
    table = Table(title="moetrt demo: what each step cost")
    for column in ("step", "seconds", "artifact", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left", overflow="fold")
    table.add_row("start-up", f"{startup_s:.1f}", "", "Python, torch and moetrt imports", style="dim")
    for step in steps:
        table.add_row(step.name, f"{step.seconds:.1f}", Text(str(step.artifact or "-")), Text(step.note))
    table.add_row("total", f"{startup_s + sum(s.seconds for s in steps):.1f}", "", "", style="bold")
    return table
