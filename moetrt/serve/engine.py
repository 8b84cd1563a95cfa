"""What the HTTP surface asks of an engine, and nothing about how the engine is reached.

The OpenAI app (`moetrt.serve.app`) talks to a `TokenEngine`: token ids in, a stream of token ids out,
cancellable. In one process that is the `Scheduler` over a backend's KV slots; behind Ray Serve it is a
handle to an engine replica. Text (tokenizer, chat template, detokenizer, stop strings) stays on the app's
side, so an engine replica needs only token ids.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from moetrt.runtime.sampling import SamplingParams

# Why a request ended. "stop": a stop token (the token is the request's last output token) or, decided by
# the app, a stop string; "length": max_tokens reached; "cancelled": the client went away or the app cut it;
# "error": the engine step failed (the engine keeps serving the others).
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFull(Exception):
    """Every slot is busy and the wait queue holds its maximum: the client should retry later (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine is loading, shutting down, or failed a step (HTTP 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Checked by the caller against the engine's limits before submission:
    1 <= len(prompt_ids), len(prompt_ids) + max_tokens <= max_seq_len, ids inside the vocabulary."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0  # seeds the request's own numpy Generator: its draws do not depend on its batch-mates
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Delta:
    """What the engine produced for one request since the last delta: new token ids (a stop token that
    ended the request included), and the finish reason on the last delta."""

    token_ids: list[int]
    finish_reason: str | None = None


class TokenStream(Protocol):
    """The deltas of one submitted request, ending with one that carries a finish reason."""

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def cancel(self) -> None:
        """End the request now: a queued request never runs, a running one frees its slot before the next
        step. Idempotent; safe after the request finished."""
        ...


class TokenEngine(Protocol):
    """Continuous batching over an engine's KV slots, as the app sees it."""

    slots: int  # KV slots (the engine's max_batch): how many requests generate at once
    max_seq_len: int  # prompt + generated tokens per request
    vocab_size: int

    async def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue `request`; raises QueueFull or EngineUnavailable instead of queueing."""
        ...
