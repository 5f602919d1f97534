"""The speedrun harness: seeded runs become a record (mean ± sd, git, hardware, config, curves), a
comparison by Welch's one-sided t-test gives known verdicts, the leaderboard is generated and
stable, and bad input is one line."""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from conftest import TINY_LLM, assert_one_line_error, run_script
from llm.speedrun import (SCHEMA, compare, comparison_lines, derive_label, format_budget, leaderboard, load_record,
                          parse_budget, resolve_preset)
from llm.speedrun_screen import judge, screen_title
from shared.errors import UserError
from shared.stats import mean_std, paired_less, runs_to_show, welch_df, welch_less

# the harness sets train.budget and train.seed itself
TINY = TINY_LLM
ENV = {"OMP_NUM_THREADS": "1"}


def synthetic(path: Path, label: str, losses: list[float], times: list[float], budget: int = 2048) -> Path:
    """A record as the harness writes it, with only what the comparison and the leaderboard read."""
    runs = [{"seed": i, "loss": loss, "accuracy": 0.5, "perplexity": float(np.exp(loss)), "train_time_s": t}
            for i, (loss, t) in enumerate(zip(losses, times))]
    path.write_text(json.dumps({"schema": SCHEMA, "label": label, "preset": "debug", "budget": budget, "overrides": [],
                                "hardware": {"device": "cpu", "cpu": "x86_64", "cpu_threads": 1}, "runs": runs}))
    return path


