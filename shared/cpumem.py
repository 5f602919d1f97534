"""Freed memory kept by a CPU training process instead of handed back to the kernel.

glibc's malloc serves every block over 32 MiB with its own mmap and unmaps it when freed, and trims
the top of its heap; a CPU training step allocates and frees hundreds of MiB of activations and
logits, so every step the kernel maps and zero-fills those pages again (44% of a CPU language-model
run's time went to the kernel). Kept in the main thread's heap, the same run is about 1.4x faster
with the same numbers, at up to twice the resident memory. Measurements, and the allocators tried
instead (tcmalloc as fast but preloaded, jemalloc and transparent huge pages little faster):
benchmarks/results/llm_recipe.md, "Freed memory kept".

BLUEBERRY_KEEP_FREED_MEMORY=0 leaves glibc as it is, and so does any malloc setting of the user's
(GLIBC_TUNABLES glibc.malloc.*, MALLOC_*_ variables, a preloaded allocator). Code from before this
module gets the same from the environment (`for_older_code`), which the speedrun harness gives the
training processes of a record's older commit.
"""

from __future__ import annotations

import ctypes
import os
import platform

SWITCH = "BLUEBERRY_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
# the same as keep_freed_memory's two calls, as glibc tunables read at a process's start (a tunable
# takes no -1 for "never trim": 64 GiB is more than any heap here)
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def malloc_variable(name: str) -> bool:
    """Whether an environment variable of this name can choose malloc's behaviour here."""
    return name in (SWITCH, "GLIBC_TUNABLES", "LD_PRELOAD") or (name.startswith("MALLOC_") and name.endswith("_"))


def users_malloc_settings() -> str | None:
    """The first malloc setting the environment makes (which then wins over ours), or None."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # tcmalloc, jemalloc, mimalloc and the like
        return "LD_PRELOAD"
    return next((k for k in os.environ if k.startswith("MALLOC_") and malloc_variable(k)), None)


def glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def for_older_code() -> dict[str, str]:
    """Environment variables that make a process whose code predates this module keep freed memory,
    as keep_freed_memory would: none where it would not apply (`users_malloc_settings`, not glibc)."""
    if not glibc() or users_malloc_settings():
        return {}
    other = os.environ.get("GLIBC_TUNABLES")  # tunables of other glibc parts are kept beside ours
    return {"GLIBC_TUNABLES": f"{other}:{TUNABLES}" if other else TUNABLES}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap of its own for a large block, no
    trimming), for the rest of the process. Returns whether it applied: not on other C libraries,
    nor where the environment chose malloc's behaviour (`users_malloc_settings`)."""
    if not glibc() or users_malloc_settings():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # a trim threshold of -1 means never trim (mallopt(3)); both calls return 1 on success
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
