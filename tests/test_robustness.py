"""Runs that survive: kills at any moment resume to the same losses, SIGTERM checkpoints, a busy run
folder is refused, divergence never costs the last good checkpoint, bad values are one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import LLM_DEBUG as DEBUG
from conftest import ROOT, TINY_LLM, assert_one_line_error, run_script
from test_trainer import make

from shared import checkpoint as ckpt_mod
from shared.checkpoint import resolve_checkpoint
from shared.contracts import Task
from shared.errors import UserError
from shared.run import lock_run_dir

# a tiny run with a checkpoint every 4 steps: kills land before, between and inside checkpoints
TINY = [*TINY_LLM, "train.budget=3072", "train.ckpt_every=512", "train.log_every=1", "train.keep_checkpoints=1"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_losses(run: Path) -> dict[int, float]:
    """step -> training loss, the last record of each step (a resumed run logs a step again)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == "train":
            out[r["step"]] = r["loss"]
    return out


def popen(args: list[str], cwd: Path, code: str | None = None) -> subprocess.Popen:
    """scripts/train_llm.py in a child process; `code` runs first in that process (a patch)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV}
    script = str(ROOT / "scripts" / "train_llm.py")
    if code is None:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-c", f"{code}\nimport runpy, sys\nsys.argv = {[script, *args]!r}\n"
                                     f"runpy.run_path({script!r}, run_name='__main__')"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_name: str, cwd: Path) -> None:
    proc = run_script("train_llm.py", "--experiment_name", run_name, "--resume", cwd=cwd, env_extra=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_losses(tmp_path):
    ref = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "ref", *TINY, cwd=tmp_path, env_extra=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = train_losses(tmp_path / "runs" / "ref")
    assert len(expected) == 24

    # 1. SIGKILL inside a checkpoint write: the weights are written, the state file is not
    die_in_save = ("import os, signal, shared.checkpoint as c\n"
                   "_save = c.torch.save\n"
                   "def dying_save(obj, path, *a, **k):\n"
                   "    if os.path.basename(os.path.dirname(path)) == '.step_000008.partial':\n"
                   "        os.kill(os.getpid(), signal.SIGKILL)\n"
                   "    return _save(obj, path, *a, **k)\n"
                   "c.torch.save = dying_save\n")
    p = popen(["--config", DEBUG, "--experiment_name", "mid-save", *TINY], tmp_path, code=die_in_save)
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL
    ckpts = tmp_path / "runs" / "mid-save" / "checkpoints"
    assert (ckpts / ".step_000008.partial").is_dir() and resolve_checkpoint(ckpts).name == "step_000004"
    finish("mid-save", tmp_path)
    assert not list(ckpts.glob(".step_*.partial"))  # the leftover was cleaned up
    assert train_losses(tmp_path / "runs" / "mid-save") == expected

    # 2. SIGKILL at batches drawn at random (seeded: the test repeats), between and across checkpoints
    rng = random.Random(0)
    for trial, at in enumerate(sorted(rng.sample(range(5, 24), 3))):
        name = f"kill{trial}"
        die_at_batch = ("import os, signal, llm.data as d\n"
                        "_next = d.PackedBatches.next_batch\n"
                        "calls = [0]\n"
                        "def dying_next(self):\n"
                        "    calls[0] += 1\n"
                        f"    if calls[0] == {at}:\n"
                        "        os.kill(os.getpid(), signal.SIGKILL)\n"
                        "    return _next(self)\n"
                        "d.PackedBatches.next_batch = dying_next\n")
        p = popen(["--config", DEBUG, "--experiment_name", name, *TINY], tmp_path, code=die_at_batch)
        p.wait(timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
        finish(name, tmp_path)
        assert train_losses(tmp_path / "runs" / name) == expected, f"trial {trial}: killed drawing batch {at}"


def test_sigterm_checkpoints_and_resumes(tmp_path):
    slow = [*TINY, "train.budget=40960", "train.ckpt_every=0"]
    p = popen(["--config", DEBUG, "--experiment_name", "term", *slow], tmp_path)
    metrics = tmp_path / "runs" / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "SIGTERM: stopping after this step" in out and "continue with --resume" in out
    step = int(resolve_checkpoint(tmp_path / "runs" / "term").name.split("_")[1])
    assert 5 <= step < 320


def test_a_busy_run_folder_is_refused(tmp_path):
    run = tmp_path / "runs" / "busy"
    lock_run_dir(run)  # this process holds it, as a running training would
    proc = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "busy", *TINY, cwd=tmp_path)
    assert_one_line_error(proc, "in use by another process", str(os.getpid()))
    assert [p.name for p in run.iterdir()] == [".lock"]  # nothing of the refused run was written


class NaNAt(Task):
    """Wraps a task: the loss is NaN at one step (a batch made NaN on purpose)."""

    def __init__(self, task, at_call: int):
        self.task, self.at, self.calls, self.unit = task, at_call, 0, task.unit

    def loss(self, model, batch):
        self.calls += 1
        loss = self.task.loss(model, batch)
        return loss * float("nan") if self.calls == self.at else loss

    def evaluate(self, model):
        return self.task.evaluate(model)


def test_nonfinite_steps_stop_or_skip_and_never_reach_a_checkpoint(tmp_path):
    trainer = make(tmp_path / "stop")
    trainer.task = NaNAt(trainer.task, at_call=2 * 6)  # grad_accum 2: step 6 goes NaN; a checkpoint at step 4
    with pytest.raises(UserError, match="diverged"):
        trainer.fit()
    ckpt = resolve_checkpoint(tmp_path / "stop")
    assert ckpt.name == "step_000004"
    with pytest.raises(UserError, match="not finite"):
        trainer.save()  # the NaN weights are refused and step 4 stays the latest
    assert resolve_checkpoint(tmp_path / "stop") == ckpt

    trainer = make(tmp_path / "skip")
    trainer.cfg.on_nonfinite = "skip"
    trainer.task = NaNAt(trainer.task, at_call=2 * 6)
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and torch.isfinite(torch.tensor(summary["final_eval"]["loss"]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = make(tmp_path / "run")
    trainer.train_step()
    good = trainer.save()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    trainer.train_step()
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is kept"):
        trainer.save()
    assert resolve_checkpoint(tmp_path / "run") == good and not list(good.parent.glob(".step_*"))


@pytest.mark.slow
def test_bad_values_are_one_line_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "int.jsonl").write_text('{"text": 42}\n')
    llm = ["train_llm.py", "--config", "debug"]
    cases = [
        ([*llm, "model.n_heads=0"], "n_heads"),
        ([*llm, "model.n_kv_heads=-2"], "n_kv_heads"),
        ([*llm, "optim.adam_lr=nan"], "learning rates"),
        ([*llm, "optim.min_lr_ratio=-0.1"], "min_lr_ratio"),
        ([*llm, "optim.grad_clip=-1"], "grad_clip"),
        ([*llm, "train.device=\"bogus\""], "train.device"),
        ([*llm, "--data", str(tmp_path / "int.jsonl")], "holds int, not text"),
        ([*llm, "--runs_dir", str(tmp_path / "afile")], "cannot write the run folder"),
        ([*llm, "--experiment_name", "x", "train.batchsize=2"], "unknown config key"),  # an override after a flag
        (["train_llm.py", "--config", "nonesuch"], "neither a file nor a llm preset"),
        (["generate_llm.py", "--checkpoint", "x", "--temperature", "nan"], "not a finite number"),
        (["generate_llm.py", "--checkpoint", "x", "--top_k", "-3"], "is negative"),
        (["generate_flow_matching.py", "--checkpoint", "x", "--cfg_scale", "inf"], "not a finite number"),
        (["generate_multimodal.py", "--checkpoint", "x", "--output_dir", str(tmp_path / "afile")], "is a file"),
        (["evaluate_vqvae.py", "--run", "x", "--out", str(tmp_path)], "is a folder"),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: each is mostly importing torch
        procs = list(pool.map(lambda case: run_script(*case[0], cwd=tmp_path, env_extra=ENV), cases))
    for (args, fragment), proc in zip(cases, procs):
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
        assert_one_line_error(proc, fragment)
