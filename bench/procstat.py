"""CPU seconds and memory of a process, from /proc (Linux only). No side effects but reset_peak_rss."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    """utime + stime of all threads, current and peak resident set size."""

    cpu_s: float
    rss_kb: int
    hwm_kb: int


def sample(pid: int) -> ProcSample | None:
    """None when there is no such process (or pid is 0)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: fields count from after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
        status = _status(pid)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat
    return ProcSample(cpu, status.get("VmRSS", 0), status.get("VmHWM", 0))


def _status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    return values


def rss_kb(pid: int) -> int:
    """Current resident set size in KiB (0 if the process is gone)."""
    if not pid:
        return 0
    try:
        return _status(pid).get("VmRSS", 0)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy ticks, all ticks) from /proc/stat; busy counts user, system, irq, softirq and steal."""
    cores: dict[str, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]  # idle, iowait
                cores[name] = (sum(ticks) - idle, sum(ticks))
    return cores


def core_busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Fraction of each core's time spent busy between two core_times() readings."""
    busy: dict[str, float] = {}
    for name, (busy_after, all_after) in after.items():
        busy_before, all_before = before.get(name, (0, 0))
        elapsed = all_after - all_before
        busy[name] = round((busy_after - busy_before) / elapsed, 3) if elapsed > 0 else 0.0
    return busy
