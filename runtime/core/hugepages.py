"""Huge pages for the weights ONNX Runtime packs at load (Linux): fewer TLB misses per decode step.

Why: a decode step streams every weight once. llama.cpp's weights are its memory-mapped file, which Linux's page
cache maps in 2 MiB pages (its f32 file: 1014 MB of 1484 MB resident was PMD-mapped, measured); ONNX Runtime's
packed copies are anonymous memory in 4 KiB pages, unless asked otherwise. Measured on this project's 2-core AMD
EPYC (Linux 6.18, transparent huge pages "madvise"), full-size float32 `--ops ort`, in-process A/Bs of two loaded
copies, 16-step blocks interleaved: decode 31.6 vs 28.8 and 29.6 vs 28.6 tok/s with the packed weights collapsed
into huge pages (separate processes: 31.3 / 30.2 / 33.6 vs 28.9 / 29.4 / 30.1). int4 `--ops ort`: 103.8 vs
104.0, int8: 85.5 vs 85.5, no gain, so it is not done there by default. The cost is at load: collapsing
1.4 GB took 3.1-3.4 s. MoE (ERNIE 4.5 21B-A3B, int4 `cpu`, 2-core Intel Xeon), where each token reads 6 of 64
experts scattered over 10.6 GB: on by default. Separate processes, prompt 128, batch 1: full size decode 9.86 / 9.85
vs 9.58 / 9.24 tok/s, prefill 44.5 / 45.0 vs 43.2 / 43.3, load 28.6-31.3 vs 28.3-41.6 s, peak RSS equal; an 8-layer
cut 29.13 / 28.83 vs 27.40 / 27.59 tok/s.

How: the anonymous mappings that appeared while the sessions were created (the packed weights) are
madvise(MADV_COLLAPSE)d, which Linux >= 6.1 does synchronously, independent of the THP sysfs mode. Where the
kernel cannot (another OS, an older kernel, THP not built in, no free huge pages) nothing changes.
`ERNIE_HUGE_PAGES` = 0 / 1 turns it off / on for every profile.
"""

from __future__ import annotations

import ctypes
import os
import sys

MADV_COLLAPSE = 25  # linux/mman.h, Linux >= 6.1
PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"  # 2 MiB on x86-64
MIN_REGION = 8 << 20  # the packed weights are large mappings; leave the rest of the heap alone


def anonymous_regions(maps: str = "/proc/self/maps") -> set[tuple[int, int]]:
    """(start, end) of this process's anonymous mappings of at least MIN_REGION bytes ([heap] included). A mapping
    that grew, or that Linux merged with a new neighbour, differs from its earlier self: taking the difference of
    two snapshots may also collapse some older memory, which costs a little load time and nothing else."""
    out = set()
    try:
        with open(maps) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if end - start >= MIN_REGION:
                        out.add((start, end))
    except OSError:
        pass
    return out


def collapse(regions: set[tuple[int, int]]) -> int:
    """madvise(MADV_COLLAPSE) over the huge-page-aligned part of each region; returns the bytes now in huge pages
    (0 where the kernel refuses: not Linux, Linux < 6.1, THP not built in, no free huge pages)."""
    if not sys.platform.startswith("linux") or not regions:
        return 0
    try:
        with open(PMD_SIZE) as f:
            huge = int(f.read())
    except (OSError, ValueError):
        return 0  # no transparent huge pages in this kernel
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    done = 0
    for start, end in sorted(regions):
        lo, hi = (start + huge - 1) & ~(huge - 1), end & ~(huge - 1)
        if hi > lo and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done


def wanted(default: bool) -> bool:
    """`default` (the runtime's choice for the profile) unless ERNIE_HUGE_PAGES says 0 or 1."""
    value = os.environ.get("ERNIE_HUGE_PAGES", "").strip()
    return default if value not in ("0", "1") else value == "1"
