"""The eager Mixtral reference: the one place the model's math is written down.

Everything moetrt deploys (the ONNX graph, the ONNX Runtime and TensorRT engines, the Triton kernels) is
checked against this module, and this module is checked against transformers' MixtralForCausalLM.

One `forward` serves prefill (T > 1) and decode (T = 1) over a static KV cache, and it is *functional*:
the caches [batch, kv_heads, max_seq, head_dim] are read-only inputs and the step returns the new K/V
slices [batch, kv_heads, T, head_dim]; `KVCache.write` (or a runtime) stores them at `position_ids`.
That is what makes the traced ONNX graph honest (torch.export drops in-place buffer mutations) and it
means no step ever copies a whole cache: attention reads the cache and the new slices side by side.

Per-row positions: token t of row b sits at `position_ids[b, t]`; the row's cache holds positions
`[0, position_ids[b, 0])`. Rows of one batch may therefore have different lengths.

Precision follows transformers: RMSNorm, attention softmax and the router softmax/top-k/renormalise in
fp32, everything else in the model dtype. The MoE block sums the k expert outputs in fp32 (transformers
sums them in the model dtype; the difference is visible only in fp16/bf16, see validate's tolerances).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrt.model.config import MixtralConfig, RopeScaling
from moetrt.model.rope import rope_frequencies

MoEFunction = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, bool], Tensor]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rank_experts(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The contract's ranking of every expert (moetrt/plugins/contract.py, Semantics): logits [T, E] in any
    float dtype -> (p [T, E] fp32 softmax probabilities in descending order, experts [T, E] int64).

    Tie rule: among exactly equal probabilities the HIGHER expert index ranks first, as ONNX Runtime's MoE /
    QMoE kernels order their (probability, index) pairs with std::greater. A stable descending sort of the
    experts in reverse index order gives exactly that (torch.topk's tie order is unspecified on CPU).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    ordered, order = torch.sort(probs.flip(-1), dim=-1, descending=True, stable=True)
    return ordered, probs.shape[-1] - 1 - order


def route(logits: Tensor, top_k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (experts [T, k] int64 in rank order, weights [T, k] fp32): the top-k of
    `rank_experts`, renormalised to sum 1 when `normalize`. The one routing function every moetrt
    implementation and check is compared against."""
    ordered, experts = rank_experts(logits)
    weights, experts = ordered[:, :top_k], experts[:, :top_k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def sparse_moe(
    hidden: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    top_k: int,
    normalize: bool = True,
) -> Tensor:
    """The TopKMoE op (contract: moetrt/plugins/contract.py), written plainly.

    hidden [T, H]; router_weight [E, H]; w1, w3 [E, F, H]; w2 [E, H, F] -> [T, H].
    logits = hidden @ router_weight^T (model dtype); experts and weights from `route` (fp32 softmax, top-k,
    ties to the higher expert index, renormalisation);
    out = sum_j weight_j * w2[e_j] (silu(w1[e_j] x) * (w3[e_j] x)), accumulated in fp32.
    """
    experts, weights = route(hidden @ router_weight.t(), top_k, normalize)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(router_weight.shape[0]):
        rows, slot = torch.where(experts == e)
        if rows.numel() == 0:
            continue
        x = hidden[rows]
        y = (F.silu(x @ w1[e].t()) * (x @ w3[e].t())) @ w2[e].t()
        out.index_add_(0, rows, y.float() * weights[rows, slot, None])
    return out.to(hidden.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x / sqrt(...) rather than HF's x * rsqrt(...) (equal to an ulp): the exported Pow-ReduceMean-Add-Sqrt-Div-Mul
        # chain is the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization; Reciprocal-Mul is not.
        xf = x.float()
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, head_dim] for the half-split (rotate_half) RoPE layout, computed in fp32; `scaling` is
    the config's RoPE variant (moetrt.model.rope)."""
    inv_freq, attention_scaling = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_masks(position_ids: Tensor, max_seq: int, sliding_window: int | None) -> tuple[Tensor, Tensor]:
    """Boolean masks (True = visible) for the cached keys [B, 1, 1, T, S] and the new keys [B, 1, 1, T, T].

    A query at position p sees cached key j when j < (row's cached length) and, with a sliding window W,
    p - j < W; it sees new key t' when pos(t') <= p (causal) and the same window rule.
    """
    q_pos = position_ids[:, :, None]  # [B, T, 1]
    cached_len = position_ids[:, :1, None]  # [B, 1, 1]
    key_pos = torch.arange(max_seq, device=position_ids.device)[None, None, :]  # [1, 1, S]
    see_cache = key_pos < cached_len
    new_pos = position_ids[:, None, :]  # [B, 1, T]
    see_new = new_pos <= q_pos
    if sliding_window is not None:
        see_cache = see_cache & (q_pos - key_pos < sliding_window)
        see_new = see_new & (q_pos - new_pos < sliding_window)
    return see_cache[:, None, None], see_new[:, None, None]


class Attention(nn.Module):
    """Grouped-query attention over a static cache plus the step's new keys (no cache copy, no repeat_kv)."""

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        see_cache: Tensor,
        see_new: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        d, n_kv, n_rep = self.head_dim, self.n_kv, self.n_heads // self.n_kv
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, d).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, n_kv, d).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(b, t, n_kv, d).transpose(1, 2)
        # Query head h = g * n_rep + r reads KV head g: group the queries instead of repeating the cache.
        q = q.reshape(b, n_kv, n_rep, t, d)
        scale = 1.0 / math.sqrt(d)
        # unsqueeze(2), not [:, :, None]: the indexing form exports a Slice over the batch axis that ONNX
        # Runtime executes as a whole-cache copy every step. ORT fuses the transpose into FusedMatMul.
        s_cache = (q @ k_cache.unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, R, T, S]
        s_new = (q @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, R, T, T]
        s_cache = s_cache.masked_fill(~see_cache, float("-inf"))
        s_new = s_new.masked_fill(~see_new, float("-inf"))
        probs = torch.softmax(torch.cat((s_cache, s_new), dim=-1), dim=-1, dtype=torch.float32).to(x.dtype)
        # Slices, not split(): a split at a symbolic size exports to SplitToSequence/SequenceAt, which
        # TensorRT cannot parse and ONNX does not define for bfloat16.
        p_cache, p_new = probs[..., : k_cache.shape[2]], probs[..., k_cache.shape[2] :]
        out = p_cache @ v_cache.unsqueeze(2) + p_new @ v.unsqueeze(2)  # [B, KV, R, T, D]
        out = out.reshape(b, self.n_heads, t, d).transpose(1, 2).reshape(b, t, self.n_heads * d)
        return self.o_proj(out), k, v


