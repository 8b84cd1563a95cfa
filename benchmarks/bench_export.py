"""Export a multi-GB checkpoint with streamed weights: wall time and peak RSS relative to the checkpoint.

    python benchmarks/bench_export.py [--workdir /tmp/moetrt-bench-export] [--layers 6] [--json PATH]

The checkpoint is the `mid` preset (hidden 1024, 8 experts of 3584) with `--layers` layers in fp32, seeded
random (6 layers: 2.4 GB), made once and kept in the workdir. The export runs in a child process so that
its peak RSS is the exporter's alone; the goal is peak RSS <= 0.5x the checkpoint. The child reads VmHWM
(Linux): its getrusage ru_maxrss would include this parent's RSS at the fork (Linux carries the old
mm's high-water mark across exec), i.e. the checkpoint maker's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from moetrt.model.checkpoint import canonical_shapes
from moetrt.model.config import PRESETS
from moetrt.model.testing import make_checkpoint

CHILD = textwrap.dedent(
    r"""
    import json, re, sys, time
    from moetrt.export import export_checkpoint
    start = time.time()
    export_checkpoint(sys.argv[1], sys.argv[2], max_seq_len=1024)
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    print(json.dumps({"seconds": time.time() - start, "peak_rss": hwm_kb * 1024}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moetrt-bench-export"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    config = dataclasses.replace(PRESETS["mid"], num_hidden_layers=args.layers)
    checkpoint = args.workdir / f"mid-{args.layers}l"
    if not checkpoint.exists():
        print(f"making {checkpoint} ...", file=sys.stderr)
        make_checkpoint(checkpoint, config, seed=0)
    out = args.workdir / "export"
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint), str(out)], stdout=subprocess.PIPE, text=True, check=True
    )
    stats = json.loads(child.stdout.strip().splitlines()[-1])
    ckpt_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    largest = max(math.prod(shape) for shape in canonical_shapes(config).values()) * 4  # fp32
    result = {
        "checkpoint_gb": ckpt_bytes / 1e9,
        "data_gb": (out / "model.onnx.data").stat().st_size / 1e9,
        "largest_tensor_gb": largest / 1e9,
        "seconds": stats["seconds"],
        "peak_rss_gb": stats["peak_rss"] / 1e9,
        "rss_over_checkpoint": stats["peak_rss"] / ckpt_bytes,
    }
    for key, value in result.items():
        print(f"{key:>22}  {value:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
