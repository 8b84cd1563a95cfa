"""Benchmark rows: medians over rounds, ratios to the reference, bandwidth bounds, and their renderings.

A row is one backend at one batch size (JSON-ready dict). Fields:
    backend, precision, batch, prompt_len, new_tokens, threads, rounds
    prefill_ms, ttft_ms, decode_tokens_per_s, decode_ms_per_step, peak_rss_bytes, gpu_mem_bytes, load_s
                            medians over the rounds (gpu_mem_bytes: None without CUDA)
    decode_vs_ref           decode tokens/s / the reference's (same batch)
    ttft_vs_ref             the reference's time to first token / this one's (> 1: faster)
    tokens_match_ref        greedy tokens equal to the reference's (common prefix, smallest over rows)
    bandwidth_gbs           the machine's measured read bandwidth
    bound_tokens_per_s      bandwidth / bytes a decode step reads at this precision (moetrt.bench.bandwidth)
    bound_fraction          decode_tokens_per_s / bound_tokens_per_s
For batch > 1 the bound uses the expected number of distinct experts under uniform routing (an estimate).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from moetrt.bench.bandwidth import bound_tokens_per_s, engine_bytes_per_token

TIMINGS = ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "decode_ms_per_step", "peak_rss_bytes", "load_s")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a backend's rounds: the median of each timing (None where a stack does not report it),
    the first round's tokens."""
    row = dict(runs[0])
    for key in TIMINGS:
        values = [run[key] for run in runs if run.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    gpu = [run["gpu_mem_bytes"] for run in runs if run.get("gpu_mem_bytes") is not None]
    row["gpu_mem_bytes"] = max(gpu) if gpu else None
    row["rounds"] = len(runs)
    row["decode_tokens_per_s_rounds"] = [run["decode_tokens_per_s"] for run in runs]
    return row


def annotate(
    rows: list[dict[str, Any]],
    config: Any,
    bandwidth_gbs: float | None,
    reference: str,
) -> None:
    """Add the ratios to `reference` (a backend name; same batch) and the bandwidth bound to each row: the
    bytes a moetrt engine of the row's precision reads per decode step (ORT GenAI quantizes the same weights;
    HF and eager read fp32 or the checkpoint's dtype)."""

    def step_bytes(row: dict[str, Any]) -> float:
        return engine_bytes_per_token(config, row["precision"], row["batch"], row["prompt_len"])["total"]

    refs = {row["batch"]: row for row in rows if row["backend"] == reference}
    for row in rows:
        ref = refs.get(row["batch"])
        row["reference"] = reference if ref else None
        row["decode_vs_ref"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"] if ref else None
        row["ttft_vs_ref"] = ref["ttft_ms"] / row["ttft_ms"] if ref else None
        row["tokens_match_ref"] = prefix_match(row["token_ids"], ref["token_ids"]) if ref else None
        row["bandwidth_gbs"] = bandwidth_gbs
        if bandwidth_gbs:
            row["bound_tokens_per_s"] = bound_tokens_per_s(bandwidth_gbs, step_bytes(row), row["batch"])
            row["bound_fraction"] = row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
        else:
            row["bound_tokens_per_s"] = row["bound_fraction"] = None


def prefix_match(tokens: list[list[int]], ref: list[list[int]]) -> int:
    """Length of the common prefix of two runs' tokens, the smallest over rows."""
    lengths = []
    for row, ref_row in zip(tokens, ref, strict=True):
        n = 0
        while n < min(len(row), len(ref_row)) and row[n] == ref_row[n]:
            n += 1
        lengths.append(n)
    return min(lengths)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value if scale == 1 else value * scale, spec)


COLUMNS = (
    ("backend", lambda r: r["backend"]),
    ("batch", lambda r: str(r["batch"])),
    ("prompt", lambda r: str(r["prompt_len"])),
    ("prefill ms", lambda r: _fmt(r["prefill_ms"], ".1f")),
    ("TTFT ms", lambda r: _fmt(r["ttft_ms"], ".1f")),
    ("decode tok/s", lambda r: _fmt(r["decode_tokens_per_s"], ".1f")),
    ("x ref decode", lambda r: _fmt(r["decode_vs_ref"], ".2f")),
    ("x ref TTFT", lambda r: _fmt(r["ttft_vs_ref"], ".2f")),
    ("bound tok/s", lambda r: _fmt(r["bound_tokens_per_s"], ".1f")),
    ("% of bound", lambda r: _fmt(r["bound_fraction"], ".0f", 100)),
    ("peak RSS MiB", lambda r: _fmt(r["peak_rss_bytes"], ".0f", 2**-20)),
    ("GPU MiB", lambda r: _fmt(r["gpu_mem_bytes"], ".0f", 2**-20)),
    ("tokens = ref", lambda r: _fmt(r["tokens_match_ref"], "d") + f"/{r['new_tokens']}"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as a JSON list (token ids left out: they only serve the agreement count)."""
    slim = [{k: v for k, v in row.items() if k != "token_ids"} for row in rows]
    Path(path).write_text(json.dumps(slim, indent=1) + "\n")
