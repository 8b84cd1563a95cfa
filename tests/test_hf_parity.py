"""The eager reference against Hugging Face transformers' MixtralForCausalLM on the same weights.

Tolerance: fp32 prefill logits within 1e-4 absolute. Both sides compute the same fp32 math; the only
differences are summation order (attention over cache + new keys, expert accumulation), which stays
around 1e-6 relative on logits of magnitude ~10 with std-0.2 weights. Greedy tokens must be identical.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrt.model.checkpoint import load_model
from moetrt.model.mixtral import KVCache

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip

CASES = {
    "base": {},
    "head_dim_24": {"head_dim": 24},
    "experts8_top1": {"num_local_experts": 8, "num_experts_per_tok": 1},
    "sliding_window_6": {"sliding_window": 6},
    "tied_mha": {"tie_word_embeddings": True, "num_key_value_heads": 4},
}


def make_hf(tmp_path, overrides: dict, fused: bool = False, seed: int = 0):
    cfg = transformers.MixtralConfig(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    path = tmp_path / "hf"
    model.save_pretrained(path, save_original_format=not fused)
    return model, path


def greedy_hf(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, out = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids)
    return torch.cat(out, dim=1)


def greedy_moetrt(model, prompt: torch.Tensor, steps: int, max_seq: int) -> torch.Tensor:
    b, t = prompt.shape
    cache = KVCache(model.config, b, max_seq, torch.float32)
    ids, pos, out = prompt, torch.arange(t).expand(b, t), []
    with torch.inference_mode():
        for _ in range(steps):
            logits, k, v = model(ids, pos, cache.k, cache.v)
            cache.write(pos, k, v)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            pos = pos[:, -1:] + 1
            out.append(ids)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_and_greedy_tokens_match_transformers(tmp_path, case):
    hf, path = make_hf(tmp_path, CASES[case])
    ours = load_model(path)
    prompt = torch.randint(3, BASE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(prompt).logits
    cache = KVCache(ours.config, 2, 64, torch.float32)
    with torch.inference_mode():
        got, _, _ = ours(prompt, torch.arange(11).expand(2, 11), cache.k, cache.v)
    assert (got - want).abs().max().item() <= 1e-4
    assert want.abs().max().item() > 1.0  # the fixture is not so flat that any model would pass

    hf_tokens = greedy_hf(hf, prompt, 32)
    assert torch.equal(greedy_moetrt(ours, prompt, 32, max_seq=64), hf_tokens)
    assert len(set(hf_tokens[0].tolist())) > 3  # a degenerate repeat of one token would prove little


def test_fused_transformers5_layout_loads_identically(tmp_path):
    hf, path = make_hf(tmp_path, {}, fused=True)
    ours = load_model(path)
    state = hf.state_dict()
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    f = BASE["intermediate_size"]
    assert torch.equal(ours.layers[1].block_sparse_moe.w1, gate_up[:, :f])
    assert torch.equal(ours.layers[1].block_sparse_moe.w3, gate_up[:, f:])
    assert torch.equal(ours.layers[1].block_sparse_moe.w2, state["model.layers.1.mlp.experts.down_proj"])
    prompt = torch.randint(3, BASE["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy_moetrt(ours, prompt, 8, max_seq=32), greedy_hf(hf, prompt, 8))


def test_wrong_rope_theta_is_caught_by_the_fixture(tmp_path):
    """The fixture's weights are large enough that a subtle mistake changes the logits well past 1e-4."""
    hf, path = make_hf(tmp_path, {})
    ours = load_model(path)
    ours.config = dataclasses.replace(ours.config, rope_theta=1e6)
    prompt = torch.randint(3, BASE["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(1))
    cache = KVCache(ours.config, 1, 32, torch.float32)
    with torch.no_grad():
        want = hf(prompt).logits
        got, _, _ = ours(prompt, torch.arange(11)[None], cache.k, cache.v)
    assert (got - want).abs().max().item() > 1e-2
