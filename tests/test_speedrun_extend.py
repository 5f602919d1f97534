"""`scripts/speedrun.py --extend`: more seeds of a record, from its commit, in one record with its runs;
`--merge`: one record of the seeds of several records of one setup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_LLM, assert_one_line_error, run_script
from llm.speedrun import (SCHEMA, check_same_setup, commit_worktree, compare, comparison_lines, extension_plan, git_state,
                          hardware_string, leaderboard, merge_records, merged_record, mixed_cpu_models, summarise,
                          uncommitted_training_changes, with_cpu_models)
from shared.errors import UserError
from shared.trainer import hardware_info

HW = {"device": "cpu", "cpu": "x86_64", "cpu_threads": 1}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def clean_copy(dest: Path) -> Path:
    """The working tree's code (uncommitted edits included) as a clean commit of a repository of its own."""
    for part in ("llm", "shared", "configs/llm", "scripts/speedrun.py", "scripts/train_llm.py"):
        src, out = ROOT / part, dest / part
        if src.is_dir():
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, out)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "code under test")
    return dest


def record(label: str, losses: list[float], commit: str | None, dirty: bool | None = False, seed0: int = 0,
           **extra) -> dict:
    runs = [{"seed": seed0 + i, "loss": x, "accuracy": 0.5, "perplexity": 20.0, "train_time_s": 1.0}
            for i, x in enumerate(losses)]
    return {"schema": SCHEMA, "label": label, "preset": "debug", "budget": 2048, "overrides": [], "git_commit": commit,
            "git_dirty": dirty, "hardware": HW, "runs": runs, "curves": [{"seed": r["seed"]} for r in runs],
            "summary": summarise(runs), "config": {"train": {"seed": 0, "budget": 2048}, "data": {"seq_len": 32}},
            "data": {"sha256": "abc"}, **extra}


