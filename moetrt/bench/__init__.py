"""`moetrt bench`: the engines against the eager reference and the memory-bandwidth bound, in one run.

    moetrt.bench.run.run_bench(checkpoint_dir | preset, backends, prompt_len, new_tokens, batch, threads, ...)

Modules, one job each: run (the command), prepare (export once, build each engine), isolate (a function in
a fresh process), measure (one backend in that process: load, warm up, timed generation), workload (the
shared prompt and peak-RSS reading), bandwidth (measured read bandwidth and bytes per decode step: the
bound), report (medians, ratios, table, markdown, JSON), plot. Nothing is imported here, so that the light
modules (workload, bandwidth) stay light for the peer benchmarks that import them.
"""