class SparseMoeBlock(nn.Module):
    """Router + E SwiGLU experts stored stacked: w1, w3 [E, F, H] and w2 [E, H, F]."""

    def __init__(self, config: MixtralConfig, moe_fn: MoEFunction):
        super().__init__()
        e, f, h = config.num_local_experts, config.intermediate_size, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.moe_fn = moe_fn
        self.gate = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, f, h))
        self.w3 = nn.Parameter(torch.empty(e, f, h))
        self.w2 = nn.Parameter(torch.empty(e, h, f))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.moe_fn(flat, self.gate.weight, self.w1, self.w3, self.w2, self.top_k, True)
        return out.view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, moe_fn: MoEFunction):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(config, moe_fn)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                see_cache: Tensor, see_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, see_cache, see_new)
        h = x + attn
        return h + self.block_sparse_moe(self.post_attention_layernorm(h)), k, v


class Mixtral(nn.Module):
    """Mixtral for causal LM. Parameter names follow Hugging Face's without the `model.` prefix, except
    that each layer's experts are stacked (`block_sparse_moe.w1` [E, F, H] ...), see checkpoint.py.

    `moe_fn` computes the MoE block; the exporter passes the `moetrt::TopKMoE` custom op here so the
    traced graph holds one node per layer whose eager implementation is still `sparse_moe`.
    """

    def __init__(self, config: MixtralConfig, moe_fn: MoEFunction = sparse_moe):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, moe_fn) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        k_caches: Sequence[Tensor],
        v_caches: Sequence[Tensor],
        return_hidden: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]] | tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """input_ids, position_ids [B, T] -> logits [B, T, V], new keys and values per layer [B, KV, T, D].

        With `return_hidden`, also the residual stream after each layer [B, T, H] (for validation).
        """
        cfg = self.config
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
        see_cache, see_new = attention_masks(position_ids, k_caches[0].shape[2], cfg.sliding_window)
        new_k, new_v, hidden = [], [], []
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            x, k, v = layer(x, cos, sin, k_cache, v_cache, see_cache, see_new)
            new_k.append(k)
            new_v.append(v)
            hidden.append(x)
        logits = self.lm_head(self.norm(x))
        if return_hidden:
            return logits, new_k, new_v, hidden
        return logits, new_k, new_v


class KVCache:
    """Static per-layer K/V buffers [batch, kv_heads, max_seq, head_dim], allocated once."""

    def __init__(self, config: MixtralConfig, batch: int, max_seq: int, dtype: torch.dtype, device: str = "cpu"):
        shape = (batch, config.num_key_value_heads, max_seq, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    def write(
        self, position_ids: Tensor, new_k: Sequence[Tensor], new_v: Sequence[Tensor], rows: slice | Tensor | None = None
    ) -> None:
        """Store each layer's new slices [B, KV, T, D] at their rows' positions, in place; `rows` are the cache
        rows of the B batch rows (a slice or an index tensor; default the first B)."""
        b, kv, t, d = new_k[0].shape
        index = position_ids[:, None, :, None].expand(b, kv, t, d)
        for cache_k, cache_v, k, v in zip(self.k, self.v, new_k, new_v, strict=True):
            if rows is None or isinstance(rows, slice):
                span = rows or slice(0, b)
                cache_k[span].scatter_(2, index, k)
                cache_v[span].scatter_(2, index, v)
            else:
                cache_k[rows] = cache_k[rows].scatter(2, index, k)
                cache_v[rows] = cache_v[rows].scatter(2, index, v)
