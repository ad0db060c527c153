"""How many of this process's CPUs other programs are using, and how many llama.cpp threads that leaves.

Why (docs/FINDINGS.md, bench/results/cost-model-2026-12-01.md): llama.cpp's threads meet at every node of
the compute graph, ~600 barriers per ``llama_decode``. Sleeping there (OpenMP's passive policy) costs
~30 ms per call on an idle 2-core machine; spinning a little first (``GOMP_SPINCOUNT``) saves most of it
(a request 0.79× as long), but a spinning thread whose partner was preempted by another program burns
the partner's turn: beside one busy process, 2 spinning threads on 2 cores are 1.2× (and with long spins
2.8×) slower, while 1 thread is 0.90–0.95× of 2 sleeping ones. So the engine spins briefly and runs only on
the cores the other programs leave free, re-reading that before a decode call at most every
``interval`` seconds:

    others  = (busy time of this process's CPUs - this process's own CPU time) / wall time
    threads = clamp(CPUs - ceil(others - 0.35), 1, configured)

(a program using more than a third of a core takes one away; going back up needs ``others`` 0.3 lower,
so a load near a threshold does not flip the count on every call). Linux only (``/proc/stat``); elsewhere
the count stays as configured. Results do not depend on the thread count (tested).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

TAKES_A_CORE = 0.35  # cores of other work that count as taking one of ours
HYSTERESIS = 0.3  # how much lower ``others`` must be before the count goes back up


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity set; all CPUs where that cannot be read)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def wanted_threads(others: float, cpus: int, configured: int) -> int:
    return max(1, min(configured, cpus - max(0, math.ceil(others - TAKES_A_CORE))))


def next_threads(current: int, others: float, cpus: int, configured: int) -> int:
    """The thread count after a reading of ``others`` cores busy with other programs."""
    down = wanted_threads(others, cpus, configured)
    if down < current:
        return down
    up = wanted_threads(others + HYSTERESIS, cpus, configured)
    return up if up > current else current


def _cpu_lines(path: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu"):
                break  # per-CPU lines come first; the long "intr" line is never read
            name, *fields = line.split()
            if name != "cpu":
                out[int(name[3:])] = [int(x) for x in fields]
    return out


class CoreShare:
    """Cores of this process's CPU set used by other programs between two readings."""

    def __init__(
        self,
        cpus: Sequence[int] | None = None,
        stat_path: str = "/proc/stat",
        own_seconds: Callable[[], float] = lambda: sum(os.times()[:2]),
        clock: Callable[[], float] = time.monotonic,
        tick: float | None = None,
    ):
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self.stat_path = stat_path
        self.own_seconds = own_seconds
        self.clock = clock
        self.tick = tick if tick is not None else 1.0 / os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    @classmethod
    def for_this_machine(cls) -> CoreShare | None:
        """None where it cannot be read (not Linux, no /proc)."""
        try:
            share = cls()
        except (OSError, ValueError, AttributeError):
            return None
        return share if share._last is not None else None

    def _read(self) -> tuple[float, float, float] | None:
        lines = _cpu_lines(self.stat_path)
        if not all(c in lines for c in self.cpus):
            return None
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait (steal included:
        # a hypervisor's other guests take the core as surely as a local process does).
        busy = sum(sum(lines[c][:3]) + sum(lines[c][5:8]) for c in self.cpus)
        return busy * self.tick, self.own_seconds(), self.clock()

    def others(self) -> float | None:
        """Cores busy with other programs since the previous call (None if unreadable or no time passed)."""
        try:
            now = self._read()
        except (OSError, ValueError):  # a read that fails mid-request leaves the count as it is
            now = None
        last, self._last = self._last, now
        if now is None or last is None or now[2] <= last[2]:
            return None
        busy, own, wall = now[0] - last[0], now[1] - last[1], now[2] - last[2]
        return max(0.0, min(float(len(self.cpus)), (busy - own) / wall))


class ThreadGovernor:
    """Sets llama.cpp's thread count before decode calls from :class:`CoreShare` readings."""

    def __init__(self, share: CoreShare, configured: int, set_threads: Callable[[int], None],
                 interval: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.share = share
        self.configured = configured
        self.set_threads = set_threads
        self.interval = interval
        self.clock = clock
        self.current = configured
        self.switches = 0
        self._last_check = clock()

    def before_call(self) -> int:
        now = self.clock()
        if now - self._last_check >= self.interval:
            self._last_check = now
            others = self.share.others()
            if others is not None:
                threads = next_threads(self.current, others, len(self.share.cpus), self.configured)
                if threads != self.current:
                    self.set_threads(threads)
                    self.current = threads
                    self.switches += 1
        return self.current
