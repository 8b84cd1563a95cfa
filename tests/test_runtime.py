"""The backend-neutral runtime on the eager backend: batched generation, sampling, streaming, stop tokens,
static buffers, request checks, and `load_backend`'s dispatch.

Batch/single-row parity is exact (token for token): right padding must be invisible to every real token.
Cached decode vs full recompute is compared on fp32 logits within 1e-5 relative + 1e-5 absolute. The two
differ only in summation order (keys in the cache vs in the step's new slices, gemv vs gemm), which with
std-0.2 weights reaches 1.3e-5 absolute on logits up to 7.8; a masking or position bug is O(1).

The model configurations matter for those two tests only; the loop's bookkeeping runs on the tiny preset.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

import numpy as np
import pytest
import torch

from moetrt.artifacts import write_manifest
from moetrt.errors import MoetrtError
from moetrt.model.checkpoint import checkpoint_hash
from moetrt.model.config import PRESETS
from moetrt.model.mixtral import KVCache
from moetrt.model.testing import make_checkpoint
from moetrt.registry import BACKENDS, TENSORRT_MISSING, BackendEntry
from moetrt.runtime.eager_backend import EagerBackend
from moetrt.runtime.engine import load_backend
from moetrt.runtime.generate import generate, stream
from moetrt.runtime.sampling import NUCLEUS_SEARCH, SamplingParams, sample
from moetrt.validate import open_engine

TINY = PRESETS["tiny"]
CONFIGS = {
    "tiny": TINY,
    "sliding_window_8": dataclasses.replace(TINY, sliding_window=8),
    "head_dim_24": dataclasses.replace(TINY, head_dim=24),
    "experts8_top1": dataclasses.replace(TINY, num_local_experts=8, num_experts_per_tok=1),
}
MAX_BATCH, MAX_SEQ = 4, 64
STEPS = 32


def random_prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, TINY.vocab_size, size=length - 1).tolist()] for length in lengths]


# Unequal lengths, the shortest in the middle, all longer than the sliding window of 8.
PROMPTS = random_prompts((13, 9, 21))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_backend(tmp_path_factory, name: str) -> EagerBackend:
    path = make_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", CONFIGS[name])
    return EagerBackend.from_checkpoint(path, MAX_BATCH, MAX_SEQ)


@pytest.fixture(scope="module", params=list(CONFIGS))
def each_config(request, tmp_path_factory) -> EagerBackend:
    return make_backend(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> EagerBackend:
    return make_backend(tmp_path_factory, "tiny")


class Recorder:
    """A backend wrapper that keeps a copy of every step's inputs and logits."""

    def __init__(self, backend: EagerBackend):
        self.inner, self.steps = backend, []
        self.name, self.config = backend.name, backend.config
        self.max_batch, self.max_seq_len = backend.max_batch, backend.max_seq_len

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        logits = self.inner.step(input_ids, position_ids)
        self.steps.append((input_ids.copy(), position_ids.copy(), logits.copy()))
        return logits


def test_batch_matches_single_rows(each_config):
    backend = each_config
    batched = generate(backend, PROMPTS, STEPS, stop_token_ids=())
    for row, prompt in enumerate(PROMPTS):
        single = generate(backend, [prompt], STEPS, stop_token_ids=())
        assert batched.tokens[row] == single.tokens[0], f"row {row}"
    assert batched.finish_reasons == ["length"] * len(PROMPTS)
    assert batched.decode_steps == STEPS - 1 and batched.decode_tokens == (STEPS - 1) * len(PROMPTS)
    assert 0 < batched.prefill_ms <= batched.ttft_ms and batched.decode_tokens_per_s > 0


