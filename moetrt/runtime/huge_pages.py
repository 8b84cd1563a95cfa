"""Back an engine's weights with transparent huge pages (Linux), so a decode step's weight reads stop
missing the TLB.

A decode step streams every active weight once (hundreds of MB) through 4 KiB pages: one TLB entry per
4 KiB, and in a virtual machine each miss is a two-level (guest + host) page walk. The same bytes in
2 MiB pages need 512x fewer entries. ONNX Runtime allocates its prepacked weights (MatMulNBits/QMoE
blocks, MoE tensors) with plain `malloc`, which on a kernel whose THP mode is `madvise` (the common
default) gets 4 KiB pages. Measured on the mid preset's int4 engine (2 threads, AMD EPYC VM, THP mode
`madvise`): decode tok/s +7% (this collapse) to +20% (glibc's hugetlb tunable) in huge pages, against a
+-15% spread between runs (docs/attention.md).

After an engine is loaded, `back_with_huge_pages()` collapses into huge pages
(`madvise(MADV_COLLAPSE)`, Linux >= 6.1, synchronous) every 2 MiB-aligned unit of the process's anonymous
writable memory whose 512 pages are all present and exclusively this process's (/proc/self/pagemap):
memory written in full, which after a load is above all the weights. Units with any page not yet written
are left alone (a page only read maps the shared zero page, which the pagemap does not report as
exclusive), so a static KV buffer (reserved, filled as tokens arrive, copied whole by validation) is not
committed, and the resident set never grows. Units that are huge already cost a syscall each. Other memory
of the process written in full (the Python heap, another engine) is collapsed too: that changes no value,
only its page size. Source: Linux
Documentation/admin-guide/mm/transhuge.rst, madvise(2), Documentation/admin-guide/mm/pagemap.rst.

Anything the kernel refuses (THP mode `never`, no free 2 MiB block, a kernel before 6.1) leaves the pages
as they were: the same numbers, only slower. `MOETRT_HUGE_PAGES=0` turns it off. It costs load time
(mid int4 engine, 540 MiB: ~1.3 s here, mostly the kernel compacting memory).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import numpy as np

HUGE_PAGE = 2 << 20  # x86-64 / arm64 (4 KiB base pages) PMD size
PAGE = 4096
MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h
# /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst): 63 page present, 56 page
# exclusively mapped. A page only read, never written, is mapped to the shared zero page: present but not
# exclusive, and collapsing it would commit memory.
_PRESENT_EXCLUSIVE = np.uint64((1 << 63) | (1 << 56))
ENV = "MOETRT_HUGE_PAGES"

Range = tuple[int, int]


@dataclass(frozen=True)
class HugePageReport:
    """Bytes of 2 MiB units found written in full (`resident`) and collapsed into huge pages (`collapsed`)."""

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
    """Collapse into huge pages each 2 MiB unit of anonymous writable memory whose pages are all resident and
    this process's own. Never raises; returns what was found and what the kernel accepted."""
    if not enabled():
        return HugePageReport()
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 (closed below)
    except (OSError, AttributeError):
        return HugePageReport()
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    per_unit = HUGE_PAGE // PAGE
    resident = collapsed = 0
    with pagemap:
        for lo, hi in mapped_anonymous():
            start, end = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
            if end <= start:
                continue
            try:
                pagemap.seek(start // PAGE * 8)
                entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
            except (OSError, ValueError):
                continue
            units = (end - start) // HUGE_PAGE
            if entries.size != units * per_unit:
                continue
            own = ((entries & _PRESENT_EXCLUSIVE) == _PRESENT_EXCLUSIVE).reshape(units, per_unit).all(axis=1)
            for unit in np.flatnonzero(own):
                address = start + int(unit) * HUGE_PAGE
                resident += HUGE_PAGE
                collapsed += HUGE_PAGE if madvise(address, HUGE_PAGE, MADV_COLLAPSE) == 0 else 0
    return HugePageReport(resident, collapsed)
