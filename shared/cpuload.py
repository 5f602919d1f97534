"""How much of the machine other processes used while a run trained.

A speed measured while something else ran (a test suite, a second run) says little about the
recipe: on the two-core development machine a test suite beside a run cuts its tokens/s by a third
or more. The run's record should say so itself rather than rely on a note written by hand. Over
the timed training intervals, the CPU time of the whole machine (/proc/stat, hypervisor steal
included) less this process's own (`time.process_time`, every thread), as a share of the machine's
capacity: about 0 alone, about 0.5 with another two-thread job on two cores. Linux only; None
elsewhere. Child processes of the run (data workers) would count as others; the trainers start none.
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SHARED = 0.1  # others' share from which a run's speed is marked as measured on a shared machine


def shared_note(share: float | None) -> str:
    """'' for a run that had the machine (or where unknown), else what to say beside its speed."""
    return f"other processes used {share:.0%} of the CPU" if share is not None and share >= SHARED else ""


def machine_cpu() -> tuple[float, int] | None:
    """CPU seconds used by everything since boot (idle and iowait left out) and the CPU count, or
    None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        ticks = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS, max(cpus, 1)


class OtherLoad:
    """Accumulates the CPU seconds other processes used between `start` and `stop` calls."""

    def __init__(self) -> None:
        self.other_s: float | None = 0.0  # None: unknown (no /proc/stat, or restored from a run without it)
        self.cpus = 1
        self._mark: tuple[float, float] | None = None

    def start(self) -> None:
        machine = machine_cpu()
        if machine is None:
            self.other_s, self._mark = None, None
            return
        self.cpus = machine[1]
        self._mark = (machine[0], time.process_time())

    def stop(self) -> None:
        machine = machine_cpu()
        if self._mark is None or machine is None or self.other_s is None:
            self.other_s = None
            return
        self.other_s += (machine[0] - self._mark[0]) - (time.process_time() - self._mark[1])
        self._mark = None

    def share(self, wall_s: float) -> float | None:
        """Others' CPU over wall_s seconds as a share of the machine (0-1; tick rounding clipped)."""
        if self.other_s is None or wall_s <= 0:
            return None
        return round(min(max(self.other_s / (wall_s * self.cpus), 0.0), 1.0), 3)
