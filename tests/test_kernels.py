"""The Triton TopKMoE kernels against the eager reference `sparse_moe` and against each kernel's torch reference.

Without CUDA the kernels run in triton's interpreter on CPU tensors: TRITON_INTERPRET must be set before
triton and the kernel modules are imported (triton picks interpreter or compiler when a function is
decorated, its own standard library included, and checks the setting again on lazy imports), so this module
sets it for the rest of the process; nothing else can run triton on a machine without CUDA anyway. With
CUDA the same tests run compiled on the GPU, plus the `gpu` tests at deployment sizes.

Tolerances (max |kernel - reference| as a fraction of max |reference|, measured on 6 seeds x 4 shapes in the
interpreter): fp32 2.8e-7, asserted <= 2e-6 (fp32 accumulation in a different order: ~sqrt(K) unit
roundoffs); fp16 2.3e-4, asserted <= 2e-3 (about two fp16 ulps, 2^-10 each, of the largest output: both
sides round the logits, both projections, silu, the gated product and each expert output to fp16, so a
rounding boundary crossed differently moves the result by an ulp). bf16 (GPU only) is asserted <= 1.6e-2,
two bf16 ulps (2^-8 each); not measured here, as this machine has no GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from moetrt.model import mixtral  # noqa: E402
from moetrt.model.mixtral import sparse_moe  # noqa: E402
from moetrt.plugins.kernels import geometry  # noqa: E402
from moetrt.plugins.kernels.align import align, align_reference  # noqa: E402
from moetrt.plugins.kernels.combine import combine, combine_reference  # noqa: E402
from moetrt.plugins.kernels.expert_gemm import (  # noqa: E402
    expert_gemm1,
    expert_gemm1_reference,
    expert_gemm2,
    expert_gemm2_reference,
)
from moetrt.plugins.kernels.fused import fused_topk_moe, moe_dims  # noqa: E402
from moetrt.plugins.kernels.routing import route, route_kernel  # noqa: E402

if not CUDA and not isinstance(route_kernel, InterpretedFunction):
    pytest.skip("the kernels were imported (compiled mode) before TRITON_INTERPRET was set", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
H, F = 32, 64  # small: the interpreter executes every program in Python
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def route_reference(hidden: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool):
    """The contract's routing (`moetrt.model.mixtral.route`) with int32 ids, as the kernel returns them."""
    ids, weights = mixtral.route(hidden @ router.t(), top_k, normalize)
    return ids.to(torch.int32), weights


