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


# Mixtral-8x7B-Instruct-v0.1's chat template as its tokenizer_config.json on the Hub ships it.
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def realistic_config(dtype: str = "bfloat16") -> MixtralConfig:
    """Mixtral-8x7B-Instruct-v0.1's config with tiny dimensions: its vocabulary (32000), 8 experts top-2, GQA
    (4 query heads per KV head like the original's 32/8), rope_theta 1e6, 32768 positions, untied embeddings."""
    return MixtralConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=dtype,
        bos_token_id=1, eos_token_ids=(2,),
    )  # fmt: skip


def make_realistic_checkpoint(
    out_dir: str | Path, sentencepiece_model: str | Path | None = None, seed: int = 0, std: float = 0.02
) -> Path:
    """A checkpoint laid out like the Hub's mistralai/Mixtral-8x7B-Instruct-v0.1 with tiny dimensions.

    config.json and generation_config.json with the Hub's fields; bf16 weights in 3 shards + index (per-expert
    w1/w2/w3 names, as the Hub's); the REAL Mixtral sentencepiece model as tokenizer.model (by default the copy
    mistral-common ships as `mistral_common/data/tokenizer.model.v1`), a tokenizer.json converted from it in
    the Hub's legacy Llama layout (`moetrt.model.tokenizer.from_sentencepiece`); tokenizer_config.json with the
    Instruct chat template and special_tokens_map.json as on the Hub. Weights N(0, std): the Hub's
    initializer_range 0.02 by default, which spreads logits more like a trained model than the std-0.2 presets.
    """
    import json
    import shutil

    from moetrt.model.tokenizer import from_sentencepiece
    from moetrt.names import GENERATION_CONFIG, SENTENCEPIECE_MODEL

    if sentencepiece_model is None:
        import mistral_common

        sentencepiece_model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    config = realistic_config()
    state = random_state(config, seed, std)
    total = sum(t.numel() * t.element_size() for t in state.values())
    out = save_checkpoint(state, config, out_dir, max_shard_bytes=total // 3 + 1)
    hub = {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": config.hidden_size, "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "model_type": "mixtral", "num_attention_heads": config.num_attention_heads,
        "num_experts_per_tok": config.num_experts_per_tok, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads, "num_local_experts": config.num_local_experts,
        "output_router_logits": False, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True,
        "vocab_size": config.vocab_size,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    generation = {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.36.0.dev0",
    }
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(sentencepiece_model, out / SENTENCEPIECE_MODEL)
    from_sentencepiece(out / SENTENCEPIECE_MODEL).save(str(out / TOKENIZER))
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    specials = dict(zip(("unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS, strict=True))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": text, **token, "special": True} for i, text in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": MIXTRAL_INSTRUCT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {key: {"content": text, **token} for key, text in specials.items()}
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(special_map, indent=2) + "\n")
    return out
