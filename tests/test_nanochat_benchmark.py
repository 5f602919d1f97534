"""benchmarks/nanochat_recipe.py: nanochat's recipe trained at a preset's shape and data, recorded so
that the speedrun harness compares it with the preset's records (benchmarks/nanochat_check.py checks
it against nanochat's own code, which the tests do not have)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_LLM, run_script

ENV = {"OMP_NUM_THREADS": "1"}


def run_benchmark(*args: str, cwd) -> subprocess.CompletedProcess:
    return run_script("nanochat_recipe.py", *args, cwd=cwd, env_extra=ENV, folder="benchmarks")


def test_schedules_are_nanochats():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import nanochat_recipe as nc

    steps = 245
    down = round(0.65 * steps)
    assert nc.lr_multiplier(0, steps) == pytest.approx(1 / 40) and nc.lr_multiplier(39, steps) == 1.0
    assert nc.lr_multiplier(steps - down, steps) == 1.0 and nc.lr_multiplier(steps, steps) == pytest.approx(0.05)
    assert nc.muon_momentum(0, steps) == 0.85 and nc.muon_momentum(200, steps) == pytest.approx(0.91)
    model = nc.NanochatGPT(128, 100, 64, 4, 4, 2, 512)  # "SSSL": three windowed layers of 128, the last one full
    assert [m is None for m in model.masks] == [False, False, False, True]
    assert model.masks[0][300, 300 - 128] and not model.masks[0][300, 300 - 129] and not model.masks[0][3, 4]
    assert sorted(model.value_embeds) == ["1", "3"]  # alternate layers, the last one included
    # d12 as base_train.py builds it by default (aspect 64, heads of 128, its 32,768 tokens): 12 layers of
    # 12 d^2 matrices, value-embedding gates (12 channels to 6 heads) on 6 of them, the head
    assert nc.scaling_params(nc.reference_model(64, 128, 32768)) == 12 * 12 * 768 ** 2 + 6 * 12 * 6 + 32768 * 768
    assert nc.reference_model(64, 64, 50304).blocks[0].attn.heads == 12  # cpu-16m's heads of 64


@pytest.mark.slow
def test_nanochat_run_is_recorded_and_compared_with_the_presets_records(tmp_path):
    records, runs = tmp_path / "records", tmp_path / "runs"
    common = ["--preset", "debug", "--budget", "2048", "--runs", "2", "--records_dir", str(records), "--runs_dir", str(runs)]
    base = run_script("speedrun.py", *common, *TINY_LLM, cwd=tmp_path, env_extra=ENV)
    assert base.returncode == 0, base.stderr[-3000:]
    (baseline,) = records.glob("debug-2048-*.json")
    taken = [o for o in TINY_LLM if o.startswith(("data.", "train.batch_size", "train.eval_every"))]
    out = run_benchmark(*common, *taken, "--compare", str(baseline), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nanochat:" in out.stdout and "loss: " in out.stdout and "95% CI" in out.stdout
    (path,) = records.glob("nanochat-2048-*.json")
    rec = json.loads(path.read_text())
    assert rec["preset"] == "nanochat" and [r["seed"] for r in rec["runs"]] == [0, 1]
    assert rec["config"]["data"] == json.loads(baseline.read_text())["config"]["data"]  # the same data, so comparable
    assert rec["config"]["nanochat"]["window_pattern"] == "SSSL" and rec["comparison"]["baseline"] == baseline.name
    assert all(math.isfinite(r["loss"]) and r["tokens"] == 2048 for r in rec["runs"])
    assert "| nanochat |" in (records / "LEADERBOARD.md").read_text()
    for override in ("model.no_such_key=1", "optim.muon_lr=0.1"):  # refused, never parsed and ignored
        bad = run_benchmark("--preset", "debug", "--budget", "2048", "--runs", "1", override, cwd=tmp_path)
        assert bad.returncode != 0 and "not one this benchmark takes" in bad.stderr
        assert bad.stderr.strip().startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
