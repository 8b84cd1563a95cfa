"""The slot scheduler on a real eager backend (tiny checkpoint), without HTTP: continuous batching gives each
request exactly its solo tokens, cancellation frees a slot within one step, a cancelled queued request never
runs, the queue is bounded."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from moetrt.runtime.engine import load_backend
from moetrt.runtime.generate import generate
from moetrt.runtime.sampling import SamplingParams
from moetrt.serve.engine import GenerationRequest, QueueFull
from moetrt.serve.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingBackend:
    """The real backend; every step's slots and input ids are recorded as it starts."""

    def __init__(self, backend):
        self.backend = backend
        self.config, self.max_batch, self.max_seq_len = backend.config, backend.max_batch, backend.max_seq_len
        self.steps: list[tuple[list[int], np.ndarray]] = []

    def step(self, input_ids, position_ids, slots=None):
        self.steps.append((list(slots), input_ids.copy()))
        return self.backend.step(input_ids, position_ids, slots)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(stream) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for delta in stream:
        tokens += delta.token_ids
        reason = delta.finish_reason
    return tokens, reason


@pytest.fixture(scope="module")
def ort_engine(tiny_checkpoint, tmp_path_factory):
    """A tiny ORT fp32 engine with 4 slots (its attention is GroupQueryAttention over the live positions)."""
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint

    root = tmp_path_factory.mktemp("serve-ort")
    export = export_checkpoint(tiny_checkpoint, root / "export", max_seq_len=96, max_batch=4)
    return build_ort_engine(export, root / "engine", "fp32", threads=1)


@pytest.mark.parametrize("engine", ["eager", "ort-fp32"])
def test_concurrent_requests_get_their_solo_tokens(request, tiny_checkpoint, tiny_config, engine):
    """16 requests of different prompt and output lengths, greedy and seeded sampling, over 4 slots: each gets
    exactly the tokens `generate` gives it alone; prefills run one slot each, decodes batch several."""
    path = tiny_checkpoint if engine == "eager" else request.getfixturevalue("ort_engine")
    rng = np.random.default_rng(7)
    vocab = tiny_config.vocab_size
    specs = []
    for i in range(16):
        prompt = rng.integers(3, vocab, size=int(rng.integers(1, 40))).tolist()  # + max_tokens < 96
        sampling = SamplingParams() if i % 3 else SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
        specs.append(GenerationRequest(prompt, int(rng.integers(1, 40)), sampling, seed=i))
    with load_backend(path, max_batch=1) as solo_backend:
        solo = [
            generate(solo_backend, [s.prompt_ids], s.max_tokens, s.sampling, stop_token_ids=(), seed=s.seed).tokens[0]
            for s in specs
        ]
    backend = RecordingBackend(load_backend(path, max_batch=4))
    scheduler = Scheduler(backend, max_queue=16)

    async def main():
        streams = [await scheduler.submit(spec) for spec in specs]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        results = run(main())
    finally:
        scheduler.close()
    assert [tokens for tokens, _ in results] == solo
    assert all(reason == "length" for _, reason in results)
    prefills = [slots for slots, ids in backend.steps if ids.shape[1] > 1 or len(slots) == 1]
    assert all(len(slots) == 1 for slots, ids in backend.steps if ids.shape[1] > 1)
    assert max(len(slots) for slots, _ in backend.steps) == 4 and len(prefills) >= 16
    assert scheduler.metrics.slots_busy._value.get() == 0


def test_cancel_frees_the_slot_within_one_step(tiny_checkpoint):
    backend = RecordingBackend(load_backend(tiny_checkpoint, max_batch=2))
    scheduler = Scheduler(backend)

    async def main():
        stream = await scheduler.submit(GenerationRequest([1, 5, 9], max_tokens=400))
        other = await scheduler.submit(GenerationRequest([1, 7], max_tokens=400))
        seen = 0
        async for delta in stream:
            seen += len(delta.token_ids)
            if seen >= 3:
                break
        slot = stream.request.slot
        stream.cancel()
        after_cancel = len(backend.steps)
        while stream.request.state != "done":
            await asyncio.sleep(0.001)
        steps_with_slot = [s for s, _ in backend.steps[after_cancel:] if slot in s]
        assert scheduler.metrics.slots_busy._value.get() == 1  # the other request still runs
        other.cancel()
        return steps_with_slot

    try:
        steps_with_slot = run(main())
    finally:
        scheduler.close()
    assert len(steps_with_slot) <= 1, "a cancelled request must leave its slot before the next step"
    assert scheduler.metrics.slots_busy._value.get() == 0
    assert scheduler.metrics.finished.labels("cancelled")._value.get() == 2


def test_cancelled_queued_request_never_runs(tiny_checkpoint):
    """With one slot busy, a queued request that is cancelled is never prefilled, and cancelling it neither
    stops the running request nor the one queued after it."""
    backend = RecordingBackend(load_backend(tiny_checkpoint, max_batch=1))
    scheduler = Scheduler(backend)
    marker = [1, 333, 334, 335, 336]

    async def main():
        running = await scheduler.submit(GenerationRequest([1, 5], max_tokens=30))
        queued = await scheduler.submit(GenerationRequest(marker, max_tokens=30))
        after = await scheduler.submit(GenerationRequest([1, 6], max_tokens=5))
        queued.cancel()
        return await asyncio.gather(collect(running), collect(queued), collect(after))

    try:
        (run_tokens, run_reason), (q_tokens, q_reason), (a_tokens, a_reason) = run(main())
    finally:
        scheduler.close()
    assert (q_tokens, q_reason) == ([], "cancelled")
    assert (len(run_tokens), run_reason) == (30, "length") and (len(a_tokens), a_reason) == (5, "length")
    assert not any(ids.shape[1] == len(marker) and ids[0].tolist() == marker for _, ids in backend.steps)


def test_queue_is_bounded(tiny_checkpoint):
    scheduler = Scheduler(load_backend(tiny_checkpoint, max_batch=1), max_queue=1)

    async def main():
        first = await scheduler.submit(GenerationRequest([1, 5], max_tokens=300))
        second = await scheduler.submit(GenerationRequest([1, 6], max_tokens=300))
        with pytest.raises(QueueFull):
            await scheduler.submit(GenerationRequest([1, 7], max_tokens=3))
        second.cancel()  # still queued behind `first`
        first.cancel()
        return await collect(second)

    try:
        assert run(main()) == ([], "cancelled")
    finally:
        scheduler.close()
