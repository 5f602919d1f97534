"""How much of the machine other processes used while a run trained.

A speed measured while something else ran (a test suite, a second run) says little about the
recipe: on the two-core development machine a test suite beside a run cuts its tokens/s by a third
or more. The run's record should say so itself rather than rely on a note written by hand. Over
the timed training intervals, the CPU time of the CPUs this process may run on (/proc/stat's
per-CPU lines, hypervisor steal included) less this process's own (`time.process_time`, every
thread), as a share of their capacity: about 0 alone, about 0.5 with another two-thread job on two
cores. Linux only; None elsewhere, for runs too short to tell, and where /proc/stat does not move
with the process's own work (some sandboxes). Child processes of the run (data workers) would count
as others; the trainers start none. Several ranks on one node count each other: the trainer
reports None for those.
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SHARED = 0.1  # others' share from which a run's speed is marked as measured on a shared machine
MIN_CAPACITY_S = 5.0  # below this many CPU-seconds of capacity, /proc/stat's 10 ms ticks decide the share


def shared_note(share: float | None) -> str:
    """'' for a run that had the machine (or where unknown), else what to say beside its speed."""
    return f"other processes used {share:.0%} of the CPU" if share is not None and share >= SHARED else ""


def machine_cpu() -> tuple[float, int] | None:
    """CPU seconds used on this process's CPUs by everything since boot (idle and iowait left out)
    and how many CPUs those are, or None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        busy, cpus = 0, 0
        for line in lines:
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()) or (mine is not None and int(name[3:]) not in mine):
                continue
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy, cpus = busy + sum(ticks) - ticks[3] - ticks[4], cpus + 1
    except (OSError, ValueError, IndexError):
        return None
    return (busy / _TICKS, cpus) if cpus else None


class OtherLoad:
    """Accumulates, between `start` and `stop` calls, the CPU seconds other processes used, this
    process's own, and the capacity (wall seconds x CPUs) they came out of."""

    def __init__(self) -> None:
        self.totals: list[float] | None = [0.0, 0.0, 0.0]  # others, own, capacity; None: unknown
        self._mark: tuple[float, float, float, int] | None = None

    def start(self) -> None:
        machine = machine_cpu()
        self._mark = None if machine is None else (machine[0], time.process_time(), time.perf_counter(), machine[1])

    def stop(self) -> None:
        machine = machine_cpu()
        if self._mark is None or machine is None or self.totals is None:
            self.totals = None
            return
        busy, own, wall, cpus = self._mark
        own_s = time.process_time() - own
        self.totals = [self.totals[0] + machine[0] - busy - own_s, self.totals[1] + own_s,
                       self.totals[2] + (time.perf_counter() - wall) * cpus]
        self._mark = None

    def share(self) -> float | None:
        """Others' CPU as a share of the capacity (0-1, tick rounding clipped), or None (unknown)."""
        if self.totals is None:
            return None
        others, own, capacity = self.totals
        if capacity < MIN_CAPACITY_S or others < -0.5 * own:  # too short, or /proc/stat missed our own work
            return None
        return round(min(max(others / capacity, 0.0), 1.0), 3)
