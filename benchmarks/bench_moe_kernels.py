"""Benchmark the fused Triton TopKMoE forward against the eager reference and the weight-bandwidth bound.

    python benchmarks/bench_moe_kernels.py [--dtypes float16 bfloat16] [--tokens 1 16 512 4096] [--json PATH]

Mixtral-8x7B sizes by default (H=4096, F=14336, E=8, k=2), one layer. For each T and dtype: median time of
`fused_topk_moe` and of `sparse_moe` (CUDA events, after warm-up), and the bandwidth bound = bytes of the
experts the routing actually selects (3*F*H each, plus the router) / the device's measured copy bandwidth.
At small T the op is weight-bandwidth bound, so `bound / fused` is the fraction of peak reached; at large T
it becomes compute bound and the bound is only a floor. GPU only: exits with a message without CUDA.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from moetrt.model.mixtral import TORCH_DTYPES, sparse_moe


def time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds per call, timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device memory bandwidth from a large device-to-device copy (bytes read + written per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=2, iters=10)
    return 2 * nbytes / ms / 1e6


def bench_dtype(dtype_name: str, tokens: list[int], h: int, f: int, e: int, k: int, bandwidth: float) -> list[dict]:
    """Rows of one dtype; the layer's weights (2.8 GB at Mixtral-8x7B sizes) are freed on return."""
    from moetrt.model.mixtral import route
    from moetrt.plugins.kernels.fused import fused_topk_moe

    dtype = TORCH_DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(std: float, *shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(dtype)

    weights = rand(0.1, e, h), rand(0.02, e, f, h), rand(0.02, e, f, h), rand(0.02, e, h, f)
    itemsize = weights[1].element_size()
    rows = []
    for t in tokens:
        x = rand(1.0, t, h)
        fused = functools.partial(fused_topk_moe, x, *weights, k)
        eager = functools.partial(sparse_moe, x, *weights, k)
        ids, _ = route(x @ weights[0].t(), k)
        selected = int(torch.unique(ids).numel())
        bound_ms = (selected * 3 * f * h + e * h) * itemsize / bandwidth / 1e6
        fused_ms, eager_ms = time_ms(fused), time_ms(eager)
        rows.append({
            "dtype": dtype_name, "tokens": t, "experts_selected": selected, "fused_ms": fused_ms,
            "eager_ms": eager_ms, "bound_ms": bound_ms, "speedup_vs_eager": eager_ms / fused_ms,
            "fraction_of_bound": bound_ms / fused_ms,
            "max_abs_diff_vs_eager": (fused().float() - eager().float()).abs().max().item(),
        })  # fmt: skip
    return rows


def run(dtypes: list[str], tokens: list[int], h: int, f: int, e: int, k: int) -> dict:
    bandwidth = copy_bandwidth_gbs()
    rows = []
    for dtype_name in dtypes:
        rows += bench_dtype(dtype_name, tokens, h, f, e, k, bandwidth)
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gbs": bandwidth,
        "sizes": {"hidden": h, "intermediate": f, "experts": e, "top_k": k},
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(f"{result['device']}: copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s; sizes {result['sizes']}")
    header = f"{'dtype':>9} {'T':>5} {'experts':>7} {'fused ms':>9} {'eager ms':>9} {'bound ms':>9} "
    print(header + f"{'vs eager':>8} {'of bound':>8} {'max|diff|':>9}")
    for r in result["rows"]:
        print(f"{r['dtype']:>9} {r['tokens']:>5} {r['experts_selected']:>7} {r['fused_ms']:>9.3f} "
              f"{r['eager_ms']:>9.3f} {r['bound_ms']:>9.3f} {r['speedup_vs_eager']:>7.2f}x "
              f"{r['fraction_of_bound']:>8.0%} {r['max_abs_diff_vs_eager']:>9.2g}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 512, 4096])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_moe_kernels.json"), help="where to write results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)  # fmt: skip
        return 2
    result = run(args.dtypes, args.tokens, args.hidden, args.intermediate, args.experts, args.top_k)
    print_table(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
