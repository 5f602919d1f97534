"""Freed memory kept by a CPU training process instead of handed back to the kernel.

glibc's malloc serves every block over 32 MiB with its own mmap and unmaps it when freed, and trims
the top of its heap; a CPU training step allocates and frees hundreds of MiB of activations and
logits, so each step the kernel maps and zeroes those pages again. Measured on the two-core
development machine (cpu-16m, GPT-2 vocabulary, `benchmarks/llm_throughput.py --preset cpu-16m
--vocab_size 50304 --steps 5 --warmup 1`): 44% of the process's CPU time went to the kernel and it
ran at about 850 tokens/s; with the heap kept (no mmap for large blocks, no trimming) at
1,320-1,490 tokens/s, the same numbers computed, a peak resident set of 5-7.5 GiB instead of 4.7.
tcmalloc (preloaded) did as well, jemalloc's defaults (which return pages within seconds) no
better than glibc, and torch's THP_MEM_ALLOC_ENABLE (huge pages, still unmapped) only 1.1x.

Any glibc.malloc setting of the user's in GLIBC_TUNABLES turns it off (glibc's default behaviour:
`GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072`); the same speed for code from before this
module (an old record's commit): `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap for large blocks, no trimming), for
    the rest of the process. Returns whether it applied: not on other C libraries, nor where the
    user chose malloc settings (GLIBC_TUNABLES glibc.malloc.*) or another allocator (LD_PRELOAD)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # -1 as the trim threshold means never trim (mallopt(3)); both calls return 1 on success
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
