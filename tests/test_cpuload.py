"""What other processes took of the CPU while a run trained (shared/cpuload.py), and how the speedrun
harness marks a time measured on a shared machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from llm.speedrun import compare, comparison_lines, leaderboard, load_record, run_problem, summary_lines
from llm.speedrun_sweep import sweep_lines
from shared import cpuload
from shared.cpuload import OtherLoad, machine_cpu, shared_note
from test_speedrun import synthetic


def test_counts_others_and_not_this_process(monkeypatch):
    clock = {"machine": 100.0, "own": 10.0, "wall": 0.0}
    monkeypatch.setattr(cpuload, "machine_cpu", lambda: (clock["machine"], 2))
    monkeypatch.setattr(cpuload.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpuload.time, "perf_counter", lambda: clock["wall"])

    def interval(wall: float, own: float, others: float) -> None:
        load.start()
        clock["wall"] += wall
        clock["own"] += own
        clock["machine"] += own + others
        load.stop()

    load = OtherLoad()
    interval(1.0, 1.0, 0.5)
    assert load.share() is None  # 2 CPU-seconds of capacity: too short to tell
    interval(9.0, 8.0, 5.5)  # 10 s wall on 2 CPUs: this process 9 CPU seconds, others 6
    assert load.totals == pytest.approx([6.0, 9.0, 20.0]) and load.share() == pytest.approx(0.3)
    clock["machine"] += 100.0  # between stop and start (evaluation, checkpoints): not counted
    interval(10.0, 20.0, 0.0)
    assert load.share() == pytest.approx(0.15)
    load = OtherLoad()
    interval(10.0, 20.0, -20.0)  # a /proc/stat that does not move with this process's own work: unknown
    assert load.share() is None
    monkeypatch.setattr(cpuload, "machine_cpu", lambda: None)  # no /proc/stat: unknown, not 0
    load = OtherLoad()
    interval(10.0, 1.0, 0.0)
    assert load.totals is None and load.share() is None


def test_a_busy_process_beside_shows():
    if machine_cpu() is None:
        pytest.skip("no /proc/stat here")
    load = OtherLoad()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 4\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)  # the interpreter is up and spinning
        load.start()
        time.sleep(3.0)  # this process idles; the burner takes a whole core
        load.stop()
    finally:
        burner.wait()
    cpus = machine_cpu()[1]
    if load.totals[2] < cpuload.MIN_CAPACITY_S:
        pytest.skip("one CPU: 3 s are too short to tell")
    assert load.share() >= 0.6 / cpus  # a core of cpus, less tick rounding and start-up


def test_the_harness_marks_a_time_from_a_shared_machine(tmp_path):
    base = synthetic(tmp_path / "base.json", "baseline", [3.0, 3.1, 3.05], [10.0, 10.5, 10.2])
    rec = json.loads(base.read_text())
    for run, share in zip(rec["runs"], (0.01, 0.45, None)):
        run["cpu_others"] = share
    base.write_text(json.dumps(rec))
    new = synthetic(tmp_path / "new.json", "new", [2.9, 2.95, 3.0], [9.0, 9.5, 9.2])
    cmp = compare(load_record(base), load_record(new), "base.json")
    assert cmp["shared_cpu"] == {"baseline": {1: 0.45}, "new": {}}
    lines = comparison_lines(cmp)
    assert any("baseline trained beside other processes (seed 1 45% of the CPU)" in line for line in lines)
    assert any(line.startswith("shared CPU") and "seed 1: others used 45%" in line
               for line in summary_lines(load_record(base)))
    assert not any("shared" in line for line in summary_lines(load_record(new)))
    board = leaderboard(tmp_path)
    assert board.count("(shared CPU)") == 1 and "| baseline |" in board
    clean = compare(load_record(new), load_record(new), "new.json")
    assert "shared_cpu" not in clean and not any("other processes" in line for line in comparison_lines(clean))
    assert shared_note(0.09) == "" and shared_note(None) == "" and "12%" in shared_note(0.12)
    table = sweep_lines("variant", ["base", "new"], [load_record(base), load_record(new)], variants=True)
    assert sum("(shared CPU)" in line for line in table) == 1
    bad = {"loss": 3.0, "train_time_s": 1.0, "cpu_others": "0.5"}  # a record that would break the tables
    assert run_problem(bad) == 'cpu_others is "0.5", not a finite number'
