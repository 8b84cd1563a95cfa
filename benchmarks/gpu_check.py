"""The first run on a machine with a CUDA GPU and TensorRT, in one command (docs/tensorrt.md):

    pip install -e '.[dev,trt]' && python benchmarks/gpu_check.py [--out gpu_check]

Each step is recorded and a failing step does not stop the others; the exit status is 1 if any failed.
1. env: the GPU (name, compute capability), its driver, and the versions of tensorrt, triton, torch, numpy.
2. tests: `pytest -m "gpu or tensorrt"` (the TensorRT engine tests, the compiled Triton kernels, the PTX
   compile) twice, each in a virtual environment over this one (--system-site-packages) with another numpy:
   `numpy>=2.4` (integer plugin attributes reach TensorRT as 1-element arrays, which numpy >= 2.4 refuses to
   convert with int()) and `numpy<2.4`. Counts come from pytest's JUnit XML; a run whose tests all skipped is
   a failure (it would pass vacuously).
3. kernels: benchmarks/bench_moe_kernels.py (fused Triton MoE vs eager, fraction of the bandwidth bound).
4. pipeline: a seeded checkpoint of the tiny preset -> `moetrt export --dtype float16` -> `moetrt build
   --backend trt` (AOT plugins) -> `moetrt validate` against the checkpoint, as a user runs them.
Writes OUT/gpu_check.json (every step: command, exit status, seconds, figures) beside each step's own files
(JUnit XML, bench_moe_kernels.json, validate.json) and logs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NUMPY_VARIANTS = {"numpy-new": "numpy>=2.4", "numpy-old": "numpy<2.4"}
PACKAGES = ("tensorrt", "triton", "torch", "numpy", "onnx", "onnxruntime")


def run(name: str, cmd: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one command from the repository root with this checkout first on the path, its output to
    OUT/<name>.log; the step's record."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    tail = log.read_text(errors="replace").splitlines()[-5:]
    return {"name": name, "command": cmd, "returncode": code, "seconds": round(time.perf_counter() - start, 2),
            "log": log.name, "tail": tail}  # fmt: skip


def environment(python: str) -> dict[str, Any]:
    """The GPU, driver and package versions as seen by `python`."""
    probe = (
        "import importlib.metadata as m, json, torch\n"
        f"v = {{p: (m.version(p) if p in {{d.metadata['Name'] for d in m.distributions()}} else None) "
        f"for p in {PACKAGES!r}}}\n"
        "cuda = torch.cuda.is_available()\n"
        "v['gpu'] = torch.cuda.get_device_name() if cuda else None\n"
        "v['compute_capability'] = '.'.join(map(str, torch.cuda.get_device_capability())) if cuda else None\n"
        "v['torch_cuda'] = torch.version.cuda\n"
        "print(json.dumps(v))"
    )
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip().splitlines()[-1:]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)  # fmt: skip
        info["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    except FileNotFoundError:
        info["driver"] = None
    return info


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped from pytest's JUnit XML."""
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def test_step(variant: str, requirement: str, out: Path, timeout: float) -> dict[str, Any]:
    """The gpu/tensorrt tests in a venv over this environment with `requirement` (a numpy range) installed."""
    venv = out / f"venv-{variant}"
    made = run(f"venv-{variant}", [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], out, 300)
    python = str(venv / "bin" / "python")
    if made["returncode"] != 0:
        return {**made, "name": f"tests-{variant}", "ok": False}
    # --ignore-installed: a satisfying numpy in the base environment would otherwise be kept, not shadowed
    install = [python, "-m", "pip", "install", "--quiet", "--ignore-installed", requirement]
    pip = run(f"pip-{variant}", install, out, 600)
    if pip["returncode"] != 0:
        return {**pip, "name": f"tests-{variant}", "ok": False}
    xml = out / f"tests-{variant}.xml"
    cmd = [python, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-rs", f"--junitxml={xml}", "tests"]
    step = {**run(f"tests-{variant}", cmd, out, timeout), "requirement": requirement,
            "env": environment(python)}  # fmt: skip
    step["counts"] = junit_counts(xml) if xml.is_file() else None
    counts = step["counts"] or {}
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    step["ok"] = step["returncode"] == 0 and ran > 0 and not counts.get("skipped")
    return step


def pipeline(out: Path, timeout: float) -> list[dict[str, Any]]:
    """Checkpoint -> export -> TensorRT build -> validate on the tiny preset, through the CLI."""
    from moetrt.model.config import PRESETS
    from moetrt.model.testing import make_checkpoint

    work = out / "tiny"
    ckpt = work / "checkpoint"
    if not ckpt.is_dir():
        make_checkpoint(ckpt, PRESETS["tiny"], seed=0)
    moetrt = [sys.executable, "-m", "moetrt"]
    export, engine, report = work / "export-fp16", work / "engine-trt-fp16", out / "validate.json"
    steps = [
        run("export", [*moetrt, "export", str(ckpt), "-o", str(export), "--dtype", "float16", "--max-seq-len",
                       "256", "--max-batch", "2"], out, timeout),
        run("build-trt", [*moetrt, "build", str(export), "-o", str(engine), "--backend", "trt", "--precision",
                          "fp16"], out, timeout),
        run("validate", [*moetrt, "validate", str(ckpt), str(engine), "--json", str(report)], out, timeout),
    ]  # fmt: skip
    for step in steps:
        step["ok"] = step["returncode"] == 0
    if (engine / "moetrt.json").is_file():
        manifest = json.loads((engine / "moetrt.json").read_text())
        keys = ("tensorrt_version", "plugins", "ptx", "layer_outputs")
        steps[1]["engine"] = {key: manifest.get(key) for key in keys}
        steps[1]["engine_bytes"] = (engine / "model.engine").stat().st_size
    if report.is_file():
        steps[2]["report"] = report.name
        steps[2]["passed"] = json.loads(report.read_text()).get("passed")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="directory for the JSON, logs, venvs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"env": environment(sys.executable), "steps": []}
    if record["env"].get("gpu") is None:
        print("gpu_check: torch sees no CUDA GPU; run this on a machine with one", file=sys.stderr)
        return 2
    for variant, requirement in NUMPY_VARIANTS.items():
        record["steps"].append(test_step(variant, requirement, out, args.timeout))
    kernels = out / "bench_moe_kernels.json"
    bench = run(
        "kernels", [sys.executable, "benchmarks/bench_moe_kernels.py", "--json", str(kernels)], out, args.timeout
    )
    bench["ok"] = bench["returncode"] == 0 and kernels.is_file()
    bench["figures"] = json.loads(kernels.read_text()) if kernels.is_file() else None
    record["steps"].append(bench)
    record["steps"] += pipeline(out, args.timeout)
    record["ok"] = all(step["ok"] for step in record["steps"])
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    width = max(len(step["name"]) for step in record["steps"])
    for step in record["steps"]:
        extra = step.get("counts") or ""
        print(f"{step['name']:<{width}}  {'ok  ' if step['ok'] else 'FAIL'}  {step['seconds']:>8.1f} s  {extra}")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
