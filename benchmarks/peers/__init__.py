"""Peer baselines for moetrt's benchmark: the same checkpoint, machine and workload, measured in
other stacks, so a run can report moetrt's engines as ratios to them.

- `hf.bench_hf`: Hugging Face transformers `generate` (eager / sdpa attention; dynamic / static cache).
- `ortgenai.build_ortgenai_model` + `ortgenai.bench_ortgenai`: ONNX Runtime GenAI (fp32 / int8 / int4).
- the memory-bandwidth bound on decode: `moetrt.bench.bandwidth` (one implementation for moetrt and peers).
- `common.run_isolated`: run any of the above in a fresh subprocess, so each peak RSS is its own.
- `run_peers`: the command-line runner (`python -m benchmarks.peers.run_peers --checkpoint DIR`).

Every `bench_*` returns the same fields (see `common.RESULT_FIELDS`).
"""
