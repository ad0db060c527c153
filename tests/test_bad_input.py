"""The bad-input matrix: every case through the real CLI (``main([...])``), with its exact exit code, a
stable part of its one-line message, no traceback, and no data lost.

Real components only: SQLite files built by our ingest, GGUF files built by our converter (a tiny random
LLaMA bound to the database's catalog) and cut or corrupted on disk, llama.cpp loading them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import EMPTY_USER, TINY_HISTORIES, TINY_TITLES
from test_doctor import write_gguf
from test_serve import model_root, tiny_model, tiny_model_for  # noqa: F401 (fixtures)

from genrec_edge.catalog import one_line
from genrec_edge.cli import main
from genrec_edge.history import HistoryDB


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out and "Traceback" not in err
    return rc, out, err


def assert_error(rc: int, err: str, code: int, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == code, err
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]


def snapshot(db_path: Path) -> list:
    """Every row of every table, to prove a failed command changed nothing."""
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return [(t, sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"').fetchall()))) for t in tables]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ database & history
def test_unknown_user(tiny_db, capsys):
    rc, _, err = run(capsys, "history", "show", "--user", "999", "--db", str(tiny_db))
    assert_error(rc, err, 4, "unknown user 999")


def test_unknown_item_in_history_add(tiny_db, capsys):
    before = snapshot(tiny_db)
    rc, _, err = run(capsys, "history", "add", "--user", "1", "--item", "11", "--db", str(tiny_db))
    assert_error(rc, err, 4, "unknown item 11")
    rc, _, err = run(capsys, "history", "add", "--user", "1", "--title", "Heat (1996)", "--db", str(tiny_db))
    assert_error(rc, err, 4, "no item titled 'Heat (1996)'")
    assert snapshot(tiny_db) == before


def test_numbers_past_sqlite_int64(tiny_db, capsys):
    # sqlite3 raises OverflowError for these; each is one line, and nothing is written.
    big = str(2**63)
    before = snapshot(tiny_db)
    for argv, code, message in (
        (("history", "show", "--user", big), 4, f"unknown user {big}"),
        (("history", "add", "--user", "1", "--item", big), 4, f"unknown item {big}"),
        (("history", "add", "--user", big, "--item", "10"), 2, f"user id {big} is out of range"),
        (("history", "add", "--user", "1", "--item", "10", "--timestamp", big), 2, f"timestamp {big} is out of range"),
    ):
        rc, _, err = run(capsys, *argv, "--db", str(tiny_db))
        assert_error(rc, err, code, message)
    assert snapshot(tiny_db) == before
    rc, out, _ = run(capsys, "history", "show", "--user", "1", "--limit", big, "--json", "--db", str(tiny_db))
    assert rc == 0 and len(json.loads(out)) == len(TINY_HISTORIES[1])


def test_timestamps_that_are_not_dates_are_shown_as_numbers(tiny_db, capsys):
    # Any int64 is a valid order key (ingest takes sequence numbers or milliseconds); a date covers years 1-9999.
    for stamp in ("99999999999999", str(-(2**63))):
        rc, out, _ = run(capsys, "history", "add", "--user", "1", "--item", "10", "--timestamp", stamp,
                         "--db", str(tiny_db))
        assert rc == 0 and f"at {stamp} (not a date)" in out, out
    rc, out, _ = run(capsys, "history", "show", "--user", "1", "--db", str(tiny_db))
    assert rc == 0 and "99999999999999 (not a date)" in out.replace("\n", " ")


def test_paths_that_cannot_be_written_are_one_line(tiny_db, tmp_path, capsys):
    # An OSError from any command is exit 14 with the path and the reason, not an internal error (70).
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv, path, reason in (
        (("evaluate", "--pop", "--users", "2", "--out", str(a_file / "log.jsonl")), a_file,
         "a file is there, where a folder is needed"),
        (("prompts", "export", "--out", str(a_file / "p")), a_file / "p", "a-file is a file, where a folder is needed"),
        (("grammar", "export", "--out", str(tmp_path), "--force"), tmp_path, "it is not a file (a folder is there)"),
        (("grammar", "export", "--out", str(tmp_path)), tmp_path, "it is not a file (a folder is there)"),
        (("evaluate", "--pop", "--users", "2", "--out", str(tmp_path)), tmp_path, "it is not a file (a folder is there)"),
    ):
        rc, _, err = run(capsys, *argv, "--db", str(tiny_db))
        assert_error(rc, err, 14, f"cannot use {path}")
        assert reason in err


def test_not_a_sqlite_file(tmp_path, capsys):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    before = path.read_bytes()
    for argv in (["history", "show", "--user", "1"], ["history", "add", "--user", "1", "--item", "10"]):
        rc, _, err = run(capsys, *argv, "--db", str(path))
        assert_error(rc, err, 3, "not a SQLite database")
    assert path.read_bytes() == before  # never overwritten


def test_read_only_database(tiny_db, capsys):
    tiny_db.chmod(0o444)
    try:
        before = snapshot(tiny_db)
        rc, _, err = run(capsys, "history", "add", "--user", "1", "--item", "10", "--db", str(tiny_db))
        assert_error(rc, err, 3, "database is read-only")
        rc, out, _ = run(capsys, "history", "show", "--user", "1", "--json", "--db", str(tiny_db))
        assert rc == 0 and [r["item_id"] for r in json.loads(out)] == TINY_HISTORIES[1]
        assert snapshot(tiny_db) == before
    finally:
        tiny_db.chmod(0o644)


def test_database_locked_past_busy_timeout(tiny_db, capsys, tmp_path):
    holder = sqlite3.connect(tiny_db, timeout=0.1)
    holder.execute("BEGIN IMMEDIATE")  # another writer
    holder.execute("INSERT INTO users(id) VALUES (777)")
    try:
        started = time.monotonic()
        rc, _, err = run(capsys, "history", "add", "--user", "1", "--item", "10", "--db", str(tiny_db),
                         "--busy-timeout", "0.3")
        assert_error(rc, err, 3, "database is locked by another writer (waited 0.3 s)")
        items = tmp_path / "items.csv"
        items.write_text("item_id,title,genres\n9001,New (2020),Drama\n", encoding="utf-8")
        inter = tmp_path / "inter.csv"
        inter.write_text("user_id,item_id,timestamp,rating\n1,9001,5,4\n", encoding="utf-8")
        rc, _, err = run(capsys, "data", "ingest", "csv", "--items", str(items), "--interactions", str(inter),
                         "--db", str(tiny_db), "--busy-timeout", "0.3")
        assert_error(rc, err, 3, "locked")
        assert time.monotonic() - started < 10
    finally:
        holder.commit()  # the other writer's work must survive ours failing
        holder.close()
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert 777 in db.users()
        assert db.history(1)[-1].item_id == TINY_HISTORIES[1][-1]
        assert not db.item_by_title("New (2020)")


# ------------------------------------------------------------------------------------------ malformed CSV
BAD_CSV = [
    # (case, items.csv bytes, interactions.csv bytes, message)
    ("bad quoting", b'item_id,title,genres\n1,"Bad "quote" here,Drama\n',
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "items.csv:2: bad CSV quoting"),
    ("unterminated quote", b'item_id,title,genres\n1,"Unterminated,Drama\n2,X,Y\n',
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "bad CSV quoting"),
    ("too many columns", b"item_id,title,genres\n1,Good,Drama\n2,Two,Drama,Extra\n",
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "items.csv:3: expected 3 fields, got 4"),
    ("too few columns", b"item_id,title,genres\n1,Good,Drama\n",
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n1,1\n", "inter.csv:3: expected 4 fields, got 2"),
    ("not UTF-8", b"item_id,title,genres\n1,Caf\xe9,Drama\n",
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "items.csv:2: not valid UTF-8 (byte 0xe9"),
    ("not a number", b"item_id,title,genres\n1,Good,Drama\n",
     b"user_id,item_id,timestamp,rating\nabc,1,100,4\n", "inter.csv:2:"),
    ("unknown item", b"item_id,title,genres\n1,Good,Drama\n",
     b"user_id,item_id,timestamp,rating\n1,2,100,4\n", "inter.csv:2: unknown item 2"),
    ("missing column", b"id,name\n1,Good\n",
     b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "items.csv:1: no column"),
    *[
        pytest.param(case, items, inter, message)
        for case, items, inter, message in [
            ("huge item id", b"item_id,title,genres\n99999999999999999999999,A,Drama\n",
             b"user_id,item_id,timestamp,rating\n1,1,100,4\n", "items.csv:2:"),
            ("huge user id", b"item_id,title,genres\n1,A,Drama\n",
             b"user_id,item_id,timestamp,rating\n99999999999999999999999,1,100,4\n", "inter.csv:2:"),
            ("huge timestamp", b"item_id,title,genres\n1,A,Drama\n",
             b"user_id,item_id,timestamp,rating\n1,1,99999999999999999999999,4\n", "inter.csv:2:"),
            ("infinite timestamp", b"item_id,title,genres\n1,A,Drama\n",
             b"user_id,item_id,timestamp,rating\n1,1,1e309,4\n", "inter.csv:2:"),
        ]
    ],
    pytest.param(
        "NUL byte", b"item_id,title,genres\n1,Go\x00od,Drama\n", b"user_id,item_id,timestamp,rating\n1,1,100,4\n",
        "items.csv:2: title contains a NUL byte",
    ),
]


@pytest.mark.parametrize(("case", "items", "inter", "message"), BAD_CSV,
                         ids=[p.values[0] if hasattr(p, "values") else p[0] for p in BAD_CSV])
def test_malformed_csv_is_rejected_and_changes_nothing(tiny_db, tmp_path, capsys, case, items, inter, message):
    (tmp_path / "items.csv").write_bytes(items)
    (tmp_path / "inter.csv").write_bytes(inter)
    before = snapshot(tiny_db)
    rc, _, err = run(capsys, "data", "ingest", "csv", "--items", str(tmp_path / "items.csv"),
                     "--interactions", str(tmp_path / "inter.csv"), "--db", str(tiny_db))
    assert_error(rc, err, 6, message)
    assert snapshot(tiny_db) == before


# ------------------------------------------------------------------------------------------ adversarial titles
ADVERSARIAL = [
    'He said "Hi" (2001)',
    "C:\\path\\to\\film\\ (2002)",
    "Line one\nLine two (2003)",
    "Tab\there\x01bell\x07del\x7f (2004)",
    "🎬 Popcorn 🍿 Night 👩‍👩‍👧 (2005)",
    "שלום עולם (2006)",
    "مرحبا بالعالم (2007)",
    "\u202eevil\u202c override (2008)",
    "Comma, \"quote\", and 'apostrophe' (2009)",
    "Ünïcödé Ñame (2010)",
    "[bold]Bold[/bold] (2011)",
    "Closing [/x] tag (2012)",
]
STORED = [one_line(title) for title in ADVERSARIAL]  # a prompt lists one title per line: "Line one Line two"


@pytest.fixture(scope="module")
def adversarial_db(tmp_path_factory) -> Path:
    """A database whose whole catalog is adversarial titles, ingested through the CLI from a generic CSV."""
    import csv

    folder = tmp_path_factory.mktemp("adversarial")
    with open(folder / "items.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["item_id", "title", "genres"])
        for i, title in enumerate(ADVERSARIAL, start=1):
            writer.writerow([i, title, "Drama"])
    with open(folder / "inter.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for pos, item in enumerate([1, 2, 3]):
            writer.writerow([1, item, 1000 + pos, 4])
    db = folder / "adversarial.db"
    rc = main(["data", "ingest", "csv", "--items", str(folder / "items.csv"), "--interactions",
               str(folder / "inter.csv"), "--db", str(db)])
    assert rc == 0
    return db


def test_adversarial_titles_round_trip_through_history(adversarial_db, capsys):
    with HistoryDB.open(adversarial_db, readonly=True) as db:
        assert list(db.catalog().titles) == STORED  # stored exactly, not escaped or normalised, but on one line
    assert STORED[2] == "Line one Line two (2003)" and STORED[:2] + STORED[3:] == ADVERSARIAL[:2] + ADVERSARIAL[3:]
    for n, title in enumerate(ADVERSARIAL):
        rc, out, err = run(capsys, "history", "add", "--user", "2", "--title", title, "--timestamp", str(5000 + n),
                           "--db", str(adversarial_db))
        assert rc == 0, err
    rc, out, _ = run(capsys, "history", "show", "--user", "2", "--json", "--db", str(adversarial_db))
    assert rc == 0
    assert [r["title"] for r in json.loads(out)] == STORED  # found by the spelling of the source file too


def test_titles_with_square_brackets_print_as_they_are_in_tables(adversarial_db, model_root, capsys):  # noqa: F811
    # rich read "[/x]" as markup: a closing tag without an opening one crashed the command (exit 70), and
    # "[bold]Bold[/bold]" lost its brackets.
    model = tiny_model_for(adversarial_db, model_root, tuple(STORED))
    rc, out, err = run(capsys, "items", "search", "tag", "--db", str(adversarial_db))
    assert rc == 0 and "Closing [/x] tag (2012)" in out, err
    rc, out, err = run(capsys, "recommend", "--model", str(model), "--db", str(adversarial_db), "--threads", "1",
                       "--user", "1", "--k", str(len(STORED) - 3))  # every unseen title
    assert rc == 0 and "Closing [/x] tag (2012)" in out and "[bold]Bold[/bold] (2011)" in out, err
    rc, out, err = run(capsys, "history", "add", "--user", "3", "--title", "Closing [/x] tag (2012)", "--db",
                       str(adversarial_db))
    assert rc == 0 and "Closing [/x] tag (2012)" in out, err
    rc, out, err = run(capsys, "history", "show", "--user", "3", "--db", str(adversarial_db))
    assert rc == 0 and "Closing [/x] tag (2012)" in out, err


# ------------------------------------------------------------------------------------------ recommend & models
def recommend(capsys, model: Path, db: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "recommend", "--model", str(model), "--db", str(db), "--threads", "1", *extra)


def test_adversarial_titles_come_back_exactly_from_recommend(adversarial_db, model_root, capsys):  # noqa: F811
    model = tiny_model_for(adversarial_db, model_root, tuple(STORED))
    rc, out, err = recommend(capsys, model, adversarial_db, "--user", "1", "--k", str(len(ADVERSARIAL) - 3), "--json")
    assert rc == 0, err
    got = [r["title"] for r in json.loads(out)["items"]]
    assert sorted(got) == sorted(ADVERSARIAL[3:])  # every unseen title, each byte for byte


def test_recommend_unknown_user(tiny_db, tiny_model, capsys):  # noqa: F811
    rc, _, err = recommend(capsys, tiny_model, tiny_db, "--user", "999")
    assert_error(rc, err, 4, "unknown user 999")


def test_recommend_empty_history(tiny_db, tiny_model, capsys):  # noqa: F811
    rc, _, err = recommend(capsys, tiny_model, tiny_db, "--user", str(EMPTY_USER))
    assert_error(rc, err, 5, f"user {EMPTY_USER} has no history")


def test_recommend_user_who_has_seen_everything(tiny_db, tiny_model, capsys):  # noqa: F811
    with HistoryDB.open(tiny_db) as db:
        for n, item in enumerate(TINY_TITLES):
            db.add_interaction(50, item, timestamp=10 + n)
    rc, _, err = recommend(capsys, tiny_model, tiny_db, "--user", "50")
    assert_error(rc, err, 2, "every catalog title is already in this history")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--sample", "--prior", "none"), "--prior does not apply to --sample"),
        (("--sample", "--beam", "3"), "--beam does not apply to --sample"),
        (("--sample", "--temperature", "0"), "--temperature must be a finite number > 0"),
        (("--sample", "--temperature", "inf"), "--temperature must be a finite number > 0"),
        (("--sample", "--seed", "-1"), "seed must be from 0 to 4294967294"),  # -1 and 2**32-1: llama.cpp's "random"
        (("--sample", "--seed", "4294967295"), "seed must be from 0 to 4294967294"),
        (("--sample", "--seed", "4294967296"), "seed must be from 0 to 4294967294"),  # was seed 0, wrapped
        (("--seed", "3"), "--seed applies to --sample only"),
        (("--temperature", "2"), "--temperature applies to --sample only"),
        (("--prior", "none", "--prior-weight", "2"), "a prior weight needs a prior"),
        (("--prior-weight", "2"), "a prior weight needs a prior"),  # the tiny model has no prior of its own
    ],
)
def test_recommend_options_that_would_be_ignored(tiny_db, tiny_model, capsys, extra, message):  # noqa: F811
    rc, _, err = recommend(capsys, tiny_model, tiny_db, "--user", "1", *extra)
    assert_error(rc, err, 2, message)


def test_out_of_range_counts_are_usage_errors(tiny_db, tiny_model, capsys):  # noqa: F811
    # Past MAX_K the CLI would run search after search (minutes on a real catalog); --limit 0 shows nothing.
    for argv in (("recommend", "--model", str(tiny_model), "--user", "1", "--k", "101"),
                 ("evaluate", "--pop", "--k", "101"), ("history", "show", "--user", "1", "--limit", "0")):
        rc, _, err = run(capsys, *argv, "--db", str(tiny_db))
        assert rc == 2 and ("less than or equal to 100" in err or "greater than or equal to 1" in err), err
    rc, out, _ = recommend(capsys, tiny_model, tiny_db, "--user", "1", "--prior", "none", "--prior-weight", "0",
                           "--k", "2", "--json")
    assert rc == 0 and len(json.loads(out)["items"]) == 2


def _corrupt(kind: str, good: Path, out: Path) -> Path:
    data = bytearray(good.read_bytes())
    if kind == "truncated":
        out.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "empty":
        out.write_bytes(b"")
    elif kind == "bad version":
        data[4:8] = (99).to_bytes(4, "little")
        out.write_bytes(bytes(data))
    elif kind == "huge tensor count":
        data[8:16] = (2**62).to_bytes(8, "little")
        out.write_bytes(bytes(data))
    elif kind == "text file":
        out.write_text("not a model\n" * 50)
    elif kind == "foreign":
        write_gguf(out, arch="gpt2")
    return out


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated"),
        ("empty", "not a GGUF file"),
        ("bad version", "unsupported GGUF version 99"),
        ("huge tensor count", "declares 4611686018427387904 tensors"),
        ("text file", "not a GGUF file (bad magic)"),
        ("foreign", "foreign model (architecture 'gpt2'"),
    ],
)
def test_bad_model_files(tiny_db, tiny_model, tmp_path, capsys, kind, message):  # noqa: F811
    bad = _corrupt(kind, tiny_model, tmp_path / f"{kind.replace(' ', '-')}.gguf")
    rc, _, err = recommend(capsys, bad, tiny_db, "--user", "1")
    assert_error(rc, err, 7, message)


def test_model_for_another_catalog(tiny_db, adversarial_db, model_root, capsys):  # noqa: F811
    other = tiny_model_for(adversarial_db, model_root, tuple(STORED))
    rc, _, err = recommend(capsys, other, tiny_db, "--user", "1")
    assert_error(rc, err, 8, "was trained for catalog")


def test_missing_model_file(tiny_db, tmp_path, capsys):
    rc, _, err = recommend(capsys, tmp_path / "nope.gguf", tiny_db, "--user", "1")
    assert_error(rc, err, 4, "nope.gguf")


def test_a_directory_given_as_the_model(tiny_db, tmp_path, capsys):
    # Every command that takes --model GGUF says what it found instead of a file.
    users = tmp_path / "users.txt"
    users.write_text("1\n")
    for argv in (("recommend", "--user", "1"), ("recommend", "--users-file", str(users), "--out", str(tmp_path / "o")),
                 ("prior", "show"), ("doctor",)):
        db = () if argv[0] == "prior" else ("--db", str(tiny_db))
        rc, _, err = run(capsys, *argv, "--model", str(tmp_path), *db)
        assert rc == 14, err  # FileAccessError's (README: a directory given for a file), doctor's too
        assert f"{tmp_path} is a directory, not a GGUF model file" in err, err


def test_recommend_on_a_non_sqlite_database(tiny_model, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "x.db"
    path.write_bytes(b"\x00" * 4096)
    rc, _, err = recommend(capsys, tiny_model, path, "--user", "1")
    assert rc == 3 and "error: " in err
