"""Ingest every format into real SQLite files; malformed input names FILE:LINE and changes nothing."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3

import pytest
from conftest import TINY_HISTORIES, TINY_TITLES, dump, write_tiny_movielens

import genrec_edge.ingest as ingest_module
from genrec_edge.cli import main
from genrec_edge.errors import IngestError, UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.ingest import detect_format, ingest, parse_year
from genrec_edge.prompts import PromptTemplate, render_prompt_text

N_INTERACTIONS = sum(map(len, TINY_HISTORIES.values()))


def test_parse_year():
    assert parse_year("Toy Story (1995)") == 1995
    assert parse_year("Babylon 5 (1994-1998)") == 1994
    assert parse_year("Fargo (2014-) ") == 2014
    assert parse_year("City of God (Cidade de Deus) (2002)") == 2002
    assert parse_year("Hyena Road") is None
    assert parse_year("1984 (Nineteen Eighty-Four)") is None


def test_movielens_csv_counts_and_repeat_is_a_no_op(tiny_movielens_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "CHUNK_ROWS", 7)  # several executemany chunks
    db_path = tmp_path / "ml.db"
    report = ingest(db_path, "movielens-csv", tiny_movielens_dir, progress=False)
    assert (report.dataset, report.items, report.users, report.interactions, report.skipped) == (
        "tiny-ml", 20, 8, N_INTERACTIONS, 0
    )
    with HistoryDB.open(db_path) as db:
        assert dict(db.sequences()) == TINY_HISTORIES
        assert db.item(150).year == 1999
    before = dump(db_path)
    again = ingest(db_path, "movielens-csv", tiny_movielens_dir, progress=False)
    assert (again.items, again.users, again.interactions, again.skipped) == (0, 0, 0, 0)
    assert (again.items_read, again.interactions_read) == (report.items_read, report.interactions_read)
    assert (report.items_read, report.interactions_read) == (20, N_INTERACTIONS) and report.kept() == ""
    assert again.kept() == f" (20 items, {N_INTERACTIONS} interactions already there, kept as they were)"
    assert dump(db_path) == before


def test_cli_ingest_reports_counts(tiny_movielens_dir, tmp_path, capsys):
    db_path = tmp_path / "cli.db"
    assert main(["data", "ingest", "movielens-csv", str(tiny_movielens_dir), "--db", str(db_path)]) == 0
    assert f"tiny-ml: 20 new items, 8 new users, {N_INTERACTIONS} new interactions, 0 bad rows skipped" in (
        capsys.readouterr().out
    )
    assert main(["data", "ingest", "movielens-csv", str(tiny_movielens_dir), "--db", str(db_path)]) == 0
    assert (f"tiny-ml: 0 new items, 0 new users, 0 new interactions (20 items, {N_INTERACTIONS} interactions "
            "already there, kept as they were), 0 bad rows skipped") in capsys.readouterr().out


def _write_dat(folder, encoding):
    folder.mkdir()
    titles = {1: "Toy Story (1995)", 2: "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", 3: "Heat (1995)"}
    (folder / "movies.dat").write_bytes(
        "".join(f"{i}::{t}::Comedy|Drama\n" for i, t in titles.items()).encode(encoding)
    )
    (folder / "ratings.dat").write_text("1::2::5::978300760\n1::1::3::978300700\n2::3::4::978300000\n")
    return titles


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])  # ml-1m, ml-10m
def test_movielens_dat_in_both_encodings(tmp_path, encoding):
    titles = _write_dat(tmp_path / "ml-dat", encoding)
    report = ingest(tmp_path / "dat.db", "movielens-dat", tmp_path / "ml-dat", progress=False)
    assert (report.items, report.users, report.interactions) == (3, 2, 3)
    with HistoryDB.open(tmp_path / "dat.db") as db:
        assert db.item(2).title == titles[2] and db.item(2).year == 2001
        assert db.item(2).genres == ("Comedy", "Drama")
        assert [(h.item_id, h.rating) for h in db.history(1)] == [(1, 3.0), (2, 5.0)]


def _write_100k(folder):
    folder.mkdir()
    # u.item: id|title|release date|video release date|IMDb URL|19 flags (unknown, Action, Adventure, ...)
    flags_toy = ["0", "0", "0", "1", "1", "1"] + ["0"] * 13  # Animation, Children's, Comedy
    flags_unknown = ["1"] + ["0"] * 18
    u_item = (
        "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|" + "|".join(flags_toy) + "\n"
        "2|Misérables, Les (1995)|01-Jan-1995|||" + "|".join(["0"] * 8 + ["1"] + ["0"] * 10) + "\n"
        "267|unknown||||" + "|".join(flags_unknown) + "\n"
    )
    (folder / "u.item").write_bytes(u_item.encode("latin-1"))
    (folder / "u.data").write_text("196\t1\t3\t881250949\n196\t2\t4\t881250000\n22\t267\t1\t878887116\n")
    return folder


def test_movielens_100k_format(tmp_path):
    folder = _write_100k(tmp_path / "ml-100k")
    report = ingest(tmp_path / "100k.db", "movielens-100k", folder, progress=False)
    assert (report.items, report.users, report.interactions) == (3, 2, 3)
    with HistoryDB.open(tmp_path / "100k.db") as db:
        assert db.item(1).genres == ("Animation", "Children's", "Comedy")
        assert db.item(2).title == "Misérables, Les (1995)" and db.item(2).genres == ("Drama",)
        assert db.item(267).year is None and db.item(267).genres == ()
        assert [h.item_id for h in db.history(196)] == [2, 1]
    extra = sqlite3.connect(tmp_path / "100k.db").execute("SELECT extra FROM items WHERE id = 1").fetchone()[0]
    assert json.loads(extra)["release_date"] == "01-Jan-1995"


def _contents(db_path) -> dict[str, list[tuple]]:
    """Every row but the timestamps of the ingest itself (migrations, ingested_at)."""
    queries = {
        "datasets": "SELECT name, source, catalog_sha256 FROM datasets",
        "items": "SELECT * FROM items ORDER BY id",
        "users": "SELECT * FROM users ORDER BY id",
        "interactions": "SELECT * FROM interactions ORDER BY user_id, timestamp, item_id",
    }
    conn = sqlite3.connect(db_path)
    try:
        return {table: conn.execute(query).fetchall() for table, query in queries.items()}
    finally:
        conn.close()


def _write_release(fmt: str, folder, tiny_movielens_dir):
    """Write a release folder of MovieLens format ``fmt`` (the tiny fixtures above); returns the folder."""
    if fmt == "movielens-csv":
        shutil.copytree(tiny_movielens_dir, folder)
    elif fmt == "movielens-dat":
        _write_dat(folder, "latin-1")
    else:
        _write_100k(folder)
    return folder


@pytest.mark.parametrize(
    "release, fmt",
    [("ml-latest-small", "movielens-csv"), ("ml-latest", "movielens-csv"), ("ml-20m", "movielens-csv"),
     ("ml-25m", "movielens-csv"), ("ml-1m", "movielens-dat"), ("ml-10m", "movielens-dat"),
     ("ml-100k", "movielens-100k")],
)  # fmt: skip
def test_release_names_and_auto_ingest_as_their_format(release, fmt, tiny_movielens_dir, tmp_path):
    """`data download ml-1m` then `data ingest ml-1m PATH` (or `auto PATH`): the same rows as the format."""
    folder = _write_release(fmt, tmp_path / release, tiny_movielens_dir)
    by_format = ingest(tmp_path / "format.db", fmt, folder, progress=False)
    by_name = ingest(tmp_path / "name.db", release, folder, progress=False)
    detected = ingest(tmp_path / "auto.db", "auto", folder, progress=False)
    counts = lambda r: (r.dataset, r.items, r.users, r.interactions, r.skipped)  # noqa: E731
    assert counts(by_name) == counts(detected) == counts(by_format) and by_format.interactions > 0
    contents = _contents(tmp_path / "format.db")
    assert _contents(tmp_path / "name.db") == _contents(tmp_path / "auto.db") == contents
    assert contents["datasets"][0][1] == f"{fmt}:{folder.resolve()}"  # the format it was read as, not the alias


def test_detect_format(tiny_movielens_dir, tmp_path):
    for fmt in ("movielens-csv", "movielens-dat", "movielens-100k"):
        assert detect_format(_write_release(fmt, tmp_path / fmt, tiny_movielens_dir)) == fmt
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty: cannot detect the format, it holds none of the MovieLens files"):
        detect_format(tmp_path / "empty")
    both = tmp_path / "both"
    shutil.copytree(tiny_movielens_dir, both)
    (both / "u.item").write_text("")
    (both / "u.data").write_text("")
    with pytest.raises(UsageError, match=r"files of several formats \(movielens-csv, movielens-100k\)"):
        detect_format(both)
    with pytest.raises(IngestError, match=r"nowhere: not a folder"):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "movies.csv").write_text("movieId,title,genres\n")
    with pytest.raises(UsageError, match=r"half: cannot detect the format, it holds movies.csv but not ratings.csv"):
        detect_format(tmp_path / "half")
    with pytest.raises(UsageError, match=r"format auto needs the PATH"):
        detect_format(None)


def test_cli_ingest_auto_and_release_name(tiny_movielens_dir, tmp_path, capsys):
    db_path = tmp_path / "cli.db"
    assert main(["data", "ingest", "auto", str(tiny_movielens_dir), "--db", str(db_path)]) == 0
    assert f"tiny-ml: 20 new items, 8 new users, {N_INTERACTIONS} new interactions" in capsys.readouterr().out
    assert main(["data", "ingest", "ml-latest-small", str(tiny_movielens_dir), "--db", str(db_path)]) == 0
    assert "tiny-ml: 0 new items, 0 new users, 0 new interactions" in capsys.readouterr().out  # the same data
    (tmp_path / "empty").mkdir()
    assert main(["data", "ingest", "auto", str(tmp_path / "empty"), "--db", str(db_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot detect the format" in err and err.count("\n") == 1


def test_generic_csv_with_iso_dates_and_custom_columns(tmp_path, capsys):
    (tmp_path / "events.csv").write_text(
        "who;what;when;stars\n"
        "1;5;2020-01-02T00:00:00Z;4\n"
        "1;6;2020-01-01;\n"
        "2;5;1577836800;2.5\n"
    )
    (tmp_path / "things.csv").write_text('id;name\n5;"Heat (1995)"\n6;Se7en (1995)\n')
    args = [
        "data", "ingest", "csv", str(tmp_path), "--db", str(tmp_path / "g.db"),
        "--interactions", "events.csv", "--items", "things.csv", "--delimiter", ";",
        "--user-col", "who", "--item-col", "what", "--time-col", "when", "--rating-col", "stars",
        "--title-col", "name", "--item-id-col", "id", "--dataset-name", "mine",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    with HistoryDB.open(tmp_path / "g.db") as db:
        assert [(h.item_id, h.timestamp, h.rating) for h in db.history(1)] == [
            (6, 1577836800, None),
            (5, 1577923200, 4.0),
        ]
        assert db.dataset().name == "mine"


def test_a_title_over_several_lines_is_stored_on_one_and_found_by_either_spelling(tmp_path):
    # A quoted CSV field may hold line breaks; a prompt lists one title per line, so it would read as two items.
    (tmp_path / "items.csv").write_text('item_id,title\n1,"Heat\r\n  (1995)"\n2,"A\u2028B (2001)"\n3,Se7en (1995)\n')
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,1,10\n1,2,11\n1,3,12\n")
    db_path = tmp_path / "g.db"
    ingest(db_path, "csv", tmp_path, interactions="inter.csv", items="items.csv", progress=False)
    with HistoryDB.open(db_path) as db:
        assert [db.item(i).title for i in (1, 2, 3)] == ["Heat (1995)", "A B (2001)", "Se7en (1995)"]
        assert [i.id for i in db.item_by_title("Heat\r\n  (1995)")] == [1]  # as the source file spells it
        assert [i.id for i in db.item_by_title("Heat (1995)")] == [1]
        titles = [h.title for h in db.history(1)]
    prompt = render_prompt_text(titles, PromptTemplate())
    assert prompt.splitlines()[1:] == titles  # one line per item


def test_generic_csv_missing_column(tmp_path):
    (tmp_path / "i.csv").write_text("user,item_id,timestamp\n1,5,0\n")
    (tmp_path / "t.csv").write_text("item_id,title\n5,X\n")
    with pytest.raises(IngestError, match=r"^.*i\.csv:1: no column 'user_id' \(columns: user, item_id, timestamp\)$"):
        ingest(tmp_path / "g.db", "csv", interactions=tmp_path / "i.csv", items=tmp_path / "t.csv", progress=False)
    with pytest.raises(UsageError, match="format csv needs --interactions FILE and --items FILE"):
        ingest(tmp_path / "g.db", "csv", tmp_path, progress=False)


def test_generic_csv_options_and_files_are_checked_before_anything_is_written(tmp_path):
    items = tmp_path / "t.csv"
    items.write_text("item_id,title\n5,X (1999)\n6,Y (2000)\n")
    tabbed = tmp_path / "i.tsv"
    tabbed.write_text("user_id\titem_id\ttimestamp\trating\n1\t5\t10\t4\n1\t6\t20\t\n")
    db = tmp_path / "g.db"

    def run(interactions, **options):
        return ingest(db, "csv", interactions=interactions, items=items, progress=False, **options)

    for bad in (";;", "", '"'):
        with pytest.raises(UsageError, match="--delimiter is one character"):
            run(tabbed, delimiter=bad)
    # The items file is comma-separated: one --delimiter for both files names the column it cannot find.
    with pytest.raises(IngestError, match=r"no column 'user_id' .*the header holds '\\t': another --delimiter\?"):
        run(tabbed)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(IngestError, match="empty file"):
        run(tmp_path / "empty.csv")
    nan = tmp_path / "nan.csv"
    nan.write_text("user_id,item_id,timestamp,rating\n1,5,10,nan\n")
    with pytest.raises(IngestError, match=r"nan\.csv:2: rating 'nan' is not a finite number"):
        run(nan)
    with pytest.raises(IngestError, match="no such folder"):
        ingest(db, "csv", tmp_path / "nodir", interactions=tabbed, items=items, progress=False)
    assert not db.exists() and not list(tmp_path.glob("g.db*"))  # each failure left no (empty) database behind
    with pytest.raises(UsageError, match="--user-col, --delimiter apply to format csv, not movielens-csv"):
        ingest(db, "movielens-csv", tmp_path, delimiter=";", user_col="u", progress=False)
    # Given is given, even at the csv default's value (it was taken as not given, and ignored).
    with pytest.raises(UsageError, match="--rating-col, --delimiter apply to format csv, not movielens-dat"):
        ingest(db, "movielens-dat", tmp_path, delimiter=",", rating_col="rating", progress=False)

    tsv_items = tmp_path / "t.tsv"
    tsv_items.write_text("item_id\ttitle\n5\tX (1999)\n6\tY (2000)\n")
    report = ingest(db, "csv", interactions=tabbed, items=tsv_items, delimiter="\\t", progress=False)  # as typed
    assert (report.items, report.interactions) == (2, 2)
    with HistoryDB.open(db) as opened:
        assert [(h.item_id, h.rating) for h in opened.history(1)] == [(5, 4.0), (6, None)]


# ----------------------------------------------------------------------------- malformed input
BAD_MOVIES = {
    "wrong column count": ('25,"Extra (1999)",Drama,oops\n', "expected 3 fields, got 4"),
    "bad quoting": ('25,"Bad "quote" (1999)",Drama\n', "bad CSV quoting (',' expected after '\"')"),
    "non-numeric id": ("x25,Words (1999),Drama\n", "movie id 'x25' is not an integer"),
    "non-UTF-8": (b"25,Caf\xe9 (1999),Drama\n",
                  "not valid UTF-8 (byte 0xe9 at column 7): --encoding latin-1 reads the file as Latin-1"),
}


@pytest.mark.parametrize("case", list(BAD_MOVIES))
def test_malformed_row_stops_with_file_line_and_leaves_db_unchanged(case, tiny_db, tmp_path, capsys):
    line, reason = BAD_MOVIES[case]
    folder = write_tiny_movielens(tmp_path / "bad-ml")
    movies = folder / "movies.csv"
    with open(movies, "ab") as fh:
        fh.write(line if isinstance(line, bytes) else line.encode())
        fh.write(b"26,Fine Afterwards (2000),Drama\n")
    (folder / "ratings.csv").open("a").write("50,25,4.0,1\n50,26,4.0,2\n")
    bad_line = len(TINY_TITLES) + 2  # header + 20 items, then the bad row
    before = dump(tiny_db)

    with pytest.raises(IngestError) as info:
        ingest(tiny_db, "movielens-csv", folder, progress=False)
    assert str(info.value) == f"{movies}:{bad_line}: {reason}"
    assert dump(tiny_db) == before

    rc = main(["data", "ingest", "movielens-csv", str(folder), "--db", str(tiny_db)])
    assert rc == IngestError.exit_code == 6
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {movies}:{bad_line}: {reason}"
    assert dump(tiny_db) == before

    # --skip-bad: the bad row is counted; the row after it and its rating of 26 go in; 25's rating is
    # then an unknown item and is skipped too.
    report = ingest(tiny_db, "movielens-csv", folder, skip_bad=True, progress=False)
    assert (report.items, report.users, report.interactions, report.skipped) == (1, 1, 1, 2)
    with HistoryDB.open(tiny_db) as db:
        assert [h.item_id for h in db.history(50)] == [26]


def test_bad_rating_row_names_the_ratings_file(tiny_db, tmp_path):
    folder = write_tiny_movielens(tmp_path / "bad-ratings")
    ratings = folder / "ratings.csv"
    n_lines = len(ratings.read_text().splitlines())
    with open(ratings, "a") as fh:
        fh.write("1,10,four,5\n")
    before = dump(tiny_db)
    with pytest.raises(IngestError, match=rf"^{ratings}:{n_lines + 1}: rating 'four' is not a number$"):
        ingest(tiny_db, "movielens-csv", folder, progress=False)
    assert dump(tiny_db) == before


def test_unknown_item_and_wrong_header(tmp_path):
    folder = write_tiny_movielens(tmp_path / "x")
    ratings = folder / "ratings.csv"
    n_lines = len(ratings.read_text().splitlines())
    with open(ratings, "a") as fh:
        fh.write("1,99999,4.0,5\n")
    with pytest.raises(IngestError, match=rf"^{ratings}:{n_lines + 1}: unknown item 99999 \(not in the items file\)$"):
        ingest(tmp_path / "x.db", "movielens-csv", folder, progress=False)
    assert not list(tmp_path.glob("x.db*"))  # all or nothing: the failed first ingest left no empty database
    (folder / "movies.csv").write_text("id,name\n1,A\n")
    with pytest.raises(IngestError, match=r"movies\.csv:1: expected header movieId,title,genres, got id,name$"):
        ingest(tmp_path / "x.db", "movielens-csv", folder, progress=False)


def test_missing_files_and_unknown_format(tmp_path, capsys):
    with pytest.raises(IngestError, match=r"nowhere: not a folder"):
        ingest(tmp_path / "a.db", "movielens-csv", tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"empty/movies\.dat: no such file$"):
        ingest(tmp_path / "a.db", "movielens-dat", tmp_path / "empty", progress=False)
    assert main(["data", "ingest", "parquet", str(tmp_path), "--db", str(tmp_path / "a.db")]) == 2
    assert "error: unknown format 'parquet' (choose from movielens-csv, movielens-dat, movielens-100k, csv)" in (
        capsys.readouterr().err
    )


def test_init_builds_atomically_and_is_idempotent(tmp_path, monkeypatch, capsys):
    from genrec_edge.ingest import build_default_db

    target = tmp_path / "home" / "default.db"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "ingest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_default_db(target, progress=False)
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.undo()

    report = build_default_db(target, progress=False)
    assert (report.items, report.users, report.interactions) == (9742, 610, 100836)
    assert report.seconds < 10
    assert build_default_db(target, progress=False) is None
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    assert main(["init"]) == 0
    assert "already exists and is complete" in capsys.readouterr().out
    assert main(["init", "--force"]) == 0
    assert "built " in capsys.readouterr().out


def test_copy_of_fixture_folder_is_independent(tiny_movielens_dir, tmp_path):
    # The fixture folder is session-scoped: prove nothing above wrote into it.
    copy = shutil.copytree(tiny_movielens_dir, tmp_path / "copy")
    assert (copy / "ratings.csv").read_text().count("\n") == N_INTERACTIONS + 1


def test_another_catalog_with_the_same_item_ids_is_refused_and_changes_nothing(tiny_movielens_dir, tmp_path):
    # ml-100k numbers its films unlike ml-latest-small: item 2 is Jumanji in one and "Misérables, Les" here.
    db_path = tmp_path / "mixed.db"
    ingest(db_path, "movielens-csv", tiny_movielens_dir, progress=False)
    before = _contents(db_path)

    folder = _write_100k(tmp_path / "ml-100k")
    (folder / "u.item").write_bytes(f"20|{TINY_TITLES[20]}||||{'|'.join(['0'] * 19)}\n"
                                    f"10|Not {TINY_TITLES[10]}||||{'|'.join(['0'] * 19)}\n".encode("latin-1"))
    (folder / "u.data").write_text("196\t10\t3\t881250949\n")
    with pytest.raises(IngestError, match=rf"u.item:2: item 10 is 'Not {re.escape(TINY_TITLES[10])}' here but "
                                          rf"'{re.escape(TINY_TITLES[10])}' in the database, which holds another "
                                          r"catalog \(tiny-ml\): ingest into another --db"):
        ingest(db_path, "movielens-100k", folder, progress=False)
    assert _contents(db_path) == before
    # Within one file too: the second title of an id would be dropped silently.
    (folder / "u.item").write_bytes(f"5|A (2001)||||{'|'.join(['0'] * 19)}\n5|B (2002)||||{'|'.join(['0'] * 19)}\n"
                                    .encode("latin-1"))
    with pytest.raises(IngestError, match=r"u.item:2: item 5 is 'B \(2002\)' here but 'A \(2001\)' on an earlier line"):
        ingest(tmp_path / "fresh.db", "movielens-100k", folder, progress=False)
    assert not (tmp_path / "fresh.db").exists()


@pytest.mark.parametrize("bad", ["1_0", "\u0662", "1.5", "0x10"])
def test_ids_are_ascii_decimal_integers(tmp_path, bad):
    # Python's int() takes "1_0" and Arabic-Indic digits; no export writes them, and they would land as other ids.
    (tmp_path / "items.csv").write_text("item_id,title\n10,Heat (1995)\n")
    (tmp_path / "inter.csv").write_text(f"user_id,item_id,timestamp,rating\n{bad},10,5,4\n", encoding="utf-8")
    with pytest.raises(IngestError, match=rf"inter.csv:2: user id '{bad}' is not an integer"):
        ingest(tmp_path / "n.db", "csv", tmp_path, interactions="inter.csv", items="items.csv", progress=False)
    (tmp_path / "inter.csv").write_text(f"user_id,item_id,timestamp,rating\n1,10,5,{bad}\n", encoding="utf-8")
    if bad == "1.5":
        ingest(tmp_path / "n.db", "csv", tmp_path, interactions="inter.csv", items="items.csv", progress=False)
    else:
        with pytest.raises(IngestError, match=rf"inter.csv:2: rating '{bad}' is not a number"):
            ingest(tmp_path / "n.db", "csv", tmp_path, interactions="inter.csv", items="items.csv", progress=False)


def test_the_cli_shows_the_csv_defaults_ingest_applies():
    import typer

    from genrec_edge.cli import app
    from genrec_edge.ingest import CSV_DEFAULTS

    command = typer.main.get_command(app).commands["data"].commands["ingest"]
    shown = {p.name: p.show_default for p in command.params if p.name in CSV_DEFAULTS}
    assert shown == CSV_DEFAULTS
    assert all(p.default is None for p in command.params if p.name in CSV_DEFAULTS)  # None: not given


def test_a_utf8_bom_is_dropped_whatever_encoding_reads_the_file(tmp_path):
    # Excel writes one; read as Latin-1 (u.item, or --encoding latin-1) it used to become "ï»¿" in the first field.
    folder = _write_100k(tmp_path / "ml-100k")
    (folder / "u.item").write_bytes(b"\xef\xbb\xbf" + (folder / "u.item").read_bytes())
    ingest(tmp_path / "a.db", "movielens-100k", folder, progress=False)
    with HistoryDB.open(tmp_path / "a.db") as db:
        assert db.item(1).title == "Toy Story (1995)"
    (tmp_path / "items.csv").write_bytes(b"\xef\xbb\xbfitem_id,title\n10,Heat (1995)\n")
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,10,5\n")
    ingest(tmp_path / "b.db", "csv", tmp_path, interactions="inter.csv", items="items.csv", encoding="latin-1",
           progress=False)
    with HistoryDB.open(tmp_path / "b.db") as db:
        assert db.item(10).title == "Heat (1995)"
