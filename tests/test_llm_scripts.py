"""The LLM scripts as a user runs them: bad input is one clear line; real text trains."""

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import LLM_DEBUG as DEBUG, ROOT, TINY_LLM, assert_one_line_error, run_script

TINY = [*TINY_LLM, "train.budget=1024"]


def test_missing_data_path_is_one_clear_line(tmp_path):
    proc = run_script("train_llm.py", "--config", DEBUG, "--data", str(tmp_path / "nope"), cwd=tmp_path)
    assert_one_line_error(proc, "data path not found", "nope")


@pytest.mark.slow
def test_unknown_config_key_is_one_clear_line(tmp_path):
    proc = run_script("train_llm.py", "--config", DEBUG, "train.batchsize=8", "--experiment_name", "x", cwd=tmp_path)
    assert_one_line_error(proc, "unknown config key", "batchsize")  # overrides may come before a flag
    proc = run_script("train_llm.py", "--config", DEBUG, "model.n_heads=3", cwd=tmp_path)
    assert_one_line_error(proc, "n_heads")
    proc = run_script("train_llm.py", "--config", DEBUG, "train.batch_size=\"many\"", cwd=tmp_path)
    assert_one_line_error(proc, "train.batch_size")


def test_unreachable_hub_names_offline_options(tmp_path):
    proc = run_script("train_llm.py", "--config", str(ROOT / "configs/llm/blueberry-88m.toml"), "--tokenizer", "bpe:400",
                      cwd=tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "--data builtin")


@pytest.mark.slow
def test_train_resume_generate_and_corrupt_checkpoint(tmp_path):
    proc = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "tiny", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "built-in generated corpus" in proc.stdout and "validation loss" in proc.stdout
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 1024 and summary["final_eval"]["loss"] > 0
    for name in ("config.toml", "metrics.jsonl", "loss_curve.png", "tokenizer.json"):
        assert (run / name).is_file(), name

    again = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "tiny", *TINY, cwd=tmp_path)
    assert_one_line_error(again, "--resume")  # never silently overwrite a run

    config = (run / "config.toml").read_text()
    finished = run_script("train_llm.py", "--experiment_name", "tiny", "--resume", cwd=tmp_path)
    assert_one_line_error(finished, "already reached its budget")
    misfit = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "tiny", "--resume", *TINY,
                        "train.budget=2048", "model.d_model=64", cwd=tmp_path)
    assert_one_line_error(misfit, "does not fit this model")
    assert json.loads((run / "summary.json").read_text()) == summary  # neither rewrote the run folder
    assert (run / "config.toml").read_text() == config

    gen = run_script("generate_llm.py", "--checkpoint", str(run), "--max_new_tokens", "5", "--temperature", "0", cwd=tmp_path)
    assert gen.returncode == 0 and gen.stdout.startswith("Once upon a time"), gen.stderr
    assert "trained weights" in gen.stderr  # this run kept no EMA; one that did is sampled with it

    # the same cache folder with another tokenizer is refused
    cache = tmp_path / "explicit-cache"
    base = [f"data.cache_dir=\"{cache}\"", *TINY]
    assert run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "c1", *base, cwd=tmp_path).returncode == 0
    proc = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "c2", *base, "data.tokenizer=\"bpe:300\"",
                      cwd=tmp_path)
    assert_one_line_error(proc, "was built with tokenizer")

    (next((run / "checkpoints").glob("step_*")) / "model.safetensors").write_bytes(b"not a safetensors file")
    gen = run_script("generate_llm.py", "--checkpoint", str(run), cwd=tmp_path)
    assert_one_line_error(gen, "corrupt")
    resumed = run_script("train_llm.py", "--experiment_name", "tiny", "--resume", "train.budget=2048", cwd=tmp_path)
    assert_one_line_error(resumed, "corrupt")


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.array(list(Counter(tokens.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_debug_preset_learns_real_text_well_below_unigram_entropy(tmp_path, data_dir):
    text = data_dir / "text" / "state_union"
    if not text.is_dir():
        pytest.skip(f"{text} not found")
    proc = run_script("train_llm.py", "--config", DEBUG, "--experiment_name", "real", "--data", str(text),
                      "--tokenizer", "bpe:1024", "train.budget=100000", "train.eval_every=0", "data.val_fraction=0.1",
                      "data.val_tokens=16384", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"local files at {text}" in proc.stdout
    cache_dir = Path(re.search(r"\[token cache (.+?)\]", proc.stdout).group(1))
    h = unigram_entropy(np.fromfile(cache_dir / "train.bin", dtype=np.uint16))
    records = [json.loads(line) for line in (tmp_path / "runs" / "real" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["split"] == "eval"][-1]
    assert records[0]["loss"] > h  # it starts worse than unigram statistics...
    assert final["loss"] < h - 1.0, (final, h)  # ...and ends far below them, on held-out documents
    assert math.isclose(final["perplexity"], math.exp(final["loss"]), rel_tol=1e-6)
