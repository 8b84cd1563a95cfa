"""`moetrt demo` and `moetrt bench` end to end through the CLI, as a user runs them (subprocesses, a fresh
cache in tmp). No timing thresholds: the machine may be shared; the benchmark's numbers only have to exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt.artifacts import read_manifest
from moetrt.demo import PROMPT
from moetrt.registry import TENSORRT_MISSING

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("moetrt-cache")


def moetrt(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOETRT_CACHE": str(cache)}
    cmd = [sys.executable, "-c", "from moetrt.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_demo_runs_the_pipeline_and_passes_validation(cache: Path) -> None:
    proc = moetrt(cache, "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("verdict: ")]
    assert verdicts and verdicts[-1].startswith("verdict: PASS"), proc.stdout[-3000:]
    checkpoint = cache / "checkpoints" / "tiny-seed0"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    export = read_manifest(cache / "demo" / "export", "export")
    engine = read_manifest(cache / "demo" / "engine-ort-fp32", "engine")
    assert (engine["backend"], engine["precision"]) == ("ort", "fp32")
    assert export["dtype"] == "float32"
    assert (cache / "demo" / "validation.json").is_file()
    for step in ("checkpoint", "export", "build", "generate", "validate", "total"):
        assert step in proc.stdout
    assert proc.stdout.count(PROMPT) == 1  # the prompt is echoed as typed
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", proc.stdout)  # random-weight noise prints no raw control bytes


def test_bench_writes_a_row_per_backend(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ("--preset", "tiny", "--backends", "eager,ort-fp32,ort-int8", "--prompt-len", "8", "--new-tokens", "8")
    proc = moetrt(cache, "bench", *args, "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["backend"] for row in rows] == ["eager", "ort-fp32", "ort-int8"]
    for row in rows:
        for field in ("prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_bytes", "bound_tokens_per_s"):
            assert row[field] > 0, (row["backend"], field, row[field])
        assert row["batch"] == 1 and row["new_tokens"] == 8
    assert rows[1]["tokens_match_ref"] == 8  # fp32 engine = eager, greedy
    assert rows[0]["decode_vs_ref"] == 1.0


def test_bench_refuses_an_unknown_backend(cache: Path) -> None:
    proc = moetrt(cache, "bench", "--preset", "tiny", "--backends", "eager,onnx")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --backends 'eager,onnx'")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_bench_trt_without_tensorrt_is_the_one_line_error(cache: Path) -> None:
    proc = moetrt(cache, "bench", "--preset", "tiny", "--backends", "eager,trt")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {TENSORRT_MISSING}"
