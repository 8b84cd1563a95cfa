"""`moetrt bench` pieces: measurement children import the moetrt that runs the benchmark, whatever the current
directory holds; the eager reference runs in the engines' dtype."""

from __future__ import annotations

import os

import pytest

from moetrt.bench.isolate import run_isolated
from moetrt.bench.measure import measure
from moetrt.bench.prepare import eager_dtype
from moetrt.bench.workload import random_prompt
from moetrt.runtime.engine import load_backend
from moetrt.runtime.generate import generate


def test_child_ignores_a_moetrt_folder_in_the_working_directory(tmp_path, monkeypatch):
    shadow = tmp_path / "moetrt"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the moetrt folder in the working directory')\n")
    monkeypatch.chdir(tmp_path)
    env = run_isolated("moetrt.bench.isolate:thread_env", {"threads": 3})
    assert env["OMP_NUM_THREADS"] == "3" and env["PATH"] == os.environ["PATH"]


def test_child_failure_is_reported_with_its_output():
    with pytest.raises(RuntimeError, match="moetrt.bench.isolate:no_such_function failed"):
        run_isolated("moetrt.bench.isolate:no_such_function", {})


def test_eager_reference_runs_in_the_engines_dtype():
    assert eager_dtype(["eager", "ort-fp32", "ort-int4"], "bfloat16") == "float32"  # ORT CPU engines: fp32
    assert eager_dtype(["eager", "trt-fp16"], "bfloat16") == "float16"
    assert eager_dtype(["eager", "trt-bf16"], "float32") == "bfloat16"
    assert eager_dtype(["eager", "trt-fp16", "ort-int8"], "bfloat16") == "float32"
    assert eager_dtype(["eager"], "bfloat16") == "bfloat16"


def test_eager_measurement_in_another_dtype(checkpoint_factory):
    """A bf16 checkpoint measured as the fp32 engines' reference: its greedy tokens are the fp32 model's."""
    checkpoint = checkpoint_factory(dtype="bfloat16")
    run = measure(str(checkpoint), "eager", prompt_len=6, new_tokens=4, threads=1, warmup_tokens=0, dtype="float32")
    with load_backend(checkpoint, max_seq_len=10, dtype="float32") as eager:
        prompt = random_prompt(eager.config.vocab_size, 1, 6, 0).tolist()
        assert run["token_ids"] == generate(eager, prompt, 4, stop_token_ids=()).tokens
