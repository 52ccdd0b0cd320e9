"""How busy the rest of the machine was while a benchmark ran (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import time


def busy_cpu_seconds() -> float | None:
    """CPU time (seconds, all cores) the whole machine has spent busy, from ``/proc/stat``; Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and the child processes it has waited for
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Started at construction; :meth:`footer` says the wall time and the other processes' load."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def footer(self) -> str:
        wall = time.perf_counter() - self.wall0
        own, busy1 = _own_cpu_seconds() - self.own0, busy_cpu_seconds()
        text = f"total {wall:.1f} s"
        if self.busy0 is not None and busy1 is not None:
            others = max(busy1 - self.busy0 - own, 0.0) / wall
            text += f" | other processes used {others:.2f} of {os.cpu_count()} cores meanwhile"
            if others > 0.1:
                text += " (contended: timings unreliable, rerun on a quiet machine)"
        return text
