"""Transparent huge pages for an engine's loaded weights (moetrt.runtime.huge_pages): which memory is
collapsed, that none is committed and no value changes, and that an ORT engine computes bit-for-bit the same
logits with and without.

Whether the kernel makes huge pages at all depends on the machine (THP mode `never`, kernels before 6.1
without MADV_COLLAPSE, no free 2 MiB blocks): a test that needs them first asks for them on memory it
owns and skips, saying why, when none are made; the selection and value checks run everywhere.
"""

from __future__ import annotations

import dataclasses
import mmap
import sys

import numpy as np
import pytest

from moetrt.model.config import PRESETS
from moetrt.runtime import huge_pages
from moetrt.runtime.huge_pages import HUGE_PAGE, back_with_huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def fresh(nbytes: int) -> np.ndarray:
    """float64 zeros in a new private anonymous mapping of their own (mmap), none of its pages touched: what a
    large malloc returns in a fresh process, without depending on what this process's allocator reuses
    (calloc zero-fills reused memory, committing it) or numpy's own MADV_HUGEPAGE on large arrays."""
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype=np.float64)  # keeps `buffer` alive


def span(array: np.ndarray) -> tuple[int, int]:
    lo = array.__array_interface__["data"][0]
    return lo, lo + array.nbytes


def smaps_sum(array: np.ndarray, field: str) -> int:
    """`field` (e.g. "Rss:", "AnonHugePages:") in bytes, summed over the mappings that hold `array`,
    clipped to nothing finer: a mapping counts whole (/proc/self/smaps)."""
    lo, hi = span(array)
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                a, b = (int(x, 16) for x in head[0].split("-"))
                inside = a < hi and lo < b
            elif inside and head[0] == field:
                total += int(head[1]) * 1024
    return total


def committed_pages(array: np.ndarray) -> int:
    """Pages of `array`'s buffer backed by memory of this process's own: present and exclusively mapped in
    /proc/self/pagemap (a page only read maps the shared zero page, present but not exclusive). Counted
    on the buffer's own addresses, so mappings the kernel merged around it do not blur the figure."""
    lo, hi = span(array)
    first, last = lo // 4096, (hi - 1) // 4096
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    bits = np.uint64((1 << 63) | (1 << 56))
    return int(((entries & bits) == bits).sum())


def thp_mode() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read().split("[")[1].split("]")[0]


def test_written_memory_is_collapsed_untouched_memory_is_not_committed(monkeypatch):
    """A 16 MiB buffer written in full is collapsed into huge pages and keeps its values; an untouched
    64 MiB reservation (as a static KV buffer), a 16 MiB buffer written to 3 MiB (a KV buffer after a few
    tokens) and a 16 MiB buffer read but never written (a KV buffer copied whole: the zero page) are not
    committed any further: the resident set does not grow."""
    monkeypatch.delenv(huge_pages.ENV, raising=False)
    loaded = fresh(8 * HUGE_PAGE)  # 16 MiB, every page written
    loaded[:] = np.random.default_rng(1).random(loaded.size)
    expected = loaded.copy()
    reserved = fresh(32 * HUGE_PAGE)  # 64 MiB, no page touched
    partial = fresh(8 * HUGE_PAGE)
    partial[: 3 * (1 << 20) // 8] = 1.0  # 3 MiB written
    read_only = fresh(8 * HUGE_PAGE)
    assert read_only.sum() == 0  # every page read, none written: all map the shared zero page
    buffers = {"reserved": reserved, "partial": partial, "read_only": read_only}
    committed = {name: committed_pages(a) for name, a in buffers.items()}
    assert committed == {"reserved": 0, "partial": 3 * 256, "read_only": 0}
    huge_before = smaps_sum(loaded, "AnonHugePages:")  # (a mapping merged with older, collapsed memory: > 0)
    report = back_with_huge_pages()
    np.testing.assert_array_equal(loaded, expected)
    for name, array in buffers.items():
        assert committed_pages(array) == committed[name], f"the {name} buffer was committed"
    if not huge_pages.enabled():
        assert report == huge_pages.HugePageReport()
        pytest.skip("THP mode is `never` here: nothing is collapsed")
    assert report.resident >= loaded.nbytes - 2 * HUGE_PAGE  # the whole 2 MiB units inside the buffer
    assert 0 <= report.collapsed <= report.resident and report.collapsed % HUGE_PAGE == 0
    if report.collapsed == 0:
        pytest.skip("the kernel made no huge page (MADV_COLLAPSE unsupported, or no free 2 MiB block)")
    assert smaps_sum(loaded, "AnonHugePages:") - huge_before >= loaded.nbytes - 2 * HUGE_PAGE


def test_switched_off(monkeypatch):
    """MOETRT_HUGE_PAGES=0 collapses nothing."""
    monkeypatch.setenv(huge_pages.ENV, "0")
    loaded = fresh(8 * HUGE_PAGE)
    loaded[:] = 1.0
    assert back_with_huge_pages() == huge_pages.HugePageReport()
    assert loaded.sum() == loaded.size


@pytest.fixture(scope="module")
def int4_engine(tmp_path_factory):
    """An int4 ORT engine whose prepacked experts (~16 MiB) span whole huge pages."""
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint
    from moetrt.model.testing import make_checkpoint

    config = dataclasses.replace(PRESETS["tiny"], hidden_size=256, intermediate_size=2048, num_local_experts=8,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    root = tmp_path_factory.mktemp("huge")
    checkpoint = make_checkpoint(root / "ckpt", config, seed=5)
    export = export_checkpoint(checkpoint, root / "export", max_seq_len=64, max_batch=2, progress=False)
    return build_ort_engine(export, root / "engine", "int4", threads=1, progress=False)


def test_ort_engine_same_logits_in_huge_pages(int4_engine, monkeypatch):
    """The engine loaded with its weights collapsed into huge pages computes bit-for-bit the logits the same
    engine computes loaded without (run first, then closed), over a prefill and 8 decode steps of two rows."""
    from moetrt.runtime.ort_backend import OrtBackend

    def run(backend: OrtBackend) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        ids = rng.integers(3, backend.config.vocab_size, size=(2, 12))
        pos = np.tile(np.arange(12), (2, 1))
        logits = []
        for _ in range(9):
            logits.append(backend.step(ids, pos))
            ids, pos = logits[-1][:, -1].argmax(-1)[:, None], pos[:, -1:] + 1
        backend.close()
        return logits

    monkeypatch.setenv(huge_pages.ENV, "0")
    plain = OrtBackend.load(int4_engine)
    assert plain.huge_pages == huge_pages.HugePageReport()
    expected = run(plain)
    monkeypatch.delenv(huge_pages.ENV)
    huge = OrtBackend.load(int4_engine)
    if huge.huge_pages.collapsed < 4 * HUGE_PAGE:  # the engine's prepacked experts alone are ~4 MiB
        pytest.skip(f"no huge pages made here (THP enabled: {huge_pages.enabled()}): {huge.huge_pages}")
    for step, (a, b) in enumerate(zip(expected, run(huge), strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
