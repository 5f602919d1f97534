"""Shared fixtures. Real data comes from $BLUEBERRY_DATA_DIR only (never a path written here);
tests that need it skip cleanly without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLM_DEBUG = str(ROOT / "configs" / "llm" / "debug.toml")
# Overrides that make the LLM debug preset a run of seconds: a 400-token BPE, 32-token windows, no
# evaluation or checkpoints on the way (a file adds its budget; later overrides win).
TINY_LLM = ["data.builtin_docs=300", "data.tokenizer=\"bpe:400\"", "data.seq_len=32", "train.batch_size=4",
            "train.eval_every=0", "train.ckpt_every=0", "sample.max_new_tokens=4"]


def pytest_configure(config):
    """CPU tests run on the CPU whatever the machine has (their bit-exact checks assume the CPU's
    deterministic kernels, and two-process tests one device per process): the GPU is hidden from
    this process and the scripts it starts, unless the run selects the `gpu` tests (pytest -m gpu)."""
    markexpr = config.option.markexpr or ""
    if not re.search(r"(?<!not )\bgpu\b", markexpr):  # `-m gpu` selects them; `-m gpu_paths` or `not gpu` does not
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    else:  # cuBLAS reads it when its first handle is made: the exact-resume GPU test runs deterministic kernels
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _data_dir() -> Path | None:
    env = os.environ.get("BLUEBERRY_DATA_DIR")
    if not env:
        return None
    candidate = Path(env).resolve()  # resolved: scripts run in tmp dirs
    return candidate if candidate.is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    d = _data_dir()
    if d is None:
        pytest.skip("real data not available (set BLUEBERRY_DATA_DIR)")
    return d


@pytest.fixture
def one_thread():
    """One torch thread for an in-process test (tests that train in-process run beside others)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # every test session gets its own token/image cache, never the user's
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_script(script: str, *args: str, cwd: Path, timeout: int = 600,
               env_extra: dict | None = None, folder: str = "scripts") -> subprocess.CompletedProcess:
    """Run <folder>/<script> as a user would; returns the completed process (never raises)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / folder / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="session")
def vqvae_debug_run(tmp_path_factory) -> Path:
    """One `debug` VQ-VAE run on the built-in set, shared by every test that needs a trained
    tokenizer (the VQ-VAE's own tests and the multimodal ones)."""
    runs = tmp_path_factory.mktemp("vq-runs")
    proc = run_script("train_vqvae.py", "--config", str(ROOT / "configs" / "vqvae" / "debug.toml"), "--runs_dir", str(runs),
                      cwd=runs, timeout=600, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "psnr" in proc.stdout
    return runs / "debug"