@pytest.mark.slow
def test_speedrun_end_to_end_with_comparison(tmp_path):
    records = tmp_path / "records"
    common = ["--preset", "debug", "--budget", "2048", "--runs", "2", "--records_dir", str(records),
              "--runs_dir", str(tmp_path / "runs")]
    base = run_script("speedrun.py", *common, *TINY, "--label", "baseline", cwd=tmp_path, env_extra=ENV)
    assert base.returncode == 0, base.stderr[-3000:]
    assert "run 2/2: seed 1" in base.stdout and "validation loss" in base.stdout and "val loss" in base.stdout
    (first,) = records.glob("debug-2048-*.json")
    new = run_script("speedrun.py", *common, *TINY, "optim.matrix_optimizer=\"adamw\"", "--label", "adamw",
                     "--compare", str(first), cwd=tmp_path, env_extra=ENV)
    assert new.returncode == 0, new.stderr[-3000:]
    assert "loss: " in new.stdout and "time: " in new.stdout and "95% CI" in new.stdout
    (second,) = records.glob("debug-2048-adamw-*.json")

    for path in (first, second):
        rec = json.loads(path.read_text())
        assert rec["preset"] == "debug" and rec["budget"] == 2048 and [r["seed"] for r in rec["runs"]] == [0, 1]
        for key in ("loss", "accuracy", "perplexity", "train_time_s"):
            values = [r[key] for r in rec["runs"]]
            assert rec["summary"][key]["mean"] == pytest.approx(statistics.mean(values))
            assert rec["summary"][key]["std"] == pytest.approx(statistics.stdev(values))
        assert len(rec["git_commit"]) == 40 and isinstance(rec["git_dirty"], bool)
        assert rec["hardware"]["device"] == "cpu" and rec["config"]["data"]["seq_len"] == 32
        assert rec["config"]["train"]["budget"] == 2048
        assert [c["eval"][-1][1] for c in rec["curves"]] == [r["loss"] for r in rec["runs"]]
        runs_dir = tmp_path / "runs"  # a record names each run folder under the runs folder, never by an absolute path
        assert all(c["train"] and (runs_dir / r["run_dir"] / "summary.json").is_file() for c, r in zip(rec["curves"], rec["runs"]))
    rec = json.loads(second.read_text())
    assert rec["overrides"][-1] == "optim.matrix_optimizer=\"adamw\"" and rec["config"]["optim"]["matrix_optimizer"] == "adamw"
    cmp = rec["comparison"]
    assert cmp["baseline"] == first.name and all(0 <= cmp[k]["p"] <= 1 for k in ("loss", "time"))

    board = (records / "LEADERBOARD.md").read_text()
    assert "| baseline |" in board and "| adamw |" in board and first.name in board and "do not edit" in board
    for path in (first, second):  # a picture beside each record, linked from the leaderboard
        assert path.with_suffix(".png").is_file() and f"([plot]({path.with_suffix('.png').name}))" in board
    again = run_script("speedrun.py", "--leaderboard", "--records_dir", str(records), cwd=tmp_path)
    assert again.returncode == 0 and (records / "LEADERBOARD.md").read_text() == board  # same records, same bytes

    # one run against the baseline: a screen (same seed, place in the spread), recorded, no test
    one = run_script("speedrun.py", *common[:5], "1", *common[6:], *TINY, "optim.adam_lr=0.02", "--label", "screen",
                     "--compare", str(first), cwd=tmp_path, env_extra=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"screened against {first.name} (baseline): no test" in one.stdout and "same seed (0)" in one.stdout
    (third,) = records.glob("debug-2048-screen-*.json")
    rec = json.loads(third.read_text())
    assert "comparison" not in rec and rec["screen"]["n_new"] == 1 and rec["screen"]["same_seeds"]["seeds"] == [0]


def test_known_verdicts_on_synthetic_records(tmp_path):
    times = [10.0, 10.2, 9.8, 10.0]
    base = synthetic(tmp_path / "base.json", "base", [3.00, 3.01, 2.99, 3.00], times)
    cand = synthetic(tmp_path / "cand.json", "cand", [2.80, 2.81, 2.79, 2.80], times)
    proc = run_script("speedrun.py", "--compare", str(base), "--candidate", str(cand), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loss: better at p < 0.01" in proc.stdout and "time: not shown better at p < 0.01" in proc.stdout
    picture = tmp_path / "cand-vs-base.png"  # both sides and the verdict, beside the candidate
    assert f"picture: {picture}" in proc.stdout and picture.stat().st_size > 10_000

    b, c = json.loads(base.read_text()), json.loads(cand.read_text())
    better = compare(b, c, "base")
    assert better["loss"]["better"] and better["loss"]["p"] < 1e-4 and not better["time"]["better"]
    lo, hi = better["loss"]["ci"]
    assert lo < -0.2 < hi and better["loss"]["diff"] == pytest.approx(-0.2)
    same = compare(b, {**b, "label": "same"}, "base")
    assert not same["loss"]["better"] and same["loss"]["p"] == pytest.approx(0.5)
    assert "| 1 | debug | cand |" in leaderboard(tmp_path) and "| 2 | debug | base |" in leaderboard(tmp_path)

    # over many draws the interval covers the true difference about 95% of the time, and a change
    # that does nothing is called better about 1% of the time (unequal spreads: Welch's case)
    rng = np.random.default_rng(0)
    trials = [welch_less(rng.normal(0.1, 0.05, 4), rng.normal(0.0, 0.2, 6)) for _ in range(1000)]
    assert 0.925 < np.mean([t.ci[0] < 0.1 < t.ci[1] for t in trials]) < 0.975
    null = [welch_less(rng.normal(0.0, 0.05, 4), rng.normal(0.0, 0.2, 6)).p < 0.01 for _ in range(1000)]
    assert np.mean(null) < 0.025


def test_welch_against_scipy_and_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    va, vb = statistics.variance(a), statistics.variance(b)
    df = (va / 4 + vb / 5) ** 2 / ((va / 4) ** 2 / 3 + (vb / 5) ** 2 / 4)
    assert welch_df(va, 4, vb, 5) == pytest.approx(df) and df == pytest.approx(5.5208, abs=1e-4)
    w = welch_less(a, b, confidence=0.9)
    ref = st.ttest_ind(a, b, equal_var=False, alternative="less")
    assert (w.t, w.p, w.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df))
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert w.ci == pytest.approx((ci.low, ci.high)) and w.diff == pytest.approx(2.5 - 6.0)
    pooled = np.sqrt((3 * va + 4 * vb) / 7)
    assert w.cohen_d == pytest.approx(-3.5 / pooled) and w.hedges_g == pytest.approx(-3.5 / pooled * (1 - 3 / 27))
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(statistics.stdev(a))) and mean_std([5.0]) == (5.0, None)
    assert welch_less([1.0, 1.0], [2.0, 2.0]).p == 0.0 and welch_less([2.0, 2.0], [2.0, 2.0]).p == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        welch_less([1.0], [1.0, 2.0])


