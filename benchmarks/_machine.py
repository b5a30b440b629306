"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_times() -> list[int] | None:
    """The aggregate CPU time counters of Linux ``/proc/stat`` (user nice system idle iowait irq softirq
    steal ...), or None elsewhere."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of the CPU time between two ``cpu_times`` snapshots that the hypervisor gave to other guests
    (``steal``): on a virtual machine the load average does not see them, but they take our cores."""
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    total = sum(end[:8]) - sum(start[:8])
    return (end[7] - start[7]) / total if total > 0 else None