def test_cached_decode_matches_full_recompute(each_config):
    """Each step's logits (prefill at the row's last real token, then every decode step) equal a fresh
    forward over prompt + tokens so far with an empty cache."""
    backend = each_config
    recorder = Recorder(backend)
    result = generate(recorder, PROMPTS[:2], 16, stop_token_ids=())
    model, cfg = backend.model, backend.config
    empty = KVCache(cfg, 1, MAX_SEQ, torch.float32)
    for row, prompt in enumerate(PROMPTS[:2]):
        sequence = torch.tensor([prompt + result.tokens[row]])
        with torch.inference_mode():
            full, _, _ = model(sequence, torch.arange(sequence.shape[1])[None], empty.k, empty.v)
        for step, (_, position_ids, logits) in enumerate(recorder.steps):
            t = len(prompt) + step - 1  # the position whose logits give token `step`
            got = logits[row, len(prompt) - 1] if step == 0 else logits[row, 0]
            if step > 0:
                assert position_ids[row, 0] == t
            np.testing.assert_allclose(got, full[0, t].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"row {row} step {step}")


def test_buffers_are_allocated_once(backend):
    before = [(id(t), t.data_ptr()) for t in backend.cache.k + backend.cache.v]
    generate(backend, PROMPTS, 4, stop_token_ids=())
    generate(backend, PROMPTS[:1], 4, SamplingParams(temperature=1.0), stop_token_ids=())
    assert [(id(t), t.data_ptr()) for t in backend.cache.k + backend.cache.v] == before
    k, v = backend.kv_cache(0)
    shape = (MAX_BATCH, backend.config.num_key_value_heads, MAX_SEQ, backend.config.head_dim)
    assert k.shape == v.shape == shape and not np.shares_memory(k, backend.cache.k[0].numpy())


def test_sampling_is_reproducible_and_top1_is_greedy(backend):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    first = generate(backend, PROMPTS, 16, params, stop_token_ids=(), seed=7).tokens
    assert generate(backend, PROMPTS, 16, params, stop_token_ids=(), seed=7).tokens == first
    assert generate(backend, PROMPTS, 16, params, stop_token_ids=(), seed=8).tokens != first
    greedy = generate(backend, PROMPTS, 16, stop_token_ids=()).tokens
    for top1 in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        assert generate(backend, PROMPTS, 16, top1, stop_token_ids=(), seed=3).tokens == greedy


def test_stream_yields_the_tokens_generate_returns(backend):
    free = generate(backend, PROMPTS, 12, stop_token_ids=()).tokens
    stop = free[1][4]  # row 1 stops at its 5th token (or earlier, at its first occurrence)
    result = generate(backend, PROMPTS, 12, stop_token_ids=[stop])
    streamed: list[list[int]] = [[] for _ in PROMPTS]
    finished_at = {}
    for i, event in enumerate(stream(backend, PROMPTS, 12, stop_token_ids=[stop])):
        assert event.step == i
        for row, token in enumerate(event.tokens):
            assert (token is None) == (row in finished_at)
            if token is not None:
                streamed[row].append(token)
        finished_at.update(dict.fromkeys(event.finished, i))
    assert streamed == result.tokens
    for row, tokens in enumerate(free):
        expected = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
        assert result.tokens[row] == expected
        assert result.finish_reasons[row] == ("stop" if stop in tokens else "length")
        assert finished_at[row] == len(expected) - 1


def test_stop_tokens_end_the_loop_early(backend):
    first = generate(backend, PROMPTS[:1], 1).tokens[0][0]
    result = generate(backend, PROMPTS[:1], 32, stop_token_ids=[first])
    assert result.tokens == [[first]] and result.finish_reasons == ["stop"] and result.decode_steps == 0


def test_eos_is_the_default_stop_token(backend):
    free = generate(backend, PROMPTS, 32, stop_token_ids=()).tokens
    eos_rows = [row for row, tokens in enumerate(free) if TINY.eos_token_ids[0] in tokens]
    result = generate(backend, PROMPTS, 32)
    assert [row for row, reason in enumerate(result.finish_reasons) if reason == "stop"] == eos_rows