def test_the_paired_test_against_scipy_and_in_the_comparison(tmp_path):
    new, base = [5.56, 5.57, 5.60], [5.60, 5.60, 5.63]  # each seed lower by a steady 0.03-0.04
    pt = paired_less(new, base, confidence=0.9)
    ref = st.ttest_rel(new, base, alternative="less")
    assert (pt.t, pt.p, pt.df) == pytest.approx((ref.statistic, ref.pvalue, 2))
    ci = st.ttest_rel(new, base).confidence_interval(0.9)
    assert pt.ci == pytest.approx((ci.low, ci.high)) and pt.diff == pytest.approx(-0.1 / 3)
    assert paired_less([1.0, 2.0], [2.0, 3.0]).p == 0.0 and paired_less([2.0, 3.0], [2.0, 3.0]).p == 1.0
    with pytest.raises(ValueError, match="2 or more pairs"):
        paired_less([1.0, 2.0], [1.0, 2.0, 3.0])
    # the harness: Welch's verdict, and beside it the paired test over the seeds both records ran
    a = json.loads(synthetic(tmp_path / "a.json", "a", base + [5.58], [1.0] * 4).read_text())
    b = json.loads(synthetic(tmp_path / "b.json", "b", new, [1.0] * 3).read_text())
    cmp = compare(a, b, "a.json")
    assert cmp["loss_paired"]["seeds"] == [0, 1, 2] and cmp["loss_paired"]["p"] == pytest.approx(ref.pvalue)
    assert not cmp["loss"]["better"] and cmp["loss_paired"]["better"]  # Welch cannot tell at n=3; the pairs can
    lines = comparison_lines(cmp)
    assert lines[-2].startswith("paired by seed (seeds 0-2): loss difference -0.0333") and "verdict is Welch's" in lines[-2]
    need = cmp["loss_runs_to_show"]  # Welch's verdict not reached: how many runs would reach it
    assert "paired" not in need and need["welch"] == runs_to_show(cmp["loss"]["diff"], mean_std(new)[1],
                                                                   mean_std(base + [5.58])[1], 0.01)
    assert lines[-1].startswith("to a verdict: ") and f"about {need['welch']} runs a side" in lines[-1]
    b["runs"] = [{**r, "seed": r["seed"] + 10} for r in b["runs"]]  # no seed in common: no paired test
    assert "loss_paired" not in compare(a, b, "a.json")