def make_layer(t: int, e: int, dtype: torch.dtype, seed: int = 0, h: int = H, f: int = F,
               stds: tuple[float, float, float] = (0.5, 0.5, 0.5)):  # fmt: skip
    """hidden, router_weight, w1, w3, w2 (stds of hidden, router, experts) far from trivial routing and SwiGLU."""
    gen = torch.Generator().manual_seed(seed)

    def rand(std: float, *shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(DEVICE)

    x, r, w = stds
    return rand(x, t, h), rand(r, e, h), rand(w, e, f, h), rand(w, e, f, h), rand(w, e, h, f)


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max |diff| {err:.3g} > {TOLERANCE[dtype]} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_fused_matches_sparse_moe(tokens, experts, top_k, dtype):
    layer = make_layer(tokens, experts, dtype, seed=tokens)
    out = fused_topk_moe(*layer, top_k, block_m=16)
    assert out.shape == (tokens, H) and out.dtype == dtype
    assert_close_to_scale(out, sparse_moe(*layer, top_k), dtype)


def test_fused_default_block_m_and_out_buffer():
    layer = make_layer(64, 8, torch.float32, seed=3)
    out = torch.full((64, H), float("nan"), device=DEVICE)
    result = fused_topk_moe(*layer, 2, out=out)
    assert result is out
    assert_close_to_scale(out, sparse_moe(*layer, 2), torch.float32)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_reference(normalize):
    hidden, router, *_ = make_layer(64, 8, torch.float32, seed=1)
    dims = geometry.MoeDims(H, F, 8, 2, normalize)
    ids, weights = route(hidden, router, dims)
    ref_ids, ref_weights = route_reference(hidden, router, 2, normalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-6)
    if normalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(64, device=DEVICE))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_tie_rule_higher_index_first(top_k):
    """Experts 1, 3 and 6 get identical logits that beat the others by >= 34: the higher index comes first.
    Small integers make every logit exact in any summation order, so the tie is exact on any backend."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randint(-1, 2, (16, H), generator=gen).float()
    router = torch.randint(-1, 2, (8, H), generator=gen).float()
    hidden[:, 0], router[:, 0] = 16.0, -1.0
    router[[1, 3, 6]] = router[1].clone()
    router[[1, 3, 6], 0] = 5.0
    hidden, router = hidden.to(DEVICE), router.to(DEVICE)
    ids, weights = route(hidden, router, geometry.MoeDims(H, F, 8, top_k))
    expected = torch.tensor([6, 3, 1][:top_k], dtype=torch.int32, device=DEVICE).expand(16, top_k)
    assert torch.equal(ids, expected)
    assert torch.equal(ids, route_reference(hidden, router, top_k, True)[0])
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / top_k))


@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 2), (8, 3)])
def test_route_all_tied(experts, top_k):
    """A zeroed router ties every expert: the kernel takes the k highest indices, as `mixtral.route` does."""
    hidden, router, *_ = make_layer(16, experts, torch.float32, seed=3)
    router.zero_()
    ids, weights = route(hidden, router, geometry.MoeDims(H, F, experts, top_k))
    expected = torch.arange(experts - 1, experts - 1 - top_k, -1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(ids, expected.expand(16, top_k))
    assert torch.equal(ids, route_reference(hidden, router, top_k, True)[0])
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / top_k))


def skewed_layer(t: int, e: int, dtype: torch.dtype, logit_bias: list[float]):
    """A layer whose hidden[:, 0] is large and positive, so router_weight[:, 0] = logit_bias steers routing."""
    hidden, router, w1, w3, w2 = make_layer(t, e, dtype, seed=5)
    hidden[:, 0] = hidden[:, 0].abs() + 4.0
    router[:, 0] = torch.tensor(logit_bias, dtype=dtype, device=DEVICE)
    return hidden, router, w1, w3, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_receiving_no_tokens(dtype):
    layer = skewed_layer(64, 8, dtype, [0.0, 0.0, 0.0, 0.0, -12.0, -12.0, -12.0, -12.0])
    dims = moe_dims(*layer, 2, True, 16)
    al = align(route(layer[0], layer[1], dims)[0], dims)
    counts = al.counts.cpu()
    assert counts[4:].sum() == 0 and counts[:4].sum() == 128
    assert set(al.block_expert.cpu().tolist()) <= {-1, 0, 1, 2, 3}
    assert_close_to_scale(fused_topk_moe(*layer, 2, block_m=16), sparse_moe(*layer, 2), dtype)


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_routed_to_one_expert(top_k):
    layer = skewed_layer(64, 4, torch.float32, [0.0, 0.0, 12.0, 0.0])
    dims = moe_dims(*layer, top_k, True, 16)
    ids, _ = route(layer[0], layer[1], dims)
    assert (ids[:, 0] == 2).all()
    al = align(ids, dims)
    assert al.counts[2].item() == 64 and al.offsets[3].item() - al.offsets[2].item() == 64
    assert_close_to_scale(fused_topk_moe(*layer, top_k, block_m=16), sparse_moe(*layer, top_k), torch.float32)


def random_topk_ids(t: int, e: int, k: int, seed: int) -> torch.Tensor:
    """Distinct experts per token, uniformly at random (what any router produces, tie rule aside)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (7, 4, 1, 16), (64, 8, 2, 16),
                                                          (300, 8, 2, 64), (1000, 16, 4, 32)])  # fmt: skip