def test_sample_filters():
    """top-k and top-p keep exactly the tokens they should, and sampling follows the softmax."""
    probs = np.array([0.05, 0.5, 0.3, 0.15], dtype=np.float32)
    logits = np.tile(np.log(probs), (20000, 1))
    rng = np.random.default_rng(0)
    drawn = sample(logits, SamplingParams(temperature=1.0), rng)
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), probs, atol=0.01)
    assert set(sample(logits, SamplingParams(temperature=1.0, top_k=2), rng).tolist()) == {1, 2}
    assert set(sample(logits, SamplingParams(temperature=1.0, top_p=0.79), rng).tolist()) == {1, 2}
    assert set(sample(logits, SamplingParams(temperature=1.0, top_p=0.81), rng).tolist()) == {1, 2, 3}
    # top-p applies to the renormalised top-k distribution: token 3's preceding mass is 0.8 / 0.95 > 0.82.
    assert set(sample(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.82), rng).tolist()) == {1, 2}
    same = [sample(logits[:64], SamplingParams(temperature=0.7, top_p=0.9), np.random.default_rng(5)) for _ in "ab"]
    np.testing.assert_array_equal(*same)


def nucleus(logits: np.ndarray, top_p: float) -> set[int]:
    """The tokens top-p keeps, by a plain float64 full sort."""
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    return set(order[np.cumsum(p[order]) - p[order] < top_p].tolist())


@pytest.mark.parametrize("vocab, scale, rows", [(1000, 2.5, 2000), (8000, 2.0, 500), (1000, 0.2, 2000)])
def test_top_p_nucleus_search(vocab, scale, rows):
    """Nuclei of 72, 1810 and 860 tokens: found among the 256 most probable, among the 4096 most probable,
    and by sorting the whole vocabulary (see NUCLEUS_SEARCH)."""
    logits = (np.random.default_rng(1).standard_normal(vocab) * scale).astype(np.float32)
    inner, outer = nucleus(logits, 0.899), nucleus(logits, 0.901)  # the float32 boundary may move a token
    draws = sample(np.tile(logits, (rows, 1)), SamplingParams(1.0, top_p=0.9), np.random.default_rng(0))
    drawn = set(draws.tolist())
    assert drawn <= outer and len(drawn) >= 0.9 * min(len(inner), NUCLEUS_SEARCH[0])


