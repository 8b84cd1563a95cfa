"""The generation loop every backend shares: one batched prefill, then lock-step decode, streamed per step.

Prefill runs all rows in one [B, T] step with right padding: row b's real tokens sit at positions
0..len_b-1 and its pad tokens continue at len_b..T-1. The pads are harmless: attention is causal by
position, so no real token sees them, and in decode a row at position p only sees cache slots < p (see
`attention_masks` in moetrt/model/mixtral.py), so the pad K/V written at slots >= len_b stay invisible
until decode overwrites them. Each row's first token comes from its logits at its last real token.

Decode then runs all rows together, T=1, each at its own position. A row stops at a stop token (which is
kept as its last output token) or after `max_new_tokens`. Finished rows keep riding along: backends run a
batch whose rows own fixed cache slots, so compacting the batch would mean moving caches. Their sampled
tokens are fed back and discarded, and their output is frozen; the loop ends when every row has finished.
Positions stay below `len_b + max_new_tokens <= max_seq_len` for every row, finished or not.

The request is checked once, before anything runs. The per-step path does no validation, allocates no K/V
(the backend owns the buffers) and copies no logits: decode samples from a [B, V] view of the step's output
(prefill copies out the [B, V] rows at each row's last real token).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.runtime.backend import Backend
from moetrt.runtime.sampling import GREEDY, SamplingParams, sample

PAD_TOKEN_ID = 0  # fed at prefill pad positions; any in-vocabulary id works (see the module docstring)


@dataclass(frozen=True)
class StepEvent:
    """What one step produced. Step 0 is the token sampled from the prefill logits."""

    step: int
    tokens: list[int | None]  # the new token per row; None for a row that had finished before this step
    finished: list[int]  # the rows that finished at this step


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row; a stop token that ended a row is included
    finish_reasons: list[str]  # per row: "stop" (a stop token or `Generation.stop`) or "length" (max_new_tokens)
    prefill_ms: float  # the prefill step alone
    ttft_ms: float  # time to first token: input preparation, prefill and sampling of step 0
    decode_ms: float  # the decode steps (backend step, sampling, bookkeeping), excluding the consumer's time
    decode_steps: int
    decode_tokens: int  # tokens produced by unfinished rows during decode (step 0 excluded)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0


class Generation:
    """One generation run as an iterator of `StepEvent`s; iterating drives the backend.

    Built by `stream`, which checks the request first. `result()` runs whatever steps are left and returns
    the `GenerationResult`, so `generate` is `stream(...).result()`.
    """

    def __init__(
        self,
        backend: Backend,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_token_ids: Sequence[int],
        seed: int,
    ):
        self.backend = backend
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_token_ids = frozenset(stop_token_ids)
        self.rng = np.random.default_rng(seed)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str] = [""] * len(prompts)
        self.prefill_ms = self.ttft_ms = self.decode_ms = 0.0
        self.decode_steps = self.decode_tokens = 0
        self._active = list(range(len(prompts)))
        self._events = self._run()

    def __iter__(self) -> Iterator[StepEvent]:
        return self

    def __next__(self) -> StepEvent:
        return next(self._events)

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return GenerationResult(
            tokens=self.tokens,
            finish_reasons=self.finish_reasons,
            prefill_ms=self.prefill_ms,
            ttft_ms=self.ttft_ms,
            decode_ms=self.decode_ms,
            decode_steps=self.decode_steps,
            decode_tokens=self.decode_tokens,
        )

    def stop(self, row: int) -> None:
        """Finish `row` now with reason "stop" (its consumer found a stop string in its text), keeping its tokens
        so far. The run ends once every row has finished."""
        if row in self._active:
            self.finish_reasons[row] = "stop"
            self._active.remove(row)

    def _run(self) -> Iterator[StepEvent]:
        start = time.perf_counter()
        b = len(self.prompts)
        lengths = np.array([len(p) for p in self.prompts], dtype=np.int64)
        input_ids = np.full((b, int(lengths.max())), PAD_TOKEN_ID, dtype=np.int64)
        for row, prompt in enumerate(self.prompts):
            input_ids[row, : len(prompt)] = prompt
        position_ids = np.tile(np.arange(input_ids.shape[1], dtype=np.int64), (b, 1))
        t0 = time.perf_counter()
        logits = self.backend.step(input_ids, position_ids)
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        next_tokens = sample(logits[np.arange(b), lengths - 1], self.sampling, self.rng)
        event = self._record(0, next_tokens)
        self.ttft_ms = (time.perf_counter() - start) * 1e3
        yield event

        # The decode inputs are two [B, 1] arrays, updated in place after each step.
        input_ids = next_tokens.astype(np.int64).reshape(b, 1)
        position_ids = lengths.reshape(b, 1).copy()
        for step in range(1, self.max_new_tokens):
            if not self._active:
                return
            t0 = time.perf_counter()
            logits = self.backend.step(input_ids, position_ids)
            next_tokens = sample(logits[:, -1], self.sampling, self.rng)
            self.decode_tokens += len(self._active)
            event = self._record(step, next_tokens)
            input_ids[:, 0] = next_tokens
            position_ids += 1
            self.decode_steps += 1
            self.decode_ms += (time.perf_counter() - t0) * 1e3
            yield event

    def _record(self, step: int, next_tokens: np.ndarray) -> StepEvent:
        """Append each unfinished row's token to its output and retire the rows that are done."""
        values = next_tokens.tolist()
        new: list[int | None] = [None] * len(values)
        finished = []
        for row in self._active:
            token = new[row] = values[row]
            self.tokens[row].append(token)
            if token in self.stop_token_ids:
                self.finish_reasons[row] = "stop"
                finished.append(row)
            elif len(self.tokens[row]) == self.max_new_tokens:
                self.finish_reasons[row] = "length"
                finished.append(row)
        if finished:
            self._active = [row for row in self._active if row not in finished]
        return StepEvent(step=step, tokens=new, finished=finished)


def stream(
    backend: Backend,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
) -> Generation:
    """Check the request (raising `MoetrtError` before anything runs) and return the run as an iterator of
    per-step events. `stop_token_ids` defaults to the model's EOS ids; pass () to always run to
    `max_new_tokens`."""
    check_request(backend, prompts, max_new_tokens)
    if stop_token_ids is None:
        stop_token_ids = backend.config.eos_token_ids
    return Generation(backend, prompts, max_new_tokens, sampling, stop_token_ids, seed)


def generate(
    backend: Backend,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams = GREEDY,
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt in one batch; see `stream` for the arguments."""
    return stream(backend, prompts, max_new_tokens, sampling, stop_token_ids, seed).result()


def check_request(backend: Backend, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse, with one line naming the numbers, what the backend cannot run."""
    if not prompts:
        raise MoetrtError("no prompts: expected at least one list of token ids")
    if len(prompts) > backend.max_batch:
        raise MoetrtError(f"batch of {len(prompts)} prompts exceeds the engine's max batch {backend.max_batch}")
    if max_new_tokens < 1:
        raise MoetrtError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
    vocab = backend.config.vocab_size
    for i, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {i}"
        if len(prompt) == 0:
            raise MoetrtError(f"{name} is empty: expected at least one token id")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise MoetrtError(f"{name}: expected a flat list of integer token ids, found {ids.dtype} {list(ids.shape)}")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            raise MoetrtError(
                f"{name}: token id {ids[bad[0]]} at position {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        if len(prompt) + max_new_tokens > backend.max_seq_len:
            raise MoetrtError(
                f"{name} of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the engine's "
                f"max sequence length {backend.max_seq_len}"
            )
