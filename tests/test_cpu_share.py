"""genrec_edge.cpu_share: the thread count follows the cores other programs leave free, and changes no result.

- the policy (``next_threads``) on a table of readings, hysteresis included;
- ``CoreShare`` on a written /proc/stat: busy time of its CPUs (steal included, idle and iowait not) minus
  this process's own, per second of wall time; and on the real /proc/stat beside a busy child process;
- ``ThreadGovernor`` re-reads at most every ``interval`` and calls ``set_threads`` on a change;
- the engine's search gives the same titles and scores whether its thread count is fixed or changed on
  every llama_decode call (real llama.cpp, tiny model);
- engine.py adds GOMP_SPINCOUNT only for llama.cpp's load and only where it adapts, and keeps the user's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import CATALOG, build_trie, tiny_model_path  # noqa: F401
from test_search import HISTORIES, run_new

from genrec_edge import engine as E
from genrec_edge.cpu_share import CoreShare, ThreadGovernor, next_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("current", "others", "cpus", "configured", "expected"), [
    (2, 0.0, 2, 2, 2),      # idle: every configured thread
    (2, 0.34, 2, 2, 2),     # a third of a core of other work leaves ours alone
    (2, 0.5, 2, 2, 1),      # half a core: one thread less
    (2, 1.0, 2, 2, 1),      # a busy process on a 2-core machine
    (2, 2.0, 2, 2, 1),      # never fewer than one
    (1, 1.0, 2, 2, 1),      # stays down while the other program runs
    (1, 0.2, 2, 2, 1),      # hysteresis: 0.2 + 0.3 still takes a core
    (1, 0.04, 2, 2, 2),     # back up once the machine is idle
    (8, 3.0, 16, 8, 8),     # spare cores beyond the configured count: unchanged
    (8, 10.0, 16, 8, 6),    # 16 CPUs, 10 busy with others: 6 left
    (4, 0.0, 16, 4, 4),     # never more than configured
])
def test_policy(current, others, cpus, configured, expected):
    assert next_threads(current, others, cpus, configured) == expected


def _stat(path: Path, per_cpu: dict[int, list[int]]) -> None:
    total = [sum(v[i] for v in per_cpu.values()) for i in range(10)]
    lines = ["cpu  " + " ".join(map(str, total))] + [f"cpu{c} " + " ".join(map(str, v)) for c, v in per_cpu.items()]
    path.write_text("\n".join(lines) + "\nintr 1 2 3\nctxt 5\n")


def test_core_share_reads_busy_time_minus_its_own(tmp_path):
    stat = tmp_path / "stat"
    clock, own = [100.0], [5.0]
    #        user nice sys idle iowait irq softirq steal guest guest_nice
    _stat(stat, {0: [100, 0, 50, 900, 10, 0, 0, 0, 0, 0], 1: [100, 0, 0, 1000, 0, 0, 0, 0, 0, 0],
                 2: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]})
    share = CoreShare(cpus=[0, 1], stat_path=str(stat), own_seconds=lambda: own[0], clock=lambda: clock[0], tick=0.01)
    assert share.others() is None  # no time has passed
    # One second later: cpu0 busy 100 ticks (user 60, irq 20, steal 20), cpu1 busy 80 + idle/iowait 120 (not busy),
    # cpu2 (outside the set) busy 100; this process used 0.3 s of CPU.
    _stat(stat, {0: [160, 0, 50, 900, 10, 20, 0, 20, 0, 0], 1: [140, 20, 20, 1100, 20, 0, 0, 0, 0, 0],
                 2: [100, 0, 0, 0, 0, 0, 0, 0, 0, 0]})
    clock[0], own[0] = 101.0, 5.3
    assert share.others() == pytest.approx(1.8 - 0.3)
    clock[0] = 103.0  # two idle seconds: nothing busy, nothing of ours
    assert share.others() == pytest.approx(0.0)


def test_core_share_is_none_where_it_cannot_read(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert CoreShare(cpus=[0, 1], stat_path=str(stat)).others() is None  # cpu1 missing
    with pytest.raises(OSError):
        CoreShare(cpus=[0], stat_path=str(tmp_path / "missing"))
    share = CoreShare(cpus=[0], stat_path=str(stat))
    stat.unlink()  # gone mid-request: no reading, no exception in the decode path
    assert share.others() is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux /proc only")
def test_core_share_sees_a_busy_process_on_this_machine():
    share = CoreShare.for_this_machine()
    assert share is not None
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        share.others()
        time.sleep(0.6)
        others = share.others()
    finally:
        hog.kill()
        hog.wait()
    assert others is not None and 0.5 <= others <= len(share.cpus)


class FakeShare:
    def __init__(self, readings, cpus=2):
        self.readings = list(readings)
        self.cpus = list(range(cpus))
        self.calls = 0

    def others(self):
        self.calls += 1
        return self.readings.pop(0) if self.readings else 0.0


def test_governor_rereads_at_most_every_interval_and_sets_changes_only():
    clock = [0.0]
    share, calls = FakeShare([1.0, 1.0, None, 0.0]), []
    gov = ThreadGovernor(share, 2, calls.append, interval=1.0, clock=lambda: clock[0])
    assert gov.before_call() == 2 and share.calls == 0  # too soon after start
    clock[0] = 1.0
    assert gov.before_call() == 1 and calls == [1]
    clock[0] = 1.5
    assert gov.before_call() == 1 and share.calls == 1  # within the interval: no reading
    clock[0] = 2.5
    assert gov.before_call() == 1 and calls == [1]  # still busy: no call
    clock[0] = 3.5
    assert gov.before_call() == 1  # unreadable: unchanged
    clock[0] = 4.5
    assert gov.before_call() == 2 and calls == [1, 2] and gov.switches == 2


def test_search_results_do_not_depend_on_the_thread_count(tiny_model_path):  # noqa: F811
    fixed = E.Engine.open(tiny_model_path, n_ctx=8192, n_seq_max=200, threads=2, adapt_threads=False)
    try:
        trie = build_trie(fixed, CATALOG)
        expected, _ = run_new(fixed, trie, HISTORIES, k=5, beam=8)
        assert fixed.governor is None
        # The same engine, its count switched between 1 and 2 before every llama_decode call.
        seen = []
        fixed.governor = ThreadGovernor(FakeShare([0.0, 1.5] * 10_000), 2, lambda n: (seen.append(n),
                                        fixed._set_threads(n)), interval=0.0)
        fixed.governor.current = 1
        switched, _ = run_new(fixed, trie, HISTORIES, k=5, beam=8)
    finally:
        fixed.close()
    assert len(seen) > 10 and set(seen) == {1, 2}
    assert len(switched) == len(expected)
    for got, want in zip(switched, expected, strict=True):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(abs(a - b) <= 1e-4 for (_, a), (_, b) in zip(got, want, strict=True))


def _engine_env(**env) -> dict:
    script = ("import json, os; from genrec_edge import engine as E; "
              "print(json.dumps([E.ADAPT_THREADS, E.OPENMP_SPIN, os.environ.get('GOMP_SPINCOUNT')]))")
    full = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "GENREC_EDGE_ADAPT_THREADS")} | env
    out = subprocess.run([sys.executable, "-c", script], env=full, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adaptation is Linux-only")
def test_spin_is_added_for_llama_cpp_only_where_the_thread_count_adapts():
    assert _engine_env() == [True, E.SPIN_COUNT, None]  # added for the import, then removed
    assert _engine_env(GENREC_EDGE_ADAPT_THREADS="0") == [False, None, None]
    assert _engine_env(GOMP_SPINCOUNT="50") == [True, 50, "50"]  # the user's own is kept
