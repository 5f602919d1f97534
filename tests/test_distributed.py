"""Several processes, one run: torchrun with the gloo backend and two processes on the CPU must
train what one process trains (same global batch), for DDP and FSDP2 (with Muon on the shards),
and resume exactly under another world size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.distributed import plan_accumulation, take_rows
from shared.errors import ConfigError

from conftest import ROOT

LLM = ["--config", "debug", "data.builtin_docs=300", 'data.tokenizer="bpe:400"', "data.seq_len=32", "train.budget=4096",
       "train.eval_every=2048", "train.ckpt_every=2048", "train.log_every=1", "sample.max_new_tokens=4"]
MICRO = ["train.batch_size=4", "train.grad_accum=2"]  # two micro-batches a step: one per process
ROWS = ["train.batch_size=8", "train.grad_accum=1"]  # the same 8 rows a step (EpochOrder): 4 per process


def launch(script: str, *args: str, cwd: Path, procs: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def curves(run: Path) -> tuple[list[float], list[float], list[float]]:
    """(train losses, gradient norms, eval losses). The norms catch a sum where a mean belongs,
    which the losses hide: Muon's and Adam's updates hardly change when a gradient doubles."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    return [r["loss"] for r in train], [r["grad_norm"] for r in train], [r["loss"] for r in records if r["split"] == "eval"]


def assert_same(a: Path, b: Path, tol: float) -> None:
    for x, y in zip(curves(a), curves(b)):
        assert len(x) == len(y) > 1
        assert torch.allclose(torch.tensor(x), torch.tensor(y), rtol=tol, atol=tol), (x, y)


def rewind(run: Path, copy: Path, step: str = "step_000008") -> None:
    """A copy of a finished run as it was at its middle checkpoint, as if stopped there."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if ckpt.name != step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(step + "\n")


def test_accumulation_plans():
    # whole micro-batches when grad_accum allows: each process sees what one process would
    assert plan_accumulation(4, 8, 1, 2).micro_batches == (2, 3) and plan_accumulation(4, 8, 1, 2).rows is None
    # otherwise rows of every micro-batch
    plan = plan_accumulation(1, 8, 1, 2)
    assert plan.micro_batches == (0,) and plan.rows == slice(4, 8)
    batch = (torch.arange(8), {"y": torch.arange(8) * 2})
    assert take_rows(batch, plan.rows)[0].tolist() == [4, 5, 6, 7] and take_rows(batch, plan.rows)[1]["y"].tolist() == [8, 10, 12, 14]
    with pytest.raises(ConfigError, match="multiple of 2"):
        plan_accumulation(3, 5, 0, 2)


@pytest.mark.slow
def test_llm_two_processes_equal_one_and_resume_across_world_sizes(tmp_path):
    one = launch("train_llm.py", *LLM, *MICRO, "--experiment_name", "one", cwd=tmp_path, procs=0)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = launch("train_llm.py", *LLM, *MICRO, "--experiment_name", "ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes (DDP, 1 micro-batches of 4 per process per step)" in ddp.stdout
    assert ddp.stdout.count("validation loss") == 1  # rank 0 speaks alone
    fsdp = launch("train_llm.py", *LLM, *ROWS, "train.parallel=fsdp", "--experiment_name", "fsdp", cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    runs = tmp_path / "runs"
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp" and summary["tokens"] == 4096
    assert json.loads((runs / "fsdp" / "summary.json").read_text())["parallel"] == "fsdp"
    assert_same(runs / "one", runs / "ddp", 1e-6)  # the same sums in another order
    assert_same(runs / "one", runs / "fsdp", 1e-5)  # Muon on gathered shards; gradients reduce-scattered

    # a two-process DDP checkpoint resumed by one process, an FSDP one by two: both end where they would have
    rewind(runs / "ddp", runs / "ddp-then-one")
    resumed = launch("train_llm.py", "--experiment_name", "ddp-then-one", "--resume", cwd=tmp_path, procs=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert curves(runs / "ddp-then-one") == curves(runs / "ddp")
    rewind(runs / "fsdp", runs / "fsdp-resumed")
    resumed = launch("train_llm.py", "--experiment_name", "fsdp-resumed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(runs / "fsdp-resumed", runs / "fsdp", 1e-6)


@pytest.mark.slow
def test_moe_with_balancing_bias_two_processes_equal_one(tmp_path):
    """Two micro-batches per process, the bias moved from the load summed over both. (Later steps
    drift apart: a weight difference of 1e-7 flips a near tie in routing.)"""
    moe = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.hidden=256", "model.moe.bias_rate=0.01",
           "train.batch_size=4", "train.grad_accum=4", "train.budget=4096", "train.eval_every=2048", "train.ckpt_every=0"]
    for name, procs in (("one", 0), ("two", 2)):
        proc = launch("train_llm.py", *LLM, *moe, "--experiment_name", f"moe-{name}", cwd=tmp_path, procs=procs)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(tmp_path / "runs" / "moe-one", tmp_path / "runs" / "moe-two", 1e-5)


@pytest.mark.slow
def test_image_trainers_two_processes_equal_one(tmp_path):
    """Flow matching draws noise per micro-batch from (seed, step, micro-batch), so it matches to
    the bit; the VQ-VAE's codebook statistics are gathered from both processes (rows split)."""
    flow = ["--config", "debug", "train.budget=1280", "train.batch_size=16", "train.grad_accum=2", "train.eval_every=640",
            "train.ckpt_every=0", "train.log_every=1", "sample.per_class=1", "sample.num_steps=2", "data.eval_images=64"]
    vq = ["--config", "debug", "train.budget=512", "train.batch_size=16", "train.eval_every=256", "train.log_every=1"]
    for script, args, tol in (("train_flow_matching.py", flow, 1e-6), ("train_vqvae.py", vq, 1e-5)):
        for name, procs in (("one", 0), ("two", 2)):
            proc = launch(script, *args, "--experiment_name", f"{script}-{name}", cwd=tmp_path, procs=procs)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same(tmp_path / "runs" / f"{script}-one", tmp_path / "runs" / f"{script}-two", tol)


@pytest.mark.slow
def test_fsdp_refuses_ema_in_one_line(tmp_path):
    proc = launch("train_flow_matching.py", "--config", "debug", "train.parallel=fsdp", "train.budget=64",
                  "--experiment_name", "x", cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert errors and all(line.startswith("error: train.ema_decay needs whole weights") for line in errors), proc.stderr
    assert not (tmp_path / "runs" / "x" / "checkpoints").exists()
