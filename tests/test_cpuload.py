"""What other processes took of the CPU while a run trained (shared/cpuload.py), and how the speedrun
harness marks a time measured on a shared machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from llm.speedrun import compare, comparison_lines, leaderboard, load_record, summary_lines
from shared import cpuload
from shared.cpuload import OtherLoad, machine_cpu, shared_note
from test_speedrun import synthetic


def test_counts_others_and_not_this_process(monkeypatch):
    clock = {"machine": 100.0, "own": 10.0}
    monkeypatch.setattr(cpuload, "machine_cpu", lambda: (clock["machine"], 2))
    monkeypatch.setattr(cpuload.time, "process_time", lambda: clock["own"])
    load = OtherLoad()
    load.start()
    clock["machine"] += 15.0  # 10 s wall: this process 9 CPU seconds, others 6
    clock["own"] += 9.0
    load.stop()
    assert load.other_s == pytest.approx(6.0) and load.share(10.0) == pytest.approx(0.3)
    clock["machine"] += 100.0  # between stop and start (evaluation, checkpoints): not counted
    load.start()
    clock["machine"] += 10.0
    clock["own"] += 10.0
    load.stop()
    assert load.share(20.0) == pytest.approx(0.15)
    monkeypatch.setattr(cpuload, "machine_cpu", lambda: None)  # no /proc/stat: unknown, not 0
    load.start()
    load.stop()
    assert load.other_s is None and load.share(30.0) is None


def test_a_busy_process_beside_shows():
    if machine_cpu() is None:
        pytest.skip("no /proc/stat here")
    load = OtherLoad()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 2.5\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)  # the interpreter is up and spinning
        load.start()
        start = time.perf_counter()
        time.sleep(1.5)  # this process idles; the burner takes a whole core
        load.stop()
        wall = time.perf_counter() - start
    finally:
        burner.wait()
    assert load.share(wall) >= 0.6 / load.cpus  # a core of cpus, less tick rounding and start-up


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
