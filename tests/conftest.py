"""Shared fixtures: tiny seeded-random Mixtral checkpoints in the Hugging Face layout."""

from __future__ import annotations

import dataclasses

import pytest

from moetrt.model.config import PRESETS, MixtralConfig
from moetrt.model.testing import make_checkpoint


@pytest.fixture(scope="session")
def tiny_config() -> MixtralConfig:
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    """A tiny fp32 checkpoint with a tokenizer; shared read-only by the whole session."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config, seed=0)


@pytest.fixture
def checkpoint_factory(tmp_path):
    """Make a checkpoint for a variant of the tiny config: factory(**overrides, seed=0, fused=False)."""

    def make(seed: int = 0, fused: bool = False, **overrides):
        config = dataclasses.replace(PRESETS["tiny"], **overrides)
        return make_checkpoint(tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}", config, seed=seed, fused=fused)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models run fastest on one thread (8x faster than two on a shared two-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def realistic_checkpoint(tmp_path_factory):
    """Laid out like the Hub's Mixtral-8x7B-Instruct-v0.1 (tiny dims, bf16, 3 shards, the real Mixtral
    sentencepiece tokenizer from mistral-common, the Instruct chat template); shared read-only."""
    from moetrt.model.testing import make_realistic_checkpoint

    return make_realistic_checkpoint(tmp_path_factory.mktemp("realistic") / "mixtral-8x7b-instruct-tiny")
