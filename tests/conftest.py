"""Shared fixtures: a tiny MovieLens-style dataset and a real SQLite history database built from it.

``tiny_db`` (function scope) -> ``pathlib.Path`` of a fresh SQLite file built by our own ingest
(``genrec_edge.ingest.ingest(db, "movielens-csv", folder)``) from ``tiny_movielens_dir``, so every test
may write to it. Open it with ``HistoryDB.open(tiny_db)``. What it holds, written by hand below:

- 20 items: ``TINY_ITEM_IDS`` = 10, 20, ..., 200 (ids are *not* positions), titles
  ``tests/tinymodel.DEFAULT_TITLES`` in that order (quotes, a backslash, unicode, commas, colons);
  title of id ``10 * (k + 1)`` is ``DEFAULT_TITLES[k]``; years parsed from the titles.
- 8 users 1..8 with the chronological item sequences ``TINY_HISTORIES`` (lengths 1 to 12). The
  ratings.csv rows are written in *reverse* order, so the database must sort by time itself. User 3's
  2nd and 3rd items (120, 130) share one timestamp and are written 130 first: order is timestamp, then id.
- ``EMPTY_USER`` = 9: a user with no interactions (added with ``HistoryDB.add_user`` after the ingest).
- Timestamps: ``tiny_timestamp(user, position)``; ratings: ``tiny_rating(user, position)``.

Fixtures: ``tiny_movielens_dir`` (session: the folder with movies.csv + ratings.csv), ``tiny_db``,
``tiny_histories`` (a copy of ``TINY_HISTORIES``), ``tiny_titles`` (item id -> title) and ``tiny_model``
(session: a tiny random LLaMA GGUF for that catalog, ``tests/tinymodel.tiny_gguf``).
"""

from __future__ import annotations

import os

# Before torch or llama.cpp is imported anywhere: OpenMP's default spin-wait makes 2-thread runs collapse
# under CPU contention (FINDINGS.md); `make test` sets it too, a bare `pytest` gets it here.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinymodel import DEFAULT_TITLES, tiny_gguf

# bench/ is a folder of scripts, not installed: every test module imports it from the checkout, whatever
# order the modules are collected in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_ITEM_IDS = [10 * (k + 1) for k in range(len(DEFAULT_TITLES))]
TINY_TITLES = dict(zip(TINY_ITEM_IDS, DEFAULT_TITLES, strict=True))
TINY_GENRES = ["Adventure|Animation|Children|Comedy|Fantasy", "Comedy", "Action|Crime|Thriller", "(no genres listed)"]
TINY_HISTORIES: dict[int, list[int]] = {
    1: [10, 20, 30, 40, 50],
    2: [150, 160, 170, 180, 190, 200],
    3: [110, 120, 130],
    4: [30, 60, 90, 120, 150, 180, 10, 40],
    5: [70, 80],
    6: [90],
    7: [140, 130, 120, 110, 100, 90, 80, 70, 60, 50, 40, 30],
    8: [20, 110, 160],
}
EMPTY_USER = 9
TIED_USER = 3  # positions 1 and 2 share a timestamp


def tiny_timestamp(user: int, position: int) -> int:
    if user == TIED_USER and position == 2:
        position = 1
    return 1_000_000_000 + user * 100_000 + position * 100


def tiny_rating(user: int, position: int) -> float:
    return 1.0 + ((user + position) % 9) / 2


def write_tiny_movielens(folder: Path) -> Path:
    """Write movies.csv and ratings.csv of the tiny dataset (MovieLens CSV layout) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        for k, item_id in enumerate(TINY_ITEM_IDS):
            writer.writerow([item_id, TINY_TITLES[item_id], TINY_GENRES[k % len(TINY_GENRES)]])
    rows = [
        [user, item_id, f"{tiny_rating(user, pos):.1f}", tiny_timestamp(user, pos)]
        for user, items in TINY_HISTORIES.items()
        for pos, item_id in enumerate(items)
    ]
    with open(folder / "ratings.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        writer.writerows(reversed(rows))
    return folder


def cli_help_in_a_fresh_process(argvs: list[list[str]], heavy: set[str]) -> tuple[str, list[str]]:
    """Run ``genrec_edge.cli.main(argv)`` for each argv (help pages) in a new interpreter: (their stdout,
    which of the ``heavy`` top-level packages got imported). Help must not pay for torch, llama.cpp, Ray ..."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from genrec_edge.cli import main\n"
        f"for argv in json.loads({json.dumps(argvs)!r}):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"heavy = set(json.loads({json.dumps(sorted(heavy))!r}))\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *out, imported = done.stdout.strip().splitlines()
    return "\n".join(out), json.loads(imported)


