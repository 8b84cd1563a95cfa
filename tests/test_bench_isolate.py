"""`moetrt bench` measures each backend in a child process: the child must import the moetrt that runs the
benchmark, whatever the current directory holds."""

from __future__ import annotations

import os

import pytest

from moetrt.bench.isolate import run_isolated


def test_child_ignores_a_moetrt_folder_in_the_working_directory(tmp_path, monkeypatch):
    shadow = tmp_path / "moetrt"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the moetrt folder in the working directory')\n")
    monkeypatch.chdir(tmp_path)
    env = run_isolated("moetrt.bench.isolate:thread_env", {"threads": 3})
    assert env["OMP_NUM_THREADS"] == "3" and env["PATH"] == os.environ["PATH"]


def test_child_failure_is_reported_with_its_output():
    with pytest.raises(RuntimeError, match="moetrt.bench.isolate:no_such_function failed"):
        run_isolated("moetrt.bench.isolate:no_such_function", {})
