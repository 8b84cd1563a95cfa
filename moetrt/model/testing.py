"""Tiny seeded-random Mixtral checkpoints in the Hugging Face layout, for tests, demos and benchmarks.

Weights are drawn with a large std (default 0.2): with transformers' default 0.02 the logits stay so
flat that a wrong RoPE theta or swapped w1/w3 still gives identical greedy tokens, and tests pass
vacuously. The tokenizer is a real byte-level BPE trained with `tokenizers` on a built-in text, with
Mixtral's special tokens at Mixtral's ids (<unk>=0, <s>=1, </s>=2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moetrt.model.checkpoint import canonical_shapes, save_checkpoint
from moetrt.model.config import MixtralConfig
from moetrt.model.mixtral import TORCH_DTYPES
from moetrt.names import SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

CORPUS = """\
Mixture-of-Experts language models route every token to a few experts out of many. Mixtral uses eight
SwiGLU experts per layer and sends each token to the two with the highest router scores, so a forward pass
touches about a quarter of the expert weights. The router is a linear layer followed by a softmax; the two
largest probabilities are renormalised to sum to one and weight the experts' outputs.
Deployment engineers export the model to a portable graph, build an engine for their hardware, and check
that the engine computes what the eager model computes: logits, hidden states, routing decisions, tokens.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick
daft zebras jump! Sphinx of black quartz, judge my vow. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
Grouped-query attention shares each key and value head among several query heads; rotary position
embeddings rotate queries and keys by an angle that grows with the position; a static key-value cache
holds the keys and values of every past token so that decoding one more token is cheap.
"""


def random_state(
    config: MixtralConfig, seed: int = 0, std: float = 0.2, zero_router: bool = False
) -> dict[str, torch.Tensor]:
    """Canonical tensors with N(0, std) weights and N(1, 0.1) norm scales, reproducible from `seed`.

    `zero_router` zeroes every router weight: every token's experts are then exactly tied, and the op
    contract's tie rule alone decides the routing (moetrt/plugins/contract.py)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = TORCH_DTYPES[config.dtype]
    state = {}
    for name, shape in canonical_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        if zero_router and name.endswith("block_sparse_moe.gate.weight"):
            t = torch.zeros(shape)
        state[name] = t.to(dtype)
    return state


def train_tokenizer(vocab_size: int, path: Path) -> None:
    """A byte-level BPE with at most `vocab_size` pieces (fewer when the corpus runs out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(SPECIAL_TOKENS)),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.save(str(path))


def write_tokenizer_config(directory: Path) -> None:
    """tokenizer_config.json and special_tokens_map.json as transformers writes them for a Llama-style tokenizer:
    BOS added in front of every prompt, Mixtral's special tokens."""
    import json

    special = dict(zip(("unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS, strict=True))
    config = {"add_bos_token": True, "add_eos_token": False, **special, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (directory / SPECIAL_TOKENS_MAP).write_text(json.dumps(special, indent=2) + "\n")


def make_checkpoint(
    out_dir: str | Path,
    config: MixtralConfig,
    seed: int = 0,
    std: float = 0.2,
    fused: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    zero_router: bool = False,
) -> Path:
    """Write a seeded-random checkpoint (config.json, safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) to `out_dir` (`random_state` for `std` and `zero_router`)."""
    if config.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {config.vocab_size} is too small for a byte-level tokenizer (>= 259)")
    out = save_checkpoint(
        random_state(config, seed, std, zero_router), config, out_dir, fused=fused, max_shard_bytes=max_shard_bytes
    )
    train_tokenizer(config.vocab_size, out / TOKENIZER)
    write_tokenizer_config(out)
    return out