def test_runs_to_a_verdict_agree_with_the_normal_formula_and_a_simulation():
    rng = np.random.default_rng(0)
    diff, sd_new, sd_base, z = -0.02, 0.015, 0.02, st.norm.ppf(0.99) + st.norm.ppf(0.8)
    n = runs_to_show(diff, sd_new, sd_base, 0.01)
    normal = int(np.ceil(z**2 * (sd_new**2 + sd_base**2) / diff**2))  # known variances: a little fewer runs
    assert normal <= n <= normal + 3

    def welch_power(k):  # the share of simulated k-a-side comparisons that Welch's test calls better
        a, b = rng.normal(diff, sd_new, (4000, k)), rng.normal(0.0, sd_base, (4000, k))
        return np.mean(st.ttest_ind(a, b, axis=1, equal_var=False, alternative="less").pvalue < 0.01)
    assert 0.78 < welch_power(n) and welch_power(n - 2) < 0.78

    m = runs_to_show(diff, 0.01, 0.0, 0.01, paired=True)  # the sd of the per-seed differences
    def paired_power(k):
        d = rng.normal(diff, 0.01, (4000, k))
        return np.mean(st.ttest_1samp(d, 0.0, axis=1, alternative="less").pvalue < 0.01)
    assert m < n and 0.78 < paired_power(m) and paired_power(m - 2) < 0.78
    assert runs_to_show(0.0, 0.01, 0.01, 0.01) is None and runs_to_show(-1e-4, 0.05, 0.05, 0.01) is None  # > 200
    assert runs_to_show(-0.01, 0.0, 0.0, 0.01) == 2  # no spread: any two runs a side show it


def test_one_run_against_a_baseline_is_a_screen_without_a_p_value(tmp_path):
    """One run is the usual first look at an option: it gets its loss beside the baseline's on the
    same seed and its place in the baseline's spread, never a test (compare still refuses it)."""
    b = json.loads(synthetic(tmp_path / "b.json", "base", [3.00, 3.02, 2.98, 3.04], [1.0] * 4).read_text())
    one = json.loads(synthetic(tmp_path / "one.json", "one", [2.95], [1.0]).read_text())
    key, s, lines = judge(b, one, "b.json")
    assert key == "screen" and not {"loss", "time", "alpha"} & set(s) and s["position"] == "below" and s["n_new"] == 1
    assert s["same_seeds"] == {"seeds": [0], "diff": pytest.approx(-0.05)}
    assert s["diff"] == pytest.approx(2.95 - 3.01) and s["range_base"] == [2.98, 3.04]
    assert "no test" in lines[0] and "same seed (0): difference -0.0500" in lines[2]
    assert "below the baseline's whole range" in lines[-1] and "--extend" in lines[-1]
    inside = {**one, "runs": [{**one["runs"][0], "seed": 7, "loss": 3.01}]}  # a seed the baseline lacks
    key, s, lines = judge(b, inside, "b.json")
    assert s["position"] == "inside" and "same_seeds" not in s and len(lines) == 3
    assert judge(b, {**one, "runs": [{**one["runs"][0], "loss": 3.1}]}, "b.json")[1]["position"] == "above"
    assert judge(b, b, "b.json")[0] == "comparison"  # two or more a side: the test
    key, s, lines = judge(one, b, "one.json")  # a one-run baseline: a screen too, with no range to place in
    assert key == "screen" and s["position"] is None and "no range" in lines[-1] and "--extend the baseline" in lines[-1]
    assert judge(one, one, "one.json")[1]["same_seeds"]["diff"] == 0.0
    with pytest.raises(UserError, match=">= 2 runs"):
        compare(b, one, "b.json")
    with pytest.raises(UserError, match="cannot compare"):
        judge(b, {**one, "budget": 4096}, "b.json")