def test_align_matches_reference_and_invariants(tokens, experts, top_k, block_m):
    ids = random_topk_ids(tokens, experts, top_k, seed=tokens)
    dims = geometry.MoeDims(H, F, experts, top_k, block_m=block_m)
    al = align(ids, dims)
    for got, want in zip(al, align_reference(ids, dims), strict=True):
        assert torch.equal(got.cpu(), want)

    counts, offsets, sorted_ids, block_expert = (x.cpu().long() for x in al)
    pairs = tokens * top_k
    flat = ids.cpu().reshape(-1).long()
    assert sorted_ids.numel() == geometry.rows_bound(tokens, dims) == pairs + experts * (block_m - 1)
    assert block_expert.numel() == geometry.blocks_bound(tokens, dims)
    assert torch.equal(counts, torch.bincount(flat, minlength=experts))
    assert offsets[0] == 0 and (offsets % block_m == 0).all()
    assert torch.equal(offsets[1:] - offsets[:-1], (counts + block_m - 1) // block_m * block_m)
    total = int(offsets[-1])
    assert total <= sorted_ids.numel()
    real = sorted_ids[sorted_ids < pairs]
    assert torch.equal(torch.sort(real).values, torch.arange(pairs))  # every pair exactly once
    assert (sorted_ids[total:] == pairs).all()  # sentinels past the total
    for e in range(experts):
        run = sorted_ids[offsets[e] : offsets[e + 1]]
        n = int(counts[e])
        assert torch.equal(run[:n], torch.nonzero(flat == e).flatten())  # this expert's pairs, ascending
        assert (run[n:] == pairs).all()
        assert (block_expert[offsets[e] // block_m : offsets[e + 1] // block_m] == e).all()
    assert (block_expert[total // block_m :] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expert_gemms_and_combine_match_references(dtype):
    """Each stage against its torch reference, fed the previous stage's kernel output (errors do not compound)."""
    tokens, experts, top_k = 40, 8, 2
    hidden, router, w1, w3, w2 = make_layer(tokens, experts, dtype, seed=7)
    dims = moe_dims(hidden, router, w1, w3, w2, top_k, True, 16)
    ids, weights = route(hidden, router, dims)
    al = align(ids, dims)
    total = al.offsets[-1].item()
    cpu = [x.cpu() for x in (hidden, w1, w3, w2)]

    inter = expert_gemm1(hidden, w1, w3, al, dims)
    inter_ref = expert_gemm1_reference(cpu[0], cpu[1], cpu[2], al, dims)
    assert_close_to_scale(inter[:total].cpu(), inter_ref[:total], dtype)

    expert_out = expert_gemm2(inter, w2, al, tokens, dims)
    assert_close_to_scale(expert_out.cpu(), expert_gemm2_reference(inter.cpu(), cpu[3], al, tokens, dims), dtype)

    out = combine(expert_out, weights, dims)
    assert_close_to_scale(out.cpu(), combine_reference(expert_out.cpu(), weights.cpu()), dtype)


def test_fused_is_deterministic():
    layer = make_layer(64, 8, torch.float16, seed=11)
    assert torch.equal(fused_topk_moe(*layer, 2, block_m=16), fused_topk_moe(*layer, 2, block_m=16))


def test_rejects_inconsistent_layers():
    hidden, router, w1, w3, w2 = make_layer(4, 4, torch.float32)
    with pytest.raises(ValueError, match="w2: shape"):
        fused_topk_moe(hidden, router, w1, w3, w2.transpose(1, 2).contiguous(), 1)
    with pytest.raises(ValueError, match="contiguous"):
        fused_topk_moe(hidden.t().contiguous().t(), router, w1, w3, w2, 1)
    with pytest.raises(ValueError, match="top_k"):
        fused_topk_moe(hidden, router, w1, w3, w2, 5)


# ---- GPU: deployment dtypes and sizes -------------------------------------------------------------------


def routing_flips(hidden: torch.Tensor, router: torch.Tensor, top_k: int, ids: torch.Tensor) -> torch.Tensor:
    """Tokens whose kernel routing differs from eager; each must be a near-tie in eager (relative gap between
    the k-th and (k+1)-th probability < 2%, i.e. within a few bf16 roundings of the logits)."""
    ref_ids, _ = route_reference(hidden, router, top_k, False)
    flipped = (torch.sort(ids, -1).values != torch.sort(ref_ids, -1).values).any(-1)
    probs = torch.sort(torch.softmax((hidden @ router.t()).float(), -1), -1, descending=True).values
    gap = (probs[:, top_k - 1] - probs[:, top_k]) / probs[:, top_k - 1]
    assert (gap[flipped] < 2e-2).all(), f"routing flips on tokens with a clear eager margin: {gap[flipped]}"
    return flipped


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 512, 4096])
def test_gpu_fused_matches_eager(tokens, dtype):
    h, f, experts, top_k = 1024, 3584, 8, 2
    layer = make_layer(tokens, experts, dtype, seed=tokens, h=h, f=f, stds=(1.0, 0.1, 0.03))
    out = fused_topk_moe(*layer, top_k)
    ref = sparse_moe(*layer, top_k)
    ids, _ = route(layer[0], layer[1], moe_dims(*layer, top_k, True))
    keep = ~routing_flips(layer[0], layer[1], top_k, ids)
    assert keep.float().mean() > 0.99
    assert_close_to_scale(out[keep], ref[keep], dtype)
