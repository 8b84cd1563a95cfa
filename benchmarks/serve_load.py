"""A bounded load test of `moetrt serve` on loopback: request throughput, output tokens/s, TTFT and ITL.

    python benchmarks/serve_load.py [--backend ort-int4] [--slots 8] [--requests 64] [--concurrency 1,4,8]
                                    [--prompt-len 128] [--new-tokens 128] [--threads 2] [--engine DIR]

Prepares (in a child process) the seeded `mid` checkpoint, an export with max_batch = slots and max_seq_len =
prompt + new tokens, and the engine (`--engine DIR` serves an existing one instead), starts `moetrt serve` on
a free 127.0.0.1 port, and for each concurrency c sends `--requests` streamed completions, c at a time
(closed loop: a client sends its next request when its previous one ends). Every prompt is `--prompt-len`
random token ids and every answer exactly `--new-tokens` tokens (greedy, ignore_eos), so all runs do the
same work. Per request: TTFT (send -> first streamed chunk), ITL (gaps between streamed chunks; the server
sends one per token unless the client fell behind), TPOT ((last - first) / (tokens - 1)). The single-request prefill
is the server's own `moetrt_engine_step_seconds{kind="prefill"}` mean during the c=1 run.

Goals (same run): output tok/s at c=8 >= 3x c=1 (a batched decode step reads each weight once for all
rows); TTFT p95 at c=8 <= 3x the single-request prefill. Writes docs/serve_load.json and docs/serve_load.png
and prints a table. The load generator is stdlib `http.client` on threads, so that the client takes as
little CPU from the server as it can; on a small machine the two still share the cores (say so when
reading the numbers).

`--ray [--replicas N]` runs the same load on `moetrt serve`, on `moetrt serve --ray --replicas 1` (same threads:
the cost of the Ray Serve path) and on `--replicas N` (the threads split among the replicas: the same cores),
one server after the other, then `moetrt serve` again, and writes docs/serve_ray_load.json: output tok/s relative
to the mean of the two `moetrt serve` runs at the same concurrency (their spread is the drift of the machine's
load during the run); goal: the Ray path costs <= 10% at concurrency 4.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peers.common import run_isolated  # noqa: E402

MODEL = "mid"


def prepare_engine(preset: str, backend: str, workdir: str, max_seq_len: int, slots: int, threads: int) -> dict:
    """(Child process) the seeded checkpoint, its export and the engine; their paths."""
    from moetrt.bench.prepare import prepare
    from moetrt.cachedir import preset_checkpoint

    checkpoint, _ = preset_checkpoint(preset)
    paths, steps = prepare(checkpoint, [backend], Path(workdir), max_seq_len, slots, threads, reuse=True)
    return {"engine": str(paths[backend]), "steps": [{"step": s.step, "seconds": s.seconds} for s in steps]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def start_server(
    engine: str, slots: int, threads: int, queue: int, log: Path, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable, "-m", "moetrt", "serve", engine, "--port", str(port), "--slots", str(slots),
        "--threads", str(threads), "--max-queue", str(queue), "--served-model-name", MODEL, *extra,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return proc, port
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()[-3000:]}")


def one_request(port: int, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """One streamed completion; the arrival time of every chunk with a choice, and the usage."""
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    arrivals, usage = [], None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"]:  # one event per engine delta (text or not: a random model's tokens may have none)
            arrivals.append(time.perf_counter() - t0)
        if chunk.get("usage"):
            usage = chunk["usage"]
    conn.close()
    return {"arrivals": arrivals, "latency": time.perf_counter() - t0, "tokens": usage["completion_tokens"]}


def run_load(port: int, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict[str, Any]:
    """Closed loop: `concurrency` clients share the prompt list until it is done."""
    results: list[dict[str, Any]] = []
    lock, next_index = threading.Lock(), iter(range(len(prompts)))

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            result = one_request(port, prompts[i], new_tokens)
            with lock:
                results.append(result)

    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    ttft = [r["arrivals"][0] for r in results if r["arrivals"]]  # a token that renders no text sends no chunk
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / (r["tokens"] - 1) for r in results if len(r["arrivals"]) > 1]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": wall,
        "request_throughput": len(results) / wall,
        "output_tokens_per_s": tokens / wall,
        "output_tokens": tokens,
        "ttft_ms_p50": 1e3 * percentile(ttft, 50),
        "ttft_ms_p95": 1e3 * percentile(ttft, 95),
        "itl_ms_p50": 1e3 * percentile(itl, 50),
        "itl_ms_p95": 1e3 * percentile(itl, 95),
        "tpot_ms_p50": 1e3 * percentile(tpot, 50),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def plot(rows: list[dict[str, Any]], prefill_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(c, [r["output_tokens_per_s"] for r in rows], "o-")
    axes[0].set(title="output tokens/s", xlabel="concurrent requests")
    axes[1].plot(c, [r["ttft_ms_p50"] for r in rows], "o-", label="p50")
    axes[1].plot(c, [r["ttft_ms_p95"] for r in rows], "o-", label="p95")
    axes[1].axhline(3 * prefill_ms, color="gray", ls="--", label="3x single prefill")
    axes[1].set(title="TTFT (ms)", xlabel="concurrent requests")
    axes[2].plot(c, [r["itl_ms_p50"] for r in rows], "o-", label="p50")
    axes[2].plot(c, [r["itl_ms_p95"] for r in rows], "o-", label="p95")
    axes[2].set(title="inter-token latency (ms)", xlabel="concurrent requests")
    for ax in axes:
        ax.set_xticks(c)
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.suptitle("moetrt serve on loopback (same run; absolute numbers depend on the machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--backend", default="ort-int4")
    parser.add_argument("--engine", help="serve this engine directory instead of preparing one")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="exports and engines (default: in the cache)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "serve_load")
    parser.add_argument("--ray", action="store_true", help="compare moetrt serve with moetrt serve --ray")
    parser.add_argument("--replicas", type=int, default=2, help="--ray: engine replicas (threads split among them)")
    args = parser.parse_args(argv)
    import numpy as np

    from moetrt.artifacts import open_artifact
    from moetrt.cachedir import cache_root

    levels = [int(c) for c in args.concurrency.split(",")]
    engine = args.engine
    if engine is None:
        workdir = args.workdir or cache_root() / "bench" / f"serve-{args.preset}-{args.slots}"
        max_seq_len = args.prompt_len + args.new_tokens
        kwargs = {"preset": args.preset, "backend": args.backend, "workdir": str(workdir),
                  "max_seq_len": max_seq_len, "slots": args.slots, "threads": args.threads}  # fmt: skip
        engine = run_isolated("benchmarks.serve_load:prepare_engine", kwargs, timeout=3600)["engine"]
    rng = np.random.default_rng(0)
    vocab = open_artifact(engine).config.vocab_size
    prompts = [rng.integers(3, vocab, size=args.prompt_len).tolist() for _ in range(args.requests)]
    log = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.ray:
        compare_ray(engine, prompts, levels, args)
        return
    proc, port = start_server(engine, args.slots, args.threads, args.requests, log)
    rows, prefill_ms = [], float("nan")
    try:
        one_request(port, prompts[0][:16], 8)  # warm-up: first-use allocations of every step shape
        for c in levels:
            before = metrics(port)
            rows.append(run_load(port, prompts, args.new_tokens, c))
            after = metrics(port)
            if c == 1:
                key = 'moetrt_engine_step_seconds_{}{{kind="prefill"}}'
                steps = after[key.format("count")] - before[key.format("count")]
                prefill_ms = 1e3 * (after[key.format("sum")] - before[key.format("sum")]) / steps
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    by = {r["concurrency"]: r for r in rows}
    goals = []
    if 1 in by and 8 in by:
        goals = [
            {"goal": "output tok/s at c=8 >= 3x c=1", "target": 3.0,
             "value": by[8]["output_tokens_per_s"] / by[1]["output_tokens_per_s"]},
            {"goal": "TTFT p95 at c=8 <= 3x single-request prefill", "target": 3.0,
             "value": by[8]["ttft_ms_p95"] / prefill_ms},
        ]  # fmt: skip
        goals[0]["met"] = goals[0]["value"] >= 3.0
        goals[1]["met"] = goals[1]["value"] <= 3.0
    meta = {
        "engine": engine, "backend": args.backend if args.engine is None else None, "slots": args.slots,
        "requests": args.requests, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "threads": args.threads, "single_prefill_ms": prefill_ms,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals}, indent=2))
    plot(rows, prefill_ms, args.out.with_suffix(".png"))
    header = "| concurrency | req/s | output tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | TPOT p50 |"
    print(header + "\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['request_throughput']:.2f} | {r['output_tokens_per_s']:.1f} | "
              f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p95']:.0f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_p95']:.1f} | "
              f"{r['tpot_ms_p50']:.1f} |")  # fmt: skip
    print(f"single-request prefill (server step metric): {prefill_ms:.1f} ms")
    for g in goals:
        print(f"{g['goal']}: {g['value']:.2f} ({'met' if g['met'] else 'NOT met'})")


def compare_ray(engine: str, prompts: list[list[int]], levels: list[int], args: argparse.Namespace) -> None:
    """--ray: the same load, one server after the other, on `moetrt serve`; on `moetrt serve --ray --replicas 1`
    with the same threads (the cost of the Ray path: proxy -> ingress -> replica and back for every token);
    and on `--replicas N` with the threads split among the replicas (the same cores, so on one machine the
    replicas compete for them and for memory bandwidth). Output tok/s relative to `moetrt serve` at the same
    concurrency; the goal: the Ray path costs <= 10% at concurrency 4. Writes docs/serve_ray_load.json."""
    n = args.replicas
    setups = [  # moetrt serve before and after the Ray runs: their spread shows how much the machine's load drifted
        ("moetrt serve", (), args.threads),
        ("--ray --replicas 1", ("--ray", "--replicas", "1"), args.threads),
        (f"--ray --replicas {n}", ("--ray", "--replicas", str(n)), max(1, args.threads // n)),
        ("moetrt serve (again)", (), args.threads),
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    for name, extra, threads in setups:
        log = Path(tempfile.gettempdir()) / f"serve_ray_load.{len(results)}.server.log"
        proc, port = start_server(engine, args.slots, threads, args.requests, log, extra)
        try:
            one_request(port, prompts[0][:16], 8)  # warm-up
            results[name] = []
            for c in levels:
                results[name].append({**run_load(port, prompts, args.new_tokens, c), "threads_per_replica": threads})
                print(name, json.dumps(results[name][-1]), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(180)
    plain = results["moetrt serve"] + results["moetrt serve (again)"]
    base = {c: sum(r["output_tokens_per_s"] for r in plain if r["concurrency"] == c) / 2 for c in levels}
    ratios = {
        name: {r["concurrency"]: r["output_tokens_per_s"] / base[r["concurrency"]] for r in rows}
        for name, rows in results.items()
    }  # relative to the mean of the two moetrt serve runs
    ray1 = ratios["--ray --replicas 1"]
    goal = {"goal": "--ray --replicas 1 output tok/s at c=4 >= 0.9x moetrt serve", "target": 0.9, "value": ray1.get(4)}
    goal["met"] = goal["value"] is not None and goal["value"] >= 0.9
    meta = {
        "engine": engine, "slots": args.slots, "requests": args.requests, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "threads": args.threads, "replicas": n,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
    }  # fmt: skip
    out = args.out.with_name("serve_ray_load.json")
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios, "goals": [goal]}, indent=2))
    names = list(results)
    print("| concurrency | " + " | ".join(f"{name} tok/s" for name in names) + " | " + " | ".join(
        f"{name} ITL p50 ms" for name in names) + " |")  # fmt: skip
    print("|---:" * (1 + 2 * len(names)) + "|")
    for i, c in enumerate(levels):
        cells = [f"{results[m][i]['output_tokens_per_s']:.1f} ({ratios[m][c]:.2f}x)" for m in names]
        cells += [f"{results[m][i]['itl_ms_p50']:.1f}" for m in names]
        print(f"| {c} | " + " | ".join(cells) + " |")
    value = "n/a" if goal["value"] is None else f"{goal['value']:.2f}"
    print(f"{goal['goal']}: {value} ({'met' if goal['met'] else 'NOT met'}); written to {out}")


if __name__ == "__main__":
    main()