def test_candidate_with_one_run_prints_a_screen_and_titles_its_picture(tmp_path):
    base = synthetic(tmp_path / "base.json", "base", [3.00, 3.02, 2.98], [1.0] * 3)
    one = synthetic(tmp_path / "one.json", "one", [3.10], [1.0])
    proc = run_script("speedrun.py", "--compare", str(base), "--candidate", str(one), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "screened against base.json (base): no test" in proc.stdout and "above the baseline's whole range" in proc.stdout
    assert (tmp_path / "one-vs-base.png").stat().st_size > 10_000
    assert screen_title(judge(*(json.loads(p.read_text()) for p in (base, one)), "base.json")[1]) == \
        "screen, no test: above the baseline's range, same seeds +0.1000"

    # several records side by side, as a --variant table: each against the baseline, the best against the others
    low = synthetic(tmp_path / "low.json", "low", [2.80, 2.81, 2.79], [1.0] * 3)
    table = run_script("speedrun.py", "--compare", str(base), "--candidate", str(one), str(low), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:4]}
    assert table.stdout.startswith("2 records (debug") and rows["low"].split()[:2] == ["low", "*"]
    assert rows["one"].split()[-2:] == ["+0.1000", "(1)"]  # same seed (0): 3.10 - 3.00
    assert f"below the baseline {base} at p < 0.01: low" in table.stdout
    assert (tmp_path / "base-vs-2-records.png").stat().st_size > 10_000
    other = synthetic(tmp_path / "other.json", "other", [3.0, 3.1], [1.0, 1.1], budget=4096)
    for extra, words in (([str(low), str(low)], ["given twice"]), ([str(low), str(other)], ["cannot compare", "4,096"])):
        assert_one_line_error(run_script("speedrun.py", "--compare", str(base), "--candidate", *extra, cwd=tmp_path), *words)


@pytest.mark.parametrize("text,tokens", [("8M", 8_000_000), ("20M", 20_000_000), ("100M", 100_000_000), ("1B", 10**9),
                                         ("500k", 500_000), ("0.5M", 500_000), ("2048", 2048), ("20_000_000", 20_000_000)])
def test_budget_parsing(text, tokens):
    assert parse_budget(text) == tokens
    assert parse_budget(format_budget(tokens)) == tokens


def test_budget_and_label_edge_cases():
    for bad in ("", "8Q", "-5", "0", "1.5", "0.0005k", "M", "1e6"):
        with pytest.raises(UserError, match="bad budget"):
            parse_budget(bad)
    assert format_budget(8_000_000) == "8M" and format_budget(10**9) == "1B" and format_budget(2048) == "2048"
    assert derive_label([]) == "baseline" and derive_label(["optim.matrix_optimizer=\"adamw\""]) == "matrix_optimizer-adamw"
    long = [f"model.key{i}=value{i}" for i in range(8)]
    assert len(derive_label(long)) <= 40 and derive_label(long) != derive_label(long[:-1])


@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path):
    base = synthetic(tmp_path / "base.json", "base", [3.0, 3.1], [1.0, 1.1])
    other = synthetic(tmp_path / "other.json", "other", [3.0, 3.1], [1.0, 1.1], budget=4096)
    (tmp_path / "corrupt.json").write_text("{\"schema\": 1, \"runs\": [")
    (tmp_path / "file").write_text("")
    train = ["--preset", "debug", "--budget", "2048", "--records_dir", str(tmp_path / "records")]
    cases = [
        (["--preset", "debug", "--budget", "8Q"], ["bad budget", "8Q"]),
        ([*train, "--runs", "0"], ["--runs"]),
        ([*train, "--runs", "2", "--compare", str(tmp_path / "corrupt.json")], ["corrupt", "corrupt.json"]),
        (["--compare", str(base), "--candidate", str(other)], ["cannot compare", "4,096"]),
        ([*train, "--runs", "2", "train.seed=3"], ["--seed0"]),
        ([*train, "optim.adam_lr=0.01", "--runs", "2", "train.seed=3"], ["--seed0"]),  # overrides around flags
        (["--preset", "debug", "--budget", "2048", "--records_dir", str(tmp_path / "file" / "records")], ["not writable"]),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: each is mostly interpreter start-up
        procs = list(pool.map(lambda case: run_script("speedrun.py", *case[0], cwd=tmp_path), cases))
    for (args, fragments), proc in zip(cases, procs):
        assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "runs").exists()  # every refusal came before any training
    with pytest.raises(UserError, match=r"--preset 'nope' is neither a file nor a llm preset \(.*\bblueberry-88m\b.*\bdebug\b"):
        resolve_preset("nope")
    with pytest.raises(UserError, match="no such file"):
        resolve_preset(str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="record not found"):
        load_record(tmp_path / "missing.json")
