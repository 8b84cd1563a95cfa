"""What the engine and the eager model are both fed: prompts, batches, and Polygraphy feed dicts.

Prompts come from a text file (one per line, tokenized with the checkpoint's tokenizer) and/or are drawn
from a seeded generator, so a run is reproducible and needs no data set. Batches keep the prompts'
unequal lengths: right padding is part of what an engine must get right (see moetrt/runtime/generate.py).

A batch becomes two feed dicts over the graph's own I/O names (moetrt/runtime/backend.py):
  prefill  the right-padded prompts at positions 0..T-1 over empty caches;
  decode   each row's next (eager greedy) token at its own position over the caches eager filled,
so both graphs read a populated cache without either side's cache bookkeeping involved.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrt import names as io
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.model.tokenizer import Tokenizer
from moetrt.runtime.generate import PAD_TOKEN_ID

RANDOM_LENGTHS = (5, 24)  # random prompts draw their lengths from this range (inclusive): unequal rows


@dataclass(frozen=True)
class Prompt:
    label: str  # "random 3" or "file line 7": what the report names
    ids: list[int]


@dataclass(frozen=True)
class Feed:
    """One Polygraphy feed dict and which of its [batch, seq] tokens are real (not padding)."""

    kind: str  # "prefill" | "decode"
    feed: OrderedDict[str, np.ndarray]
    real: np.ndarray  # bool [batch, seq]


def load_prompts(
    checkpoint_dir: str | Path,
    config: MixtralConfig,
    prompts_file: str | Path | None,
    num_random: int,
    seed: int,
) -> list[Prompt]:
    """The file's prompts (tokenized, BOS first) followed by `num_random` seeded random ones."""
    prompts = []
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise MoetrtError(f"{path}: prompts file not found; expected one prompt per line")
        tokenizer = Tokenizer.from_dir(checkpoint_dir)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise MoetrtError(f"{path}: not UTF-8 text (byte {err.start}); expected one prompt per line") from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                prompts.append(Prompt(f"file line {number}", tokenizer.encode(line)))
        if not prompts:
            raise MoetrtError(f"{path}: no prompts; expected one prompt per line")
    if num_random < 0:
        raise MoetrtError(f"num_random: expected a non-negative integer, found {num_random}")
    rng = np.random.default_rng(seed)
    bos = [] if config.bos_token_id is None else [config.bos_token_id]
    low = min(3, config.vocab_size - 1)  # past the special tokens
    for n in range(num_random):
        length = int(rng.integers(RANDOM_LENGTHS[0], RANDOM_LENGTHS[1] + 1))
        ids = bos + rng.integers(low, config.vocab_size, size=length - len(bos)).tolist()
        prompts.append(Prompt(f"random {n}", ids))
    if not prompts:
        raise MoetrtError("no prompts: give a prompts file or num_random >= 1")
    return prompts


def batches(prompts: list[Prompt], batch: int) -> list[list[Prompt]]:
    if batch < 1:
        raise MoetrtError(f"batch: expected a positive integer, found {batch}")
    return [prompts[i : i + batch] for i in range(0, len(prompts), batch)]


def check_fits(prompts: list[Prompt], steps: int, max_seq_len: int) -> None:
    """Refuse, before anything runs, a prompt that cannot be decoded for `steps` within the engine's caches."""
    if steps < 1:
        raise MoetrtError(f"steps: expected a positive integer, found {steps}")
    for prompt in prompts:
        if len(prompt.ids) + steps > max_seq_len:
            raise MoetrtError(
                f"{prompt.label}: {len(prompt.ids)} tokens + {steps} steps exceed the engine's max sequence "
                f"length {max_seq_len}; use shorter prompts or fewer steps"
            )


def prefill_feed(rows: list[Prompt], config: MixtralConfig, max_seq_len: int, cache_dtype: np.dtype) -> Feed:
    """Right-padded prompts at positions 0..T-1 over zero caches (what `generate` feeds at prefill)."""
    lengths = [len(p.ids) for p in rows]
    b, t = len(rows), max(lengths)
    ids = np.full((b, t), PAD_TOKEN_ID, dtype=np.int64)
    for row, prompt in enumerate(rows):
        ids[row, : len(prompt.ids)] = prompt.ids
    positions = np.tile(np.arange(t, dtype=np.int64), (b, 1))
    shape = (b, config.num_key_value_heads, max_seq_len, config.head_dim)
    caches = {name(i): np.zeros(shape, cache_dtype) for i in range(config.num_hidden_layers)
              for name in (io.past_key, io.past_value)}  # fmt: skip
    real = np.arange(t)[None, :] < np.array(lengths)[:, None]
    return Feed("prefill", OrderedDict({io.INPUT_IDS: ids, io.POSITION_IDS: positions, **caches}), real)


def decode_feed(
    rows: list[Prompt],
    next_tokens: np.ndarray,
    caches: dict[str, np.ndarray],
) -> Feed:
    """Each row's next token at position len(prompt) over caches holding its prompt (one decode step)."""
    ids = np.asarray(next_tokens, dtype=np.int64).reshape(len(rows), 1)
    positions = np.array([[len(p.ids)] for p in rows], dtype=np.int64)
    feed = OrderedDict({io.INPUT_IDS: ids, io.POSITION_IDS: positions, **caches})
    return Feed("decode", feed, np.ones((len(rows), 1), dtype=bool))
