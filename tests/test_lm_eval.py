"""lm-evaluation-harness scores an export as scripts/evaluate_llm.py scores the run: the same acc and
acc_norm on a local multiple-choice task, and the same log-likelihood for every choice. Offline:
the task is a file the test writes, the harness runs with the Hub switched off.
`pytest -s` prints the figures (benchmarks/results/llm_export.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_script
from llm import downstream as ds
from llm.export import LM_EVAL_ARGS, export_run
from llm.load import load_llm_run

pytest.importorskip("lm_eval")  # a test extra: pip install -e ".[dev]"
pytest.importorskip("transformers")
from test_llm_export import fake_run  # noqa: E402  (after the skips: it needs transformers)

TASK = "blueberry_items"
# The harness joins context and choice with target_delimiter " " and moves a context's trailing
# whitespace to the choice, as llm/downstream.py's encode_pair does; acc_norm divides by the
# choice's characters in both.
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# lm-eval's Python API in a fresh process, so that the Hub switches below hold from its first import
HARNESS = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

include, task, out, extra, *exports = sys.argv[1:]
manager = TaskManager(include_path=include)
results = {}
for export in exports:
    r = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},trust_remote_code=True,dtype=float32{extra}",
                                tasks=[task], task_manager=manager, device="cpu", batch_size=8, log_samples=True,
                                bootstrap_iters=0, random_seed=0)
    samples = sorted(r["samples"][task], key=lambda s: s["doc_id"])
    results[export] = {"acc": r["results"][task]["acc,none"], "acc_norm": r["results"][task]["acc_norm,none"],
                       "logprobs": [[float(x[0]) for x in s["filtered_resps"]] for s in samples]}
with open(out, "w") as f:
    json.dump(results, f)
"""


def items() -> list[dict]:
    """20 items whose choices differ in length (so that acc and acc_norm can differ); one context
    ends in a space and one is empty, the two cases where the joining rules matter."""
    words = ["small", "corpus", "words", "merges", "more", "and", "for", "a", "the", "of"]
    rows = []
    for i in range(20):
        context = " ".join(words[(i + j) % len(words)] for j in range(2 + i % 4))
        context = {7: context + " ", 13: ""}.get(i, context)
        choices = [" ".join(words[(i * 3 + k + j) % len(words)] for j in range(1 + (k + i) % 3)) for k in range(2 + i % 3)]
        rows.append({"context": context, "choices": choices, "label": i % len(choices)})
    return rows


@pytest.mark.slow
def test_lm_eval_scores_an_export_as_evaluate_llm_does(tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items()))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(data))))

    runs = {"relu2 (Blueberry custom code)": dict(mlp="relu2"), "swiglu + QK-norm (Qwen3)": dict(mlp="swiglu")}
    exports = {}
    for i, (name, kw) in enumerate(runs.items()):
        fake_run(tmp_path / f"run{i}", **kw)
        exports[name] = export_run(load_llm_run(tmp_path / f"run{i}"), tmp_path / f"hf{i}").folder

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    # in tmp_path: the export's own modelling files serve the model (their imports: test_llm_export.py)
    harness = subprocess.run([sys.executable, "-c", HARNESS, str(tasks), TASK, str(tmp_path / "lm_eval.json"),
                              LM_EVAL_ARGS, *map(str, exports.values())],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert harness.returncode == 0, harness.stderr[-3000:]
    theirs = json.loads((tmp_path / "lm_eval.json").read_text())

    examples = ds.load_local("items", data).examples
    for i, (name, export) in enumerate(exports.items()):
        proc = run_script("evaluate_llm.py", "--checkpoint", str(tmp_path / f"run{i}"), "--tasks", f"items={data}",
                          "--device", "cpu", "--precision", "fp32", "--output", str(tmp_path / f"ours{i}.json"),
                          cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        ours = json.loads((tmp_path / f"ours{i}.json").read_text())["tasks"]["items"]
        run = load_llm_run(tmp_path / f"run{i}")
        requests, _ = ds.build_requests(run.tokenizer, examples, run.model.max_seq_len)
        logprobs = ds.score_requests(run.model, requests)
        got = theirs[str(export)]
        flat = [lp for item in got["logprobs"] for lp in item]
        diff = max(abs(a - b) for a, b in zip(flat, logprobs))
        print(f"\n{name}: 20 items, {len(flat)} choices; evaluate_llm acc {ours['acc']:.2f} acc_norm "
              f"{ours['acc_norm']:.2f}; lm-eval acc {got['acc']:.2f} acc_norm {got['acc_norm']:.2f}; "
              f"max |log-likelihood difference| {diff:.2e}")
        bad = [(k, a, b) for k, (a, b) in enumerate(zip(flat, logprobs)) if abs(a - b) > 1e-4]
        assert len(flat) == len(logprobs) and diff < 1e-4, bad
        assert round(got["acc"], 4) == ours["acc"] and round(got["acc_norm"], 4) == ours["acc_norm"]