@pytest.mark.parametrize(
    "prompts_, max_new, message",
    [
        ([], 4, "no prompts: expected at least one list of token ids"),
        ([[1, 2], []], 4, "prompt 1 is empty: expected at least one token id"),
        ([[1, 512]], 4, "prompt: token id 512 at position 1 is outside the vocabulary [0, 512)"),
        ([[1, 2], [-1]], 4, "prompt 1: token id -1 at position 0 is outside the vocabulary [0, 512)"),
        ([[1]] * 5, 4, "batch of 5 prompts exceeds the engine's max batch 4"),
        ([[1] * 60], 8, "prompt of 60 tokens + 8 new tokens exceeds the engine's max sequence length 64"),
        ([[1], [1] * 57], 8, "prompt 1 of 57 tokens + 8 new tokens exceeds the engine's max sequence length 64"),
        ([[1]], 0, "max_new_tokens must be >= 1, found 0"),
        ([[1.5]], 4, "prompt: expected a flat list of integer token ids, found float64 [1]"),
    ],
)
def test_requests_are_refused_before_running(backend, prompts_, max_new, message):
    recorder = Recorder(backend)
    with pytest.raises(MoetrtError) as err:
        stream(recorder, prompts_, max_new)
    assert str(err.value) == message
    assert recorder.steps == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "sampling temperature must be a finite number >= 0 (0 = greedy), found -1.0"),
        ({"top_k": -2}, "sampling top_k must be >= 0 (0 = no limit), found -2"),
        ({"top_p": 0.0}, "sampling top_p must be in (0, 1], found 0.0"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(MoetrtError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_load_backend_dispatch(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt", TINY)
    eager = load_backend(ckpt, max_batch=2, max_seq_len=32)
    assert isinstance(eager, EagerBackend) and (eager.max_batch, eager.max_seq_len) == (2, 32)
    assert load_backend(ckpt).max_seq_len == TINY.max_position_embeddings

    engine = tmp_path / "engine"
    engine.mkdir()
    body = {"config": TINY.to_dict(), "dtype": "float32", "max_seq_len": 32, "max_batch": 1, "io": {}, "parent": ""}
    write_manifest(engine, "engine", {**body, "backend": "ort"})
    with pytest.raises(MoetrtError, match="max_seq_len, dtype apply to checkpoints"):
        load_backend(engine, max_seq_len=64, dtype="float16")
    write_manifest(engine, "engine", {**body, "backend": "onnx"})
    with pytest.raises(MoetrtError, match=r"field 'backend': 'onnx' is not a backend; expected one of ort, trt"):
        load_backend(engine)
    write_manifest(engine, "export", body)
    with pytest.raises(MoetrtError, match="this is a 'export' artifact, expected 'engine'"):
        load_backend(engine)
    (engine / "moetrt.json").write_text("{")
    with pytest.raises(MoetrtError, match="moetrt.json: corrupt manifest"):
        load_backend(engine)
    with pytest.raises(MoetrtError, match="neither an engine"):
        load_backend(tmp_path)
    with pytest.raises(MoetrtError, match="not a directory"):
        load_backend(tmp_path / "missing")


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_load_backend_reaches_each_registered_loader(name, tmp_path, monkeypatch):
    """Every registry entry's loader gets load_backend's arguments under the one `Backend.load` signature."""
    entry = BACKENDS[name]
    module, _, attribute = entry.loader.partition(":")
    loader = getattr(importlib.import_module(module), attribute)
    seen = []
    monkeypatch.setattr(loader, "load", classmethod(lambda cls, path, **options: seen.append((path, options)) or cls))
    monkeypatch.setattr(BackendEntry, "unavailable", lambda self: None)  # past the "is it installed" check
    engine = tmp_path / "engine"
    engine.mkdir()
    body = {"config": TINY.to_dict(), "dtype": "float32", "max_seq_len": 32, "max_batch": 4, "io": {}, "parent": ""}
    write_manifest(engine, "engine", {**body, "backend": name})
    assert load_backend(engine, max_batch=3, threads=2, extra_outputs=["layers.0.moe_output"]) is loader
    assert load_backend(engine) is loader
    assert seen == [
        (engine, {"max_batch": 3, "threads": 2, "extra_outputs": ["layers.0.moe_output"]}),
        (engine, {"max_batch": None, "threads": None, "extra_outputs": ()}),
    ]


def test_trt_loader_takes_the_common_signature_up_to_tensorrt(tmp_path):
    """Without TensorRT, a TensorRT engine is refused with the one-line "not installed" error, both through
    load_backend and through the loader itself with every `Backend.load` argument (no TypeError)."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: the GPU tests in test_trt.py open real engines")
    from moetrt.runtime.trt_backend import TrtBackend

    checkpoint = make_checkpoint(tmp_path / "ckpt", TINY)
    engine = tmp_path / "engine"
    engine.mkdir()
    body = {"config": TINY.to_dict(), "dtype": "float16", "max_seq_len": 32, "max_batch": 4, "io": {}, "parent": ""}
    write_manifest(engine, "engine", {**body, "backend": "trt", "checkpoint": checkpoint_hash(checkpoint)})
    for load in (load_backend, TrtBackend.load):
        with pytest.raises(MoetrtError) as err:
            load(engine, max_batch=2, threads=1, extra_outputs=())
        assert str(err.value) == TENSORRT_MISSING
    with pytest.raises(MoetrtError) as err:  # validation opens it through the same registry entry
        open_engine(engine, checkpoint)
    assert str(err.value) == TENSORRT_MISSING
