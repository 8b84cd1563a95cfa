"""Call a function in a fresh Python process and get its JSON result back.

Why: every backend is measured in its own process, so its peak RSS is its own and no backend inherits the
pages, thread pools or allocator state of one measured before it. The child imports the very moetrt the
parent runs (its package root goes first on the child's sys.path) and runs in an empty temporary directory:
`python -m` would put the current directory first, and a `moetrt/` folder there (a clone, another version)
would be imported instead.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment for a child that must use `threads` threads in every runtime it loads (OpenMP, MKL,
    OpenBLAS read these at initialisation, before any `set_num_threads`)."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def run_isolated(target: str, kwargs: dict[str, Any], threads: int | None = None, timeout: float = 1800) -> Any:
    """`module:function(**kwargs)` in a child process; its JSON-serialisable return value.

    Raises RuntimeError with the tail of the child's output when it fails or times out."""
    with tempfile.TemporaryDirectory(prefix="moetrt-isolate-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", _CHILD, PACKAGE_ROOT, target, json.dumps(kwargs), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=thread_env(threads),
                                  cwd=tmp)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            raise RuntimeError(f"{target} timed out after {timeout:.0f} s; output tail:\n{output[-2000:]}") from None
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{target} failed (exit {proc.returncode}); output tail:\n{tail}")
        return json.loads(out.read_text())


def _main(argv: list[str]) -> None:
    target, kwargs, out = argv
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(kwargs))
    Path(out).write_text(json.dumps(result))


PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding this moetrt package
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from moetrt.bench.isolate import _main; _main(sys.argv[2:])"
