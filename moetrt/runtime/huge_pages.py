"""Back an engine's weights with transparent huge pages (Linux), so a decode step's weight reads stop
missing the TLB.

A decode step streams every active weight once (hundreds of MB) through 4 KiB pages: one TLB entry per
4 KiB, and in a virtual machine each miss is a two-level (guest + host) page walk. The same bytes in
2 MiB pages need 512x fewer entries. ONNX Runtime allocates its prepacked weights (MatMulNBits/QMoE
blocks, MoE tensors) with plain `malloc`, which on a kernel whose THP mode is `madvise` (the common
default) gets 4 KiB pages. Measured on the mid preset's int4 engine (2 threads, AMD EPYC VM, THP mode
`madvise`): decode tok/s +20% with the weights in huge pages (docs/attention.md).

After an engine is loaded, `back_with_huge_pages()` collapses into huge pages
(`madvise(MADV_COLLAPSE)`, Linux >= 6.1, synchronous) every 2 MiB-aligned unit of the process's anonymous
writable memory whose 512 pages are all resident (`mincore`): memory written in full, which after a load
is above all the weights. Units with any page not yet touched are left alone, so a static KV buffer
(reserved, filled as tokens arrive) is not committed, and the resident set never grows. Units that are
huge already cost a syscall each. Other memory of the process written in full (the Python heap, another
engine) is collapsed too: that changes no value, only its page size. Source: Linux
Documentation/admin-guide/mm/transhuge.rst, madvise(2), mincore(2).

Anything the kernel refuses (THP mode `never`, no free 2 MiB block, a kernel before 6.1) leaves the pages
as they were: the same numbers, only slower. `MOETRT_HUGE_PAGES=0` turns it off. It costs load time
(mid int4 engine, 540 MiB: ~1.3 s here, mostly the kernel compacting memory).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

HUGE_PAGE = 2 << 20  # x86-64 / arm64 (4 KiB base pages) PMD size
PAGE = 4096
MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h
ENV = "MOETRT_HUGE_PAGES"

Range = tuple[int, int]


@dataclass(frozen=True)
class HugePageReport:
    """Bytes of fully resident 2 MiB units found (`resident`) and collapsed into huge pages (`collapsed`)."""

    resident: int = 0
    collapsed: int = 0


def enabled() -> bool:
    """False off Linux, with `MOETRT_HUGE_PAGES=0`, or when the kernel's THP mode is `never`."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def mapped_anonymous() -> list[Range]:
    """[start, end) of this process's anonymous writable mappings (/proc/self/maps); empty without /proc."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
                if anonymous and "w" in fields[1]:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def back_with_huge_pages() -> HugePageReport:
    """Collapse into huge pages each 2 MiB unit of anonymous writable memory whose pages are all resident.
    Never raises; returns what was found and what the kernel accepted."""
    if not enabled():
        return HugePageReport()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore, madvise = libc.mincore, libc.madvise
    except (OSError, AttributeError):
        return HugePageReport()
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    per_unit = HUGE_PAGE // PAGE
    resident = collapsed = 0
    for lo, hi in mapped_anonymous():
        start, end = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
        if end <= start:
            continue
        pages = (ctypes.c_ubyte * ((end - start) // PAGE))()
        if mincore(start, end - start, pages) != 0:
            continue
        present = bytes(pages)
        for i, unit in enumerate(range(start, end, HUGE_PAGE)):
            if 0 in present[i * per_unit : (i + 1) * per_unit]:
                continue
            resident += HUGE_PAGE
            collapsed += HUGE_PAGE if madvise(unit, HUGE_PAGE, MADV_COLLAPSE) == 0 else 0
    return HugePageReport(resident, collapsed)
