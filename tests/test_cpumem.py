"""A CPU trainer keeps freed memory in its heap (shared/cpumem.py): a large tensor is then no mmap of
its own and its memory stays when freed, the setting is the process's, and a user's own malloc
settings (or the switch) leave glibc as it is."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest

from llm.speedrun import older_code_env
from shared.cpumem import SWITCH, TUNABLES, for_older_code, malloc_variable, users_malloc_settings
from shared.run import describe_training
from trainers import llm_trainer

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                                or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33+'s malloc only")

# prints whether the setting applied, then the free bytes at the top of glibc's heap after a raw
# 64 MiB block was allocated and freed (what trimming hands back; first, before anything else can
# land above it), then glibc's bytes in mmapped blocks while a 64 MiB tensor is alive
PROBE = """
import ctypes, sys, torch
from shared.cpumem import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc.free(libc.malloc(64 << 20))
kept = libc.mallinfo2().keepcost
t = torch.ones(64 << 20, dtype=torch.uint8)
print(applied, libc.mallinfo2().hblkhd, kept)
"""
MIB64 = 64 << 20


def clean_env() -> dict[str, str]:
    """This environment without malloc settings of its own (a developer's would change the answers)."""
    return {k: v for k, v in os.environ.items() if not malloc_variable(k)}


def probe(mode: str, **env: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean_env(), **env}, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_large_blocks_stay_in_the_heap_and_are_not_trimmed():
    _, mapped, kept = probe("default")
    assert mapped >= MIB64 and kept < MIB64  # glibc maps a block this large on its own
    applied, mapped, kept = probe("keep")
    assert applied == "True" and mapped < MIB64 and kept >= MIB64


@pytest.mark.parametrize("env", [{SWITCH: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"},
                                 {"MALLOC_TOP_PAD_": "131072"}])
def test_the_switch_and_the_users_malloc_settings_win(env):
    applied, mapped, _ = probe("keep", **env)
    assert applied == "False" and mapped >= MIB64


def test_a_cpu_trainer_applies_it_and_says_so(tmp_path, capsys, monkeypatch):
    for k in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(k)
    assert users_malloc_settings() is None
    trainer = llm_trainer(tmp_path)
    assert trainer.kept_memory
    describe_training(trainer, tmp_path, None)
    assert "(float32, freed memory kept)" in capsys.readouterr().out


def test_code_from_before_the_module_gets_the_same_by_glibc_tunables(tmp_path, monkeypatch):
    """What the speedrun harness gives an old record's commit (`--extend`) keeps memory as the module
    does, and yields to the switch, to the user's malloc settings and to a checkout that has the module."""
    for k in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(k)
    env = older_code_env(tmp_path)
    assert env == {"GLIBC_TUNABLES": TUNABLES}
    applied, mapped, kept = probe("default", **env)
    assert applied == "None" and mapped < MIB64 and kept >= MIB64
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "cpumem.py").touch()
    assert older_code_env(tmp_path) == {}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=2048")  # another part's: kept beside ours
    assert for_older_code() == {"GLIBC_TUNABLES": f"glibc.rtld.optional_static_tls=2048:{TUNABLES}"}
    for name, value in ((SWITCH, "0"), ("GLIBC_TUNABLES", "glibc.malloc.perturb=0")):
        monkeypatch.setenv(name, value)
        assert for_older_code() == {}
