"""A CPU trainer keeps freed memory in its heap (shared/cpumem.py): a large tensor is then no mmap of
its own, the setting is the process's, and a user's own malloc tunables win."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from shared.run import describe_training
from trainers import llm_trainer

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# prints whether the setting applied and the bytes glibc holds in mmapped blocks with a 64 MiB tensor alive
PROBE = """
import ctypes, sys, torch
from shared.cpumem import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
t = torch.ones(64 << 20, dtype=torch.uint8)
print(applied, libc.mallinfo2().hblkhd)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    return out[0], int(out[1])


def test_large_blocks_stay_in_the_heap():
    assert probe("default")[1] >= 64 << 20  # glibc maps a block this large on its own
    applied, mapped = probe("keep")
    assert applied == "True" and mapped < 64 << 20


def test_the_users_malloc_settings_win():
    applied, mapped = probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert applied == "False" and mapped >= 64 << 20


def test_a_cpu_trainer_applies_it_and_says_so(tmp_path, capsys):
    trainer = llm_trainer(tmp_path)
    assert trainer.kept_memory
    describe_training(trainer, tmp_path, None)
    assert "(float32, freed memory kept)" in capsys.readouterr().out
