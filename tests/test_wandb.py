"""Weights & Biases logging (train.wandb / --wandb), offline as it must work without network."""

from __future__ import annotations

import sys

import pytest

from conftest import LLM_DEBUG, TINY_LLM, run_script
from shared.errors import UserError
from shared.trainer import TrainConfig

wandb = pytest.importorskip("wandb")  # the dev extra holds it; pip install -e ".[wandb]" otherwise


@pytest.mark.parametrize("name", ["a/b", "bad:name", " ", "x" * 129])
def test_a_bad_project_name_is_refused_before_any_work(name):
    with pytest.raises(UserError, match="not a W&B project name"):
        TrainConfig(wandb=name)


def test_a_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e \"\.\[wandb\]\""):
        TrainConfig(wandb="blueberry")


@pytest.mark.slow
def test_offline_run_logs_metrics_config_and_samples_and_resumes_the_same_run(tmp_path):
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    args = ["--config", LLM_DEBUG, "--experiment_name", "wb", "--wandb", "blueberry-tests", *TINY_LLM,
            "train.budget=512", "train.log_every=1", "train.ckpt_every=256"]
    first = run_script("train_llm.py", *args, cwd=tmp_path, env_extra=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "W&B offline" in first.stdout  # no API key: offline, said so
    run = tmp_path / "runs" / "wb"
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    run_id = (run / "wandb-id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # the offline run's log (W&B's protobuf records) holds the config, the metrics and the samples
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"seq_len", b"train/loss", b"train/grad_norm", b"eval/loss", b"eval/accuracy", b"samples"):
        assert key in log, key
    resumed = run_script("train_llm.py", "--experiment_name", "wb", "--resume", "train.budget=1024", cwd=tmp_path, env_extra=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "wandb-id.txt").read_text().strip() == run_id  # the same W&B run continues
    assert all(r.name.endswith(run_id) for r in (run / "wandb").glob("offline-run-*"))
