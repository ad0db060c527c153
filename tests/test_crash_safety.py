"""Crash safety: ``kill -9`` a real ``genrec-edge data ingest`` process mid-way; the database must be exactly
as it was before (the ingest is one transaction) and ``doctor`` must say it is sound.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interrupt_once, start_cli_as_a_shell_would
from test_bad_input import snapshot

from genrec_edge.cli import main
from genrec_edge.doctor import run_checks
from genrec_edge.history import HistoryDB

N_ITEMS = 2000
N_INTERACTIONS = 250_000
PROGRESS = re.compile(rb"([0-9.]+)/([0-9.]+) MB")


def write_big_csv(folder: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    items = folder / "items.csv"
    inter = folder / "inter.csv"
    with open(items, "w", encoding="utf-8") as fh:
        fh.write("item_id,title,genres\n")
        fh.writelines(f"{100_000 + i},Film {i} ({1950 + i % 70}),Drama\n" for i in range(1, N_ITEMS + 1))
    with open(inter, "w", encoding="utf-8") as fh:
        fh.write("user_id,item_id,timestamp,rating\n")
        fh.writelines(
            f"{1000 + n % 5000},{100_001 + rng.randrange(N_ITEMS)},{1_500_000_000 + n},{rng.randint(1, 5)}\n"
            for n in range(N_INTERACTIONS)
        )
    return items, inter


def lock_is_held(db: Path) -> bool:
    conn = sqlite3.connect(db, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        return False
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return True
    finally:
        conn.close()


def wait_midway(proc: subprocess.Popen, db: Path) -> None:
    """Return once the ingest's progress bar (on ``proc``'s stderr) is well into the interactions, far from the
    end, with its transaction open; fail if it ended first. Leaves ``proc.stderr`` blocking again."""
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    done_mb = total_mb = 0.0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stderr.read() or b""
        found = PROGRESS.findall(seen[-400:])
        if found:
            done_mb, total_mb = (float(x) for x in found[-1])
            if done_mb >= 1.0:
                break
        time.sleep(0.05)
    os.set_blocking(proc.stderr.fileno(), True)
    assert proc.poll() is None, f"ingest ended before it could be stopped: {seen[-300:]!r}"
    assert 1.0 <= done_mb < total_mb, (done_mb, total_mb)
    assert lock_is_held(db), "the ingest's transaction should be open"


def test_kill_9_mid_ingest_leaves_the_database_unchanged(tiny_db, tmp_path, capsys, monkeypatch):
    items, inter = write_big_csv(tmp_path)
    before_rows = snapshot(tiny_db)
    before_bytes = tiny_db.read_bytes()
    env = dict(os.environ, FORCE_COLOR="1", COLUMNS="100", OMP_WAIT_POLICY="passive")  # rich draws progress
    proc = subprocess.Popen(
        [sys.executable, "-m", "genrec_edge", "data", "ingest", "csv", "--items", str(items),
         "--interactions", str(inter), "--db", str(tiny_db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        wait_midway(proc, tiny_db)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # WAL: uncommitted pages never reach the main file.
    assert tiny_db.read_bytes() == before_bytes
    assert snapshot(tiny_db) == before_rows
    with HistoryDB.open(tiny_db) as db:  # a writer opens it fine: the dead process's lock is gone
        assert db.quick_check() == "ok"
        assert db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not db.item_by_title("Film 1 (1951)")
    checks = run_checks(tiny_db, None)
    assert all(c.status == "ok" for c in checks if c.name != "model"), [c.line() for c in checks]
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))  # no default model built: doctor skips it
    rc = main(["doctor", "--db", str(tiny_db)])
    out, err = capsys.readouterr()
    assert rc == 0 and "ok   integrity: PRAGMA quick_check: ok" in out, out + err


@pytest.mark.parametrize("new_db", [False, True], ids=["existing-db", "first-ingest"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_ingest_rolls_back_and_says_so(tiny_db, tmp_path, sig, new_db):
    """A polite stop (Ctrl-C, SIGTERM) rolls back too, and is one line, not a traceback. A first ingest
    leaves no database behind (SIGTERM used to kill it before that cleanup: an empty schema-only file)."""
    items, inter = write_big_csv(tmp_path)
    if new_db:
        tiny_db = tmp_path / "first.db"
    before_rows = None if new_db else snapshot(tiny_db)
    env = dict(os.environ, FORCE_COLOR="1", COLUMNS="100", OMP_WAIT_POLICY="passive")  # rich draws progress
    proc = start_cli_as_a_shell_would("data", "ingest", "csv", "--items", str(items), "--interactions", str(inter),
                                      "--db", str(tiny_db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # mid-way by its progress, not after a fixed sleep it may outrun
    err = interrupt_once(proc, lambda: wait_midway(proc, tiny_db) or True, "the ingest", sig=sig)
    assert proc.returncode != 0, err[-800:]
    assert b"Traceback" not in err, err[-500:]
    # One line, and the shell's exit code for the signal (128 + its number).
    assert proc.returncode == 128 + sig, (proc.returncode, err[-300:])
    said = "terminated" if sig == signal.SIGTERM else "interrupted"
    assert err.decode().splitlines()[-1].endswith(f"error: {said}"), err[-300:]
    if new_db:
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("first.db")) == []
        return
    assert snapshot(tiny_db) == before_rows
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert db.quick_check() == "ok"
