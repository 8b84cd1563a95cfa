"""Where `moetrt demo` and `moetrt bench --preset` keep what they make: $MOETRT_CACHE, else ~/.cache/moetrt.

Seeded preset checkpoints live in `checkpoints/{preset}-seed{seed}` and are reused while intact, so only the
first run pays for making them (the mid preset is 3.2 GB of weights).
"""

from __future__ import annotations

import os
from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.fsutil import atomic_dir
from moetrt.model.checkpoint import CheckpointReader
from moetrt.model.config import MixtralConfig, preset
from moetrt.model.testing import make_checkpoint
from moetrt.names import TOKENIZER, TOKENIZER_CONFIG


def cache_root() -> Path:
    return Path(os.environ.get("MOETRT_CACHE") or Path.home() / ".cache" / "moetrt")


def preset_checkpoint(name: str, seed: int = 0) -> tuple[Path, bool]:
    """The seeded-random checkpoint of preset `name` in the cache: (directory, whether it was reused).

    Made atomically (a temporary sibling renamed into place), so a directory that exists was complete when
    written; it is reused if its config is the preset's and every tensor is present with its shape."""
    config = preset(name)
    path = cache_root() / "checkpoints" / f"{name}-seed{seed}"
    if _intact(path, config):
        return path, True
    with atomic_dir(path) as tmp:
        make_checkpoint(tmp, config, seed=seed)
    return path, False


def _intact(path: Path, config: MixtralConfig) -> bool:
    if not (path / TOKENIZER).is_file() or not (path / TOKENIZER_CONFIG).is_file():
        return False
    try:
        with CheckpointReader(path) as reader:
            reader.validate()
            return reader.config == config
    except MoetrtError:
        return False