def test_extension_needs_the_records_clean_commit_and_continues_its_seeds(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    commit, dirty = git_state(repo)
    assert dirty is False
    plan = extension_plan("r.json", record("x", [3.0, 3.1], commit, overrides=["optim.adam_lr=0.01"]), repo)
    assert plan["seed0"] == 2 and plan["label"] == "x" and plan["overrides"] == ["optim.adam_lr=0.01"]
    (repo / "data_cache").mkdir()  # a path inside the checkout, which a record writes relative to it
    plan = extension_plan("r.json", record("x", [3.0], commit, overrides=["data.source=data_cache"]), repo)
    assert plan["overrides"] == [f"data.source={json.dumps(str((repo / 'data_cache').resolve()))}"]
    for rec, words in ((record("x", [3.0], "0" * 40), "not in this checkout"),
                       (record("x", [3.0], commit, dirty=True), "clean commit"),
                       (record("x", [3.0], None), "clean commit"),
                       (record("x", [3.0], commit, overrides=["data.source=sha256:1234"]), "content hash")):
        with pytest.raises(UserError, match=words):
            extension_plan("r.json", rec, repo)
    assert plan["commit"] == commit and plan["elsewhere"] is None  # trained here
    (repo / "llm" / "speedrun.py").write_text("# edited\n")
    assert extension_plan("r.json", record("x", [3.0], commit), repo)["elsewhere"] == "this checkout has uncommitted changes"
    git(repo, "commit", "-qam", "the harness changes: the training code is the record's")
    assert extension_plan("r.json", record("x", [3.0], commit), repo)["elsewhere"] is None
    (repo / "llm" / "model.py").write_text("# edited\n")
    git(repo, "commit", "-qam", "the model changes")
    plan = extension_plan("r.json", record("x", [3.0], commit), repo)
    assert plan["elsewhere"] == "llm/model.py changed since the record's commit" and plan["commit"] == commit
    with commit_worktree(repo, commit) as tree:  # where such seeds train: the record's commit, checked out apart
        assert "# edited" not in (tree / "llm" / "model.py").read_text() and git_state(tree) == (commit, False)
    assert not tree.exists() and str(tree) not in git(repo, "worktree", "list")


def test_new_runs_must_train_what_the_records_runs_did():
    old = record("x", [3.0], "c")
    run = {"config": {"train": {"seed": 5, "budget": 2048}, "data": {"seq_len": 32}}, "data": {"sha256": "abc"},
           "hardware": HW}
    check_same_setup(old, run, "r.json")  # only the seed differs
    with pytest.raises(UserError, match="data.seq_len is 64, the record's 32"):
        check_same_setup(old, {**run, "config": {"train": {"seed": 5}, "data": {"seq_len": 64}}}, "r.json")
    with pytest.raises(UserError, match="another content"):
        check_same_setup(old, {**run, "data": {"sha256": "def"}}, "r.json")
    with pytest.raises(UserError, match="2 threads"):
        check_same_setup(old, {**run, "hardware": {**HW, "cpu_threads": 2}}, "r.json")


def test_a_folder_named_by_its_content_hash_is_the_same_data_as_its_path(tmp_path, monkeypatch):
    # A checkout outside the workspace names the data folder `sha256:...`; one inside names its
    # path. Both name the same bytes, so the records compare and extend each other.
    import llm.speedrun as sr
    monkeypatch.setattr(sr, "ROOT", tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    (text := tmp_path / "data" / "text").mkdir(parents=True)
    (text / "a.txt").write_text("some words\n")
    named = f"sha256:{sr.path_hash(text)}"
    assert sr.same_name("../data/text", named) and sr.same_name(named, "../data/text")
    assert not sr.same_name("../data/other", named) and not sr.same_name("sha256:0", "../data/text")
    assert not sr.same_name("", named) and not sr.same_name("..", f"sha256:{sr.path_hash(tmp_path)}")
    old = {**record("x", [3.0], "c"), "config": {"train": {"seed": 0}, "data": {"source": "../data/text"}}}
    run = {"config": {"train": {"seed": 5}, "data": {"source": named}}, "data": {"sha256": "abc"}, "hardware": HW}
    check_same_setup({**old, "data": {"sha256": "abc"}}, run, "r.json")
    hashed = sr.record_data(run)
    sr.check_comparable(old, "x", old["budget"], "r.json", hashed)
    (text / "a.txt").write_text("other words\n")  # the folder changed: the hash no longer names it
    with pytest.raises(UserError, match="trained on other data"):
        sr.check_comparable(old, "x", old["budget"], "r.json", hashed)


def test_the_cpu_model_is_compared_where_both_records_name_it_and_an_unnamed_one_stays_unnamed():
    run = {"config": {"train": {"seed": 5, "budget": 2048}, "data": {"seq_len": 32}}, "data": {"sha256": "abc"},
           "hardware": {**HW, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": "AVX512"}}
    old = record("x", [3.0, 3.1], "c")  # written before records named the CPU model
    check_same_setup(old, run, "r.json")  # unknown is not a difference
    named = {**old, "hardware": {**HW, "cpu_model": "AMD EPYC 7B13", "cpu_isa": "AVX2"}}
    with pytest.raises(UserError, match=r"AMD EPYC 7B13 AVX2 \(1 threads\), this one on cpu Intel.*cpu_isa differs"):
        check_same_setup(named, run, "r.json")
    new = {**record("x", [3.4, 3.5], "c", seed0=2), "hardware": run["hardware"]}
    assert merged_record(old, new, "r.json")["hardware"] == HW  # seed 0's CPU is not relabelled
    assert merged_record(new, {**new, "runs": []}, "r.json")["hardware"] == run["hardware"]
    assert compare(old, new, "r.json")["same_hardware"] and not compare(named, new, "r.json")["same_hardware"]
    here = hardware_info(torch.device("cpu"))
    assert here["cpu_model"] and here["cpu_model"] in hardware_string(here)


def test_seeds_from_another_cpu_model_of_the_same_isa_extend_a_record_and_its_time_is_marked(tmp_path):
    xeon = {**HW, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": "AVX512"}
    other = {**xeon, "cpu_model": "Intel(R) Xeon(R) Processor @ 2.80GHz"}
    old = {**record("x", [3.0, 3.1], "c"), "hardware": xeon}  # runs written before they named their model
    run = {"config": {"train": {"seed": 5, "budget": 2048}, "data": {"seq_len": 32}}, "data": {"sha256": "abc"},
           "hardware": other}
    check_same_setup(old, run, "r.json")  # the loss of a seed does not depend on the model: accepted
    with pytest.raises(UserError, match="cpu_threads differs"):
        check_same_setup(old, {**run, "hardware": {**other, "cpu_threads": 2}}, "r.json")
    new = {**record("x", [3.4], "c", seed0=2), "hardware": other}
    new["runs"][0]["cpu_model"] = other["cpu_model"]
    merged = merged_record(old, new, "r.json")
    assert "cpu_model" not in merged["hardware"] and merged["hardware"]["cpu_isa"] == "AVX512"
    assert [r["cpu_model"] for r in merged["runs"]] == [xeon["cpu_model"]] * 2 + [other["cpu_model"]]
    assert mixed_cpu_models(merged) == sorted([xeon["cpu_model"], other["cpu_model"]]) and not mixed_cpu_models(old)
    assert merged_record(old, {**new, "hardware": xeon, "runs": [{**new["runs"][0], "cpu_model": None}]},
                         "r.json")["hardware"] == xeon  # one model throughout: still named
    cmp = compare(old, merged, "r.json")
    assert compare(old, old, "r.json")["same_hardware"] and not cmp["same_hardware"]
    assert any("several CPU models" in line for line in comparison_lines(cmp))
    path = tmp_path / "debug-2048-x-20261206-000000.json"
    path.write_text(json.dumps(merged))
    assert "(several CPU models)" in leaderboard(tmp_path)
    unnamed = record("x", [3.0, 3.1], "c")  # before records named the model, extended on model B
    later = merged_record(unnamed, {**new, "runs": [{**new["runs"][0], "cpu_model": other["cpu_model"]}]}, "r.json")
    on_a = {**old, "runs": with_cpu_models(old)}
    assert not mixed_cpu_models(later) and not compare(on_a, later, "r.json")["same_hardware"]  # A against B


def test_the_merged_record_holds_every_run_and_supersedes_the_old_one_on_the_leaderboard(tmp_path):
    old, new = record("x", [3.0, 3.2], "c"), record("x", [3.4], "c")
    new["runs"][0]["seed"] = 2
    merged = merged_record(old, new, "debug-2048-x-1.json")
    assert [r["seed"] for r in merged["runs"]] == [0, 1, 2] and merged["extends"] == "debug-2048-x-1.json"
    assert merged["summary"]["loss"]["mean"] == pytest.approx(3.2) and merged["summary"]["loss"]["n"] == 3
    (tmp_path / "debug-2048-x-1.json").write_text(json.dumps(old))
    (tmp_path / "debug-2048-x-2.json").write_text(json.dumps(merged))
    board = leaderboard(tmp_path)
    assert "debug-2048-x-2.json" in board and "debug-2048-x-1.json](" not in board


def test_merge_groups_the_seeds_of_records_of_one_setup_and_training_code(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    commit, _ = git_state(repo)
    a, b = record("nc", [3.0, 3.2], commit, extends="a0.json"), record("nc", [3.4], commit, seed0=3)
    merged = merge_records([("r/a.json", a), ("r/b.json", b)], repo)
    assert [r["seed"] for r in merged["runs"]] == [0, 1, 3] and merged["merges"] == ["a.json", "b.json", "a0.json"]
    assert "extends" not in merged
    assert merged["summary"]["loss"]["mean"] == pytest.approx(3.2) and len(merged["curves"]) == 3
    (repo / "llm" / "speedrun.py").write_text("# the harness changes\n")
    git(repo, "commit", "-qam", "harness")
    later = git_state(repo)[0]
    assert len(merge_records([("a.json", a), ("b.json", record("nc", [3.4], later, seed0=3))], repo)["runs"]) == 3
    for path in ("llm/model.py", "benchmarks/nanochat_recipe.py"):  # a benchmark's own trainer is training code too
        (repo / path).parent.mkdir(exist_ok=True)
        (repo / path).write_text("# edited\n")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", path)
        with pytest.raises(UserError, match=f"{path} differs between their commits"):
            merge_records([("a.json", a), ("b.json", record("nc", [3.4], git_state(repo)[0], seed0=3))], repo)
    other = record("nc", [3.4], commit, seed0=3)
    other["config"] = {"train": {"seed": 3}, "data": {"seq_len": 64}}
    for rec, words in ((record("nc", [3.4], commit, seed0=1), "seed 1 is in a.json too"),
                       (record("other", [3.4], commit, seed0=3), 'its label is "other", the other.s "nc"'),
                       (record("nc", [3.4], commit, dirty=True, seed0=3), "clean commit"),
                       (other, "its data.seq_len is 64, the record's 32")):
        with pytest.raises(UserError, match=words):
            merge_records([("a.json", a), ("b.json", rec)], repo)
    with pytest.raises(UserError, match="two or more"):
        merge_records([("a.json", a)], repo)
    merged = merge_records([("debug-2048-nc-1.json", a), ("debug-2048-nc-2.json", b)], repo)
    for name, rec in (("debug-2048-nc-1.json", a), ("debug-2048-nc-2.json", b), ("debug-2048-nc-3.json", merged)):
        (tmp_path / name).write_text(json.dumps(rec))
    board = leaderboard(tmp_path)
    assert "debug-2048-nc-3.json](" in board and "debug-2048-nc-1.json](" not in board and "nc-2.json](" not in board


def test_merge_from_the_command_line_writes_one_record_and_tests_it(tmp_path):
    commit, dirty = git_state(ROOT)
    if commit is None:
        pytest.skip("not a git checkout")
    files = {}
    for name, rec in (("base", record("base", [3.5, 3.6, 3.55], commit)), ("a", record("nc", [3.0, 3.1], commit)),
                      ("b", record("nc", [3.05], commit, seed0=2))):
        files[name] = tmp_path / f"debug-2048-{name}.json"
        files[name].write_text(json.dumps(rec))
    out = tmp_path / "records"
    proc = run_script("speedrun.py", "--merge", str(files["a"]), str(files["b"]), "--compare", str(files["base"]),
                      "--records_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (merged,) = out.glob("debug-2048-nc-*.json")
    rec = json.loads(merged.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0, 1, 2] and rec["comparison"]["loss"]["n_new"] == 3
    assert "loss: better at p < 0.01" in proc.stdout and (out / "LEADERBOARD.md").is_file()
    refused = run_script("speedrun.py", "--merge", str(files["a"]), str(files["a"]), "--records_dir", str(out), cwd=tmp_path)
    assert_one_line_error(refused, "seed 0 is in", "debug-2048-a.json too")
    refused = run_script("speedrun.py", "--merge", str(files["a"]), str(files["b"]), "--preset", "debug", cwd=tmp_path)
    assert_one_line_error(refused, "trains nothing")


def harness(repo: Path, tmp_path: Path):
    """scripts/speedrun.py of `repo`, its records and runs under tmp_path."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}

    def speedrun(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(repo / "scripts" / "speedrun.py"), "--records_dir",
                               str(tmp_path / "records"), "--runs_dir", str(tmp_path / "runs"), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
    return speedrun


@pytest.mark.slow
def test_extend_trains_more_seeds_and_tests_them_with_the_old_ones(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    records, speedrun = tmp_path / "records", harness(repo, tmp_path)
    common = ["--preset", "debug", "--budget", "2048", *TINY_LLM]
    base = speedrun(*common, "--runs", "2", "--label", "baseline")
    assert base.returncode == 0, base.stderr[-3000:]
    assert "this checkout's commit, checked out at" in base.stdout  # an edit during the runs cannot reach them
    assert len(git(repo, "worktree", "list").splitlines()) == 1
    (baseline,) = records.glob("debug-2048-baseline-*.json")
    one = speedrun(*common, "--runs", "1", "optim.adam_lr=0.01", "--label", "lr")
    assert one.returncode == 0, one.stderr[-3000:]
    (first,) = records.glob("debug-2048-lr-*.json")
    more = speedrun("--extend", str(first), "--runs", "1", "--compare", str(baseline))
    assert more.returncode == 0, more.stderr[-3000:]
    assert "seeds 1..1" in more.stdout and "extending" in more.stdout and "loss: " in more.stdout
    (merged,) = set(records.glob("debug-2048-lr-*.json")) - {first}
    rec, old = json.loads(merged.read_text()), json.loads(first.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0, 1] and rec["runs"][0] == old["runs"][0]
    assert rec["extends"] == first.name and rec["overrides"] == old["overrides"] and rec["comparison"]["loss"]["n_new"] == 2
    board = (records / "LEADERBOARD.md").read_text()
    assert f"[{merged.name}]" in board and f"[{first.name}]" not in board
    for args, words in ((["--extend", str(first), "--runs", "1", "--preset", "debug"], "only --runs"),
                        (["--extend", str(first), "--runs", "1", "--seed0", "0"], "only --runs"),
                        (["--extend", str(first), "--runs", "1"], f"{merged.name} extends it already"),
                        (["--extend", str(merged), str(merged), "--runs", "1"], "given twice"),
                        (["--extend", str(merged), str(first), "--runs", "1"], f"{merged.name} extends it already")):
        refused = speedrun(*args)  # every record's refusal before any trains
        assert refused.returncode != 0 and words in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert "training code:" not in refused.stdout
    assert len(list(records.glob("debug-2048-lr-*.json"))) == 2 and len(git(repo, "worktree", "list").splitlines()) == 1

    # a queue of extensions: each record in turn, from its commit, then side by side against the baseline
    other = speedrun(*common, "--runs", "1", "optim.adam_lr=0.02", "--label", "lr2")
    assert other.returncode == 0, other.stderr[-3000:]
    (second,) = records.glob("debug-2048-lr2-*.json")
    both = speedrun("--extend", str(merged), str(second), "--runs", "1", "--compare", str(baseline))
    assert both.returncode == 0, both.stderr[-3000:]
    assert "=== 1/2: extending" in both.stdout and "=== 2/2: extending" in both.stdout and "seeds 2..2" in both.stdout
    table = both.stdout.split("2 records (debug, 2,048 tokens")[1].splitlines()
    assert any(row.startswith("lr ") for row in table) and any(row.startswith("lr2 ") for row in table)
    assert "vs-2-records.png" in both.stdout
    (lr3,) = set(records.glob("debug-2048-lr-*.json")) - {first, merged}
    (lr2,) = set(records.glob("debug-2048-lr2-*.json")) - {second}
    assert [r["seed"] for r in json.loads(lr3.read_text())["runs"]] == [0, 1, 2]
    assert [r["seed"] for r in json.loads(lr2.read_text())["runs"]] == [0, 1]
    assert len(git(repo, "worktree", "list").splitlines()) == 1  # both worktrees removed


@pytest.mark.slow
def test_extend_trains_with_the_records_code_when_the_checkout_has_moved_on(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    records, speedrun = tmp_path / "records", harness(repo, tmp_path)
    first_run = speedrun("--preset", "debug", "--budget", "2048", *TINY_LLM, "--runs", "1", "--label", "moved")
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    (first,) = records.glob("debug-2048-moved-*.json")
    train = repo / "scripts" / "train_llm.py"  # the checkout's training code now fails at once
    train.write_text(train.read_text().replace("from __future__ import annotations\n", "from __future__ import "
                                               "annotations\nraise SystemExit('error: the new training code ran')\n", 1))
    git(repo, "commit", "-qam", "the training code changes")
    (repo / "notes.txt").write_text("uncommitted\n")
    more = speedrun("--extend", str(first), "--runs", "1")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "scripts/train_llm.py changed since the record's commit" in more.stdout
    (merged,) = set(records.glob("debug-2048-moved-*.json")) - {first}
    rec, old = json.loads(merged.read_text()), json.loads(first.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0, 1] and (rec["git_commit"], rec["git_dirty"]) == (old["git_commit"], False)
    assert len(git(repo, "worktree", "list").splitlines()) == 1  # the worktree it trained in is gone


@pytest.mark.slow
def test_a_stopped_speedrun_keeps_its_finished_seeds_as_a_record_to_extend(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    records, runs = tmp_path / "records", tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(repo / "scripts" / "speedrun.py"), "--records_dir", str(records), "--runs_dir", str(runs)]
    proc = subprocess.Popen([*cmd, "--preset", "debug", "--budget", "2048", "--runs", "3", *TINY_LLM, "--label", "cut"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:  # stopped (the harness and its training run) as soon as one seed is recorded
        seen.append(line)
        if line.startswith("record so far (1 of 3 runs)"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert any("record so far" in s for s in seen), "".join(seen)
    (kept,) = records.glob("debug-2048-cut-*")  # one whole record file, no temporary one
    rec = json.loads(kept.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0] and f"[{kept.name}]" in (records / "LEADERBOARD.md").read_text()
    more = subprocess.run([*cmd, "--extend", str(kept), "--runs", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    (extended,) = set(records.glob("debug-2048-cut-*.json")) - {kept}
    assert [r["seed"] for r in json.loads(extended.read_text())["runs"]] == [0, 1]


def test_only_uncommitted_training_code_makes_a_new_speedrun_dirty(tmp_path):
    """A record written since the commit (the first speedrun's, before the second starts) or a doc
    leaves the next speedrun on the commit, in a worktree, recorded clean; a changed preset or
    module, a new one or a renamed one does not."""
    repo = tmp_path / "repo"
    for path in ("llm/model.py", "configs/llm/a.toml", "benchmarks/records/LEADERBOARD.md", "README.md"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "start")
    (repo / "benchmarks/records/LEADERBOARD.md").write_text("y\n")
    (repo / "benchmarks/records/debug-2048-a-1.json").write_text("{}")
    (repo / "README.md").write_text("y\n")
    assert git_state(repo)[1] is True and uncommitted_training_changes(repo) == []
    (repo / "llm/new module.py").write_text("x\n")  # a space: git quotes such names without -z
    git(repo, "mv", "configs/llm/a.toml", "configs/llm/b.toml")
    assert sorted(uncommitted_training_changes(repo)) == ["configs/llm/a.toml", "configs/llm/b.toml", "llm/new module.py"]
    (repo / "mine.toml").write_text("x\n")  # a preset outside configs/: training code of the run that names it
    assert "mine.toml" not in uncommitted_training_changes(repo) and "mine.toml" in uncommitted_training_changes(repo, ["mine.toml"])