def assert_rerender_reproduces(main, render, saved: Path, tmp_path: Path) -> None:
    """A bench's ``--render RUN.json`` (and ``render`` itself) writes the report its measuring run wrote."""
    text = saved.with_suffix(".md").read_text()
    saved.with_suffix(".md").unlink()
    assert main(["--render", str(saved)]) == 0
    assert saved.with_suffix(".md").read_text() == text
    render(json.loads(saved.read_text()), tmp_path / "again")
    assert (tmp_path / "again.md").read_text() == text


def usage_errors(main, argvs, capsys) -> str:
    """Each ``argv`` makes a bench's ``main`` exit with argparse's usage error (2); their stderr, together."""
    import pytest

    for argv in argvs:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    return capsys.readouterr().err


def dump(path) -> list[str]:
    """The SQL text of a whole database (sqlite3's iterdump), to compare two databases or a before/after."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture(scope="session")
def tiny_movielens_dir(tmp_path_factory) -> Path:
    return write_tiny_movielens(tmp_path_factory.mktemp("tiny-ml") / "tiny-ml")


@pytest.fixture
def tiny_db(tiny_movielens_dir, tmp_path) -> Path:
    from genrec_edge.history import HistoryDB
    from genrec_edge.ingest import ingest

    path = tmp_path / "tiny.db"
    ingest(path, "movielens-csv", tiny_movielens_dir, progress=False)
    with HistoryDB.open(path) as db:
        db.add_user(EMPTY_USER)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random LLaMA GGUF (F32, seed 5) whose vocabulary covers the tiny catalog's titles, built once."""
    path = tmp_path_factory.getbasetemp() / "runtime-tiny-gguf-db" / "model-F32.gguf"
    if not path.exists():
        tiny_gguf(path.parent, corpus=DEFAULT_TITLES, seed=5)
    return path


@pytest.fixture
def tiny_histories() -> dict[int, list[int]]:
    return {user: list(items) for user, items in TINY_HISTORIES.items()}


@pytest.fixture
def tiny_titles() -> dict[int, str]:
    return dict(TINY_TITLES)


@pytest.fixture
def two_core_pool_opens(monkeypatch) -> list[tuple[int, int | None]]:
    """A machine of 2 usable cores and plenty of memory for ``--workers auto`` (whatever CI has), and the
    ``(workers, threads)`` of every ``RecommenderPool.open`` from then on (the real pool still starts)."""
    from genrec_edge import cpu_share, pool

    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 2)
    monkeypatch.setattr(pool, "available_memory", lambda: 64 << 30)
    started: list[tuple[int, int | None]] = []
    real_open = pool.RecommenderPool.open
    monkeypatch.setattr(pool.RecommenderPool, "open", classmethod(
        lambda cls, *a, **kw: started.append((kw["workers"], kw["threads"])) or real_open(*a, **kw)))
    return started


def start_cli_as_a_shell_would(*argv: str, **popen) -> subprocess.Popen:
    """``genrec-edge ARGV`` in a child process that takes Ctrl-C and SIGTERM as a shell's foreground job does.

    A pytest started in the background (`cmd &`, nohup) has SIGINT ignored, and its children inherit that: the
    child restores Python's handler and unblocks both signals first. Keyword arguments go to Popen
    (stderr=PIPE, text=True, env=... as the test needs)."""
    prelude = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
               "sys.argv[0] = 'genrec-edge'; runpy.run_module('genrec_edge', run_name='__main__')")
    popen.setdefault("env", dict(os.environ, OMP_WAIT_POLICY="passive"))
    return subprocess.Popen([sys.executable, "-c", prelude, *argv], **popen)


def interrupt_once(proc: subprocess.Popen, ready, what: str, wait_s: float = 60.0, settle_s: float = 0.0,
                   sig: int = signal.SIGINT) -> str:
    """Send ``sig`` to ``proc`` once ``ready()`` is true (``settle_s`` later), then return its stderr; fail if
    it ended before that. The process is killed if it outlives the test."""
    try:
        deadline = time.monotonic() + wait_s
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(settle_s)
        assert proc.poll() is None, f"{what} ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err
