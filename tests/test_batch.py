"""Batch recommendation (genrec_edge.batch, `recommend --all-users/--users-file`): real SQLite, real llama.cpp."""

from __future__ import annotations

import json
import re

import pytest
from conftest import EMPTY_USER, TINY_HISTORIES, TINY_TITLES, cli_help_in_a_fresh_process

from genrec_edge.batch import OUT_FORMAT, read_records, recommend_users
from genrec_edge.cli import main
from genrec_edge.errors import EmptyHistoryError, IngestError, NotFoundError, UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.recommend import Recommender, default_beam

K = 4


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))


def run(tiny_model, db, out, **options):
    return recommend_users(db, out, model=tiny_model, k=K, threads=2, progress=False, warn=lambda m: None,
                           **options)


def single_requests(tiny_model, db, users, k=K):
    """What `recommend --user U` gives, one request at a time (batch 1, its own beam capacity)."""
    with Recommender.open(tiny_model, db, threads=2, warn=lambda m: None) as rec:
        return {u: rec.recommend(user=u, k=k) for u in users}


def test_all_users_equal_one_request_at_a_time(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, batch=3)
    users = sorted(TINY_HISTORIES)  # the empty user 9 has nothing to recommend from: not listed
    assert (report.users, report.resumed, report.written, report.errors) == (len(users), 0, len(users), 0)
    header = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert header["format"] == OUT_FORMAT and header["config"]["k"] == K
    assert header["config"]["beam"] == default_beam(K) and header["config"]["model"] == tiny_model.name
    records = read_records(out)
    assert sorted(records) == users
    for user, expected in single_requests(tiny_model, tiny_db, users).items():
        got = records[user]["items"]
        assert [r["title"] for r in got] == [r.title for r in expected.items]
        assert [r["item_ids"] for r in got] == [list(r.item_ids) for r in expected.items]
        assert [r["rank"] for r in got] == list(range(1, K + 1))
        # Exactly: a request's logits do not depend on the others in its llama_decode (engine.py).
        assert [r["score"] for r in got] == [r.score for r in expected.items]
        assert [r["lm_score"] for r in got] == [r.lm_score for r in expected.items]
        assert not {r["title"] for r in got} & {TINY_TITLES[i] for i in TINY_HISTORIES[user]}


def test_a_resumed_run_writes_what_a_whole_run_writes(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    run(tiny_model, tiny_db, out, batch=3)
    whole = out.read_bytes()
    lines = whole.split(b"\n")
    out.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:9])  # users 1-4, then a crash in user 5's line
    again = run(tiny_model, tiny_db, out, batch=3)
    assert (again.users, again.resumed, again.written) == (8, 4, 4)
    # User 4's group (4, 5, 6) is ranked whole again, so 5 and 6 sit in the same slots as before: the
    # same bits, the same bytes.
    assert out.read_bytes() == whole
    nothing = run(tiny_model, tiny_db, out, batch=3)
    assert (nothing.resumed, nothing.written) == (8, 0) and out.read_bytes() == whole
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"\n".join(lines[:3]) + b"\n")
    run(tiny_model, tiny_db, other, batch=2)  # resumed with another batch: the same results
    assert read_records(other) == read_records(out)


def test_refuses_a_file_of_other_settings_or_data_and_leaves_it(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    run(tiny_model, tiny_db, out, users=[1, 2])
    before = out.read_bytes()
    with pytest.raises(UsageError, match=r"another model, database or settings \(k differ\)"):
        recommend_users(tiny_db, out, users=[1], model=tiny_model, k=K + 1, progress=False, warn=lambda m: None)
    damaged = before.replace(b'"user": 2', b'"usr": 2')
    out.write_bytes(damaged)
    with pytest.raises(IngestError, match=r"recs.jsonl:3: not a recommendations line"):
        run(tiny_model, tiny_db, out, users=[1])
    assert out.read_bytes() == damaged
    out.write_bytes(before)
    with HistoryDB.open(tiny_db) as db:
        db.add_interaction(1, 200, timestamp=2_000_000_000, rating=3.0)  # the data changed
    with pytest.raises(UsageError, match=r"\(data differ\)"):
        run(tiny_model, tiny_db, out, users=[1])
    assert out.read_bytes() == before
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not a genrec-edge recommendations file"):
        run(tiny_model, tiny_db, foreign, users=[1])
    assert foreign.read_text(encoding="utf-8") == "my notes\n"


def test_bad_users(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    with pytest.raises(NotFoundError, match="unknown user 999"):
        run(tiny_model, tiny_db, out, users=[1, 999])
    with pytest.raises(EmptyHistoryError, match=f"user {EMPTY_USER} .*no history"):
        run(tiny_model, tiny_db, out, users=[EMPTY_USER])
    assert not out.exists()  # refused before anything was written


def test_a_user_who_has_seen_everything_gets_an_error_line(tiny_model, tiny_db, tmp_path):
    with HistoryDB.open(tiny_db) as db:
        for n, item_id in enumerate(TINY_TITLES):
            db.add_interaction(42, item_id, timestamp=2_000_000_000 + n, rating=3.0)
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, users=[1, 42, 2], batch=3)  # one group: retried one by one
    records = read_records(out)
    assert report.errors == 1 and records[42]["items"] == [] and "every catalog title" in records[42]["error"]
    expected = single_requests(tiny_model, tiny_db, [1, 2])
    for user in (1, 2):
        assert [r["title"] for r in records[user]["items"]] == [r.title for r in expected[user].items]


def test_parquet_has_one_row_per_recommendation(tiny_model, tiny_db, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, users=[1, 4], parquet=True)
    assert report.parquet == tmp_path / "recs.parquet"
    table = pq.read_table(report.parquet).to_pylist()
    records = read_records(out)
    assert table == [{"user": u, **item} for u in (1, 4) for item in records[u]["items"]]


def test_cli_users_file(tiny_model, tiny_db, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("# users to score\n4\n\n2  # again below\n2\n", encoding="utf-8")
    out = tmp_path / "recs.jsonl"
    args = ["recommend", "--users-file", str(users), "--out", str(out), "--model", str(tiny_model),
            "--db", str(tiny_db), "--k", "3", "--threads", "2", "--batch", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"{out}: 2 users, 2 written" in captured.out
    assert "recommend" in captured.err and "user" in captured.err  # the progress bar
    assert list(read_records(out)) == [4, 2]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] == 2

    def fails(argv, code, message):
        assert main(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)

    users.write_text("4\n999\n", encoding="utf-8")
    fails(args, 4, f"unknown user 999 (in {users})")
    users.write_text("4\nfour\n", encoding="utf-8")
    fails(args, 6, f"{users}:2: not a user id: 'four'")
    for bad in ("4_2", "\uff14"):  # int() takes both, as 42 and 4
        users.write_text(f"4\n{bad}\n", encoding="utf-8")
        fails(args, 6, f"{users}:2: not a user id: {bad!r}")
    users.write_text("4\n99999999999999999999\n", encoding="utf-8")  # was an internal error (exit 70)
    fails(args, 6, f"{users}:2: user id 99999999999999999999 is out of range")
    users.write_bytes(b"\xef\xbb\xbf4\n2\n")  # a BOM, as Notepad and Excel write: was "not a user id"
    assert main(args) == 0 and "2 users" in capsys.readouterr().out
    fails([*args[:2], str(tmp_path / "missing.txt"), *args[3:]], 14, "cannot read the users file")
    fails([*args[:2], str(tmp_path), *args[3:]], 14, "cannot read the users file")  # a folder
    users.write_text("4\n", encoding="utf-8")
    fails([*args[:-6], "--out", str(tmp_path), *args[-4:]], 14, "is not a file")
    fails([*args, "--seed", "3"], 2, "do not combine")  # --sample's options, ignored before
    fails([*args, "--parquet", "--out", str(tmp_path / "r.parquet")], 2, "would be overwritten")
    (tmp_path / "recs.parquet").mkdir()  # refused before any ranking, not after it (and no .partial left)
    fails([*args, "--parquet"], 14, "a folder is there, where --parquet writes its copy")
    (tmp_path / "recs.parquet").rmdir()
    assert not list(tmp_path.glob(".*partial*"))
    fails(["recommend", "--user", "1", "--batch", "4", "--model", str(tiny_model), "--db", str(tiny_db)], 2,
          "--batch applies to batch runs")
    fails(["recommend", "--all-users", "--model", str(tiny_model), "--db", str(tiny_db)], 2, "needs --out")
    fails(["recommend", "--user", "1", "--out", str(out)], 2, "--out applies to batch runs")
    fails(["recommend", "--all-users", "--user", "1", "--out", str(out)], 2, "do not combine")
    users.write_text("4\n", encoding="utf-8")
    fails([*args[:-6], "--k", "5", *args[-4:]], 2, "(k differ)")
    assert list(read_records(out)) == [4, 2]
    # A file holding a header and no user (a run that failed before its first, e.g. no Ray cluster) is a
    # fresh start for other settings, not "written with other settings".
    lone = tmp_path / "lone.jsonl"
    lone.write_text(out.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert main([*args[:-6], "--k", "5", "--out", str(lone), *args[-4:]]) == 0, capsys.readouterr().err
    assert list(read_records(lone)) == [4] and '"k": 5' in lone.read_text(encoding="utf-8").splitlines()[0]


def test_rank_many_ranks_like_rank_titles_without_a_database(tiny_model, tiny_db):
    histories = {u: [TINY_TITLES[i] for i in items] for u, items in TINY_HISTORIES.items()}
    requests = [(titles, set(titles), TINY_HISTORIES[u]) for u, titles in histories.items()]
    with Recommender.open(tiny_model, tiny_db, threads=2, beam=8, batch=3, warn=lambda m: None) as rec:
        many = rec.rank_many(requests, K)
        alone = [rec.rank_titles(*request[:2], K, history_items=request[2]) for request in requests]
        with pytest.raises(NotFoundError, match="unknown title"):
            rec.rank_many([requests[0], (["Heat 1995"], set(), None)], K)
        with pytest.raises(EmptyHistoryError):
            rec.rank_many([([], set(), None)], K)
    assert len(many) == len(requests)
    for got, expected in zip(many, alone, strict=True):
        assert got.titles == expected.titles
        assert got.scores == expected.scores and got.lm_scores == expected.lm_scores


def test_help_does_not_import_ray_or_llama_cpp():
    out, imported = cli_help_in_a_fresh_process([["recommend", "--help"]], {"ray", "pyarrow", "torch", "llama_cpp"})
    assert "Example: genrec-edge recommend --all-users" in out and "--ray" in out
    assert imported == []


def test_a_header_cut_short_is_started_over(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    for cut in (b"", b"{", b'{"format": "genrec-edge-recomm', b'{"format": "genrec-edge-recommendations", "ver'):
        out.write_bytes(cut)
        report = run(tiny_model, tiny_db, out, users=[2])
        assert (report.resumed, report.written) == (0, 1)
        assert list(read_records(out)) == [2] and header_of(out)["format"] == OUT_FORMAT
    out.write_bytes(b"user,items\n")
    with pytest.raises(UsageError, match="not a genrec-edge recommendations file"):
        run(tiny_model, tiny_db, out, users=[2])


def header_of(path):
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def test_huge_timestamps_do_not_overflow_the_data_checksum(tiny_model, tiny_db, tmp_path):
    with HistoryDB.open(tiny_db) as db:  # two timestamps whose sum is past int64 (SQLite's sum() raises)
        for user in (1, 2):
            db.add_interaction(user, 200 if user == 1 else 10, timestamp=9_000_000_000_000_000_000, rating=3.0)
    report = run(tiny_model, tiny_db, tmp_path / "recs.jsonl", users=[1, 2])
    assert report.written == 2


def test_a_model_for_another_catalog_is_refused_before_the_file_is_touched(tiny_model, tiny_db, tmp_path):
    from genrec_edge.convert import convert
    from genrec_edge.errors import CatalogMismatchError, CorruptModelError

    foreign = convert(tiny_model.parent / "hf", tmp_path / "foreign.gguf", outtype="f32",
                      provenance={"catalog_sha256": "0" * 64}, progress=False)
    out = tmp_path / "recs.jsonl"
    with pytest.raises(CatalogMismatchError, match="foreign.gguf was trained for catalog 000000000000"):
        run(foreign, tiny_db, out)
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_bytes(b"GGUF but not really")
    with pytest.raises(CorruptModelError):
        run(not_a_model, tiny_db, out)
    assert not out.exists()


def test_ray_without_ray_installed_is_one_clear_error(tiny_model, tiny_db, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were not installed
    with pytest.raises(UsageError, match=r"--ray needs Ray: pip install 'genrec-edge\[cluster\]'"):
        run(tiny_model, tiny_db, tmp_path / "recs.jsonl", ray=True)


def test_workers_write_the_bytes_one_process_writes(tiny_model, tiny_db, tmp_path):
    """--workers 2: two spawned processes rank groups at once; the lines and their order are those of one
    process, a resume continues either's file, and a user with nothing left still gets its error line."""
    with HistoryDB.open(tiny_db) as db:
        for n, item_id in enumerate(TINY_TITLES):
            db.add_interaction(42, item_id, timestamp=2_000_000_000 + n, rating=3.0)
    users = [1, 2, 42, 4, 5, 6, 7, 8, 3]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run(tiny_model, tiny_db, one, users=users, batch=2)
    report = run(tiny_model, tiny_db, two, users=users, batch=2, workers=2)
    assert (report.written, report.errors) == (len(users), 1)
    assert two.read_bytes() == one.read_bytes()
    lines = one.read_bytes().split(b"\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:7])  # users 1, 2, 42, then a crash
    again = run(tiny_model, tiny_db, cut, users=users, batch=2, workers=2)
    assert (again.resumed, again.written) == (3, 6) and cut.read_bytes() == one.read_bytes()
    with pytest.raises(UsageError, match="--workers takes a number of processes"):
        run(tiny_model, tiny_db, tmp_path / "x.jsonl", workers=0)
    with pytest.raises(UsageError, match="--actors says how many"):
        run(tiny_model, tiny_db, tmp_path / "x.jsonl", workers=2, ray=True)
    assert not (tmp_path / "x.jsonl").exists()


def test_no_more_worker_processes_than_groups(tiny_model, tiny_db, tmp_path, monkeypatch):
    # --workers 8 for one group started 8 processes, each loading the model, for one search.
    from genrec_edge import pool

    started = []
    real_open = pool.RecommenderPool.open
    monkeypatch.setattr(pool.RecommenderPool, "open",
                        classmethod(lambda cls, *a, **kw: started.append(kw["workers"]) or real_open(*a, **kw)))
    run(tiny_model, tiny_db, tmp_path / "one.jsonl", users=[1, 2], batch=2, workers=8)  # one group
    run(tiny_model, tiny_db, tmp_path / "three.jsonl", users=[1, 2, 3], batch=1, workers=8)  # three groups
    assert started == [3]


def test_cli_workers_is_for_batch_runs(tiny_model, tiny_db, capsys):
    assert main(["recommend", "--user", "1", "--workers", "2", "--model", str(tiny_model), "--db", str(tiny_db)]) == 2
    assert "--workers applies to batch runs" in capsys.readouterr().err


def test_cli_batch_runs_one_single_thread_process_per_core_by_default(tiny_model, tiny_db, tmp_path, capsys,
                                                                     two_core_pool_opens):
    """No --workers: as many processes as cores (here 2, whatever CI has), one thread each, and the bytes one
    process writes; --workers N or auto is checked before anything is written."""
    started = two_core_pool_opens
    base = ["recommend", "--all-users", "--model", str(tiny_model), "--db", str(tiny_db), "--k", "3"]
    one, auto = tmp_path / "one.jsonl", tmp_path / "auto.jsonl"
    assert main([*base, "--out", str(one), "--workers", "1"]) == 0, capsys.readouterr().err
    assert "processes" not in capsys.readouterr().out and started == []
    assert main([*base, "--out", str(auto)]) == 0, capsys.readouterr().err
    assert f"{len(TINY_HISTORIES)} users, {len(TINY_HISTORIES)} written by 2 processes in " in capsys.readouterr().out
    assert started == [(2, 1)]
    assert auto.read_bytes() == one.read_bytes()
    # --threads 2 on 2 cores: one process with both, as before.
    assert main([*base, "--out", str(tmp_path / "t.jsonl"), "--threads", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["processes"] == 1 and started == [(2, 1)]
    for bad in ("two", "0", "-1"):
        assert main([*base, "--out", str(tmp_path / "x.jsonl"), "--workers", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--workers takes a number of processes (1 or more) or auto, not {bad!r}"), err
        assert "\n" not in err
    assert not (tmp_path / "x.jsonl").exists()


def test_exclude_and_only_apply_to_every_user_as_in_one_request(tiny_model, tiny_db, tmp_path):
    """A batch run with filters writes, per user, what recommend(user, exclude=, only=) gives alone; a user
    they leave nothing for gets an error line; the header records them, so a resume must give the same."""
    unfiltered = single_requests(tiny_model, tiny_db, [1, 2, 4])
    exclude = [unfiltered[1].items[0].item_ids[0], unfiltered[2].items[1].item_ids[0]]
    only = sorted({i for u in (1, 2, 4) for r in unfiltered[u].items for i in r.item_ids} | set(TINY_HISTORIES[6]))
    users = [1, 6, 2, 4]
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, users=users, batch=3, exclude=exclude, only=only)
    records = read_records(out)
    with Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None) as rec:
        for user in users:
            try:
                expected = rec.recommend(user=user, k=K, exclude=exclude, only=only)
            except UsageError as exc:
                assert records[user] == {"user": user, "items": [], "error": str(exc)}
                continue
            got = records[user]["items"]
            assert [(r["title"], r["score"], r["lm_score"]) for r in got] == [
                (r.title, r.score, r.lm_score) for r in expected.items]
            ids = {i for r in got for i in r["item_ids"]}
            assert not ids & set(exclude) and ids <= set(only)
    assert any(records[u]["items"] != [] for u in users)
    # The filters changed the answers: user 1 lost its first title.
    assert records[1]["items"][0]["title"] != unfiltered[1].items[0].title
    header = json.loads(out.read_text(encoding="utf-8").splitlines()[0])["config"]
    assert header["exclude"] == sorted(exclude) and header["only"] == only
    assert run(tiny_model, tiny_db, out, users=users, exclude=exclude[::-1], only=only).resumed == len(users)
    with pytest.raises(UsageError, match=r"\(exclude differ\)"):
        run(tiny_model, tiny_db, out, users=users, exclude=exclude[:1], only=only)
    with pytest.raises(UsageError, match=r"\(exclude, only differ\)"):
        run(tiny_model, tiny_db, out, users=users)
    assert report.errors == sum(1 for u in users if "error" in records[u])
    two = tmp_path / "two.jsonl"  # two processes: the filters reach each worker's requests
    run(tiny_model, tiny_db, two, users=users, batch=3, exclude=exclude, only=only, workers=2)
    assert two.read_bytes() == out.read_bytes()


def test_a_user_the_filters_leave_nothing_gets_an_error_line(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, users=[1, 6, 2], batch=3, only=TINY_HISTORIES[6])  # 6 saw them all
    records = read_records(out)
    assert report.errors == 1 and records[6]["items"] == []
    assert "nothing left to recommend" in records[6]["error"] and "outside only" in records[6]["error"]
    for user in (1, 2):
        assert [r["item_ids"] for r in records[user]["items"]] == [[i] for i in TINY_HISTORIES[6]]


def test_bad_filters_are_refused_before_the_file_is_touched(tiny_model, tiny_db, tmp_path):
    out = tmp_path / "recs.jsonl"
    with pytest.raises(NotFoundError, match="unknown item 999 in exclude"):
        run(tiny_model, tiny_db, out, users=[1], exclude=[10, 999])
    with pytest.raises(NotFoundError, match="unknown item 998 in only"):
        run(tiny_model, tiny_db, out, users=[1], only=[998])
    with pytest.raises(UsageError, match="only lists no item"):
        run(tiny_model, tiny_db, out, users=[1], only=[])
    with pytest.raises(UsageError, match="leave no item to recommend, for any user"):
        run(tiny_model, tiny_db, out, users=[1], exclude=[10, 20], only=[20, 10])
    with pytest.raises(UsageError, match="exclude is a list of item ids"):
        run(tiny_model, tiny_db, out, users=[1], exclude="10")
    assert not out.exists()


def test_cli_batch_with_filter_files(tiny_model, tiny_db, tmp_path, capsys):
    stock = tmp_path / "stock.txt"
    stock.write_text("# in stock\n" + "\n".join(str(i) for i in TINY_TITLES if i not in (10, 20)) + "\n",
                     encoding="utf-8")
    out = tmp_path / "recs.jsonl"
    args = ["recommend", "--all-users", "--out", str(out), "--model", str(tiny_model), "--db", str(tiny_db),
            "--k", "3", "--threads", "2", "--only-file", str(stock), "--exclude", "30"]
    assert main(args) == 0, capsys.readouterr().err
    assert f"{len(TINY_HISTORIES)} users" in capsys.readouterr().out
    records = read_records(out)
    assert sorted(records) == sorted(TINY_HISTORIES)
    shown = {i for r in records.values() for item in r["items"] for i in item["item_ids"]}
    assert shown and not shown & {10, 20, 30}
    assert main([*args[:-2]]) == 2  # without the --exclude it was written with: refused, one line
    assert "(exclude differ)" in capsys.readouterr().err
    # An id of the file outside the catalog: refused with the file and its line, the output untouched.
    before = out.read_bytes()
    stock.write_text("10\n\n999\n", encoding="utf-8")
    assert main([*args, "--out", str(tmp_path / "other.jsonl")]) == NotFoundError.exit_code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: unknown item 999 in only: not in the catalog ({stock}:3)")
    assert out.read_bytes() == before and not (tmp_path / "other.jsonl").exists()


def test_combine_filters():
    from genrec_edge.batch import UserFilters, combine_filters

    assert combine_filters((3, 1), None, None) == ((3, 1), None)
    assert combine_filters((3,), (1, 2, 5), UserFilters((1, 4))) == ((1, 3, 4), (1, 2, 5))
    assert combine_filters((), None, UserFilters((), (7, 8))) == ((), (7, 8))
    assert combine_filters((), (1, 2, 5), UserFilters((), (2, 5, 9))) == ((), (2, 5))  # what both allow
    assert combine_filters((), (1,), UserFilters((), (2,))) == ((), ())  # nothing: that user's error line


def test_each_user_gets_its_own_filters_on_top_of_the_runs(tiny_model, tiny_db, tmp_path):
    """A users file's JSON lines (``user_filters``): each user's line equals recommend(user, exclude=, only=)
    with the run's filters and its own combined; the header records them; a user whose own leave nothing
    gets its error line; another file's filters refuse to resume."""
    from genrec_edge.batch import read_users_file

    users_file = tmp_path / "users.txt"
    users_file.write_text(
        "4\n"
        '{"user": 1, "exclude": [90, 100]}  # shown last week\n'
        '{"user": 2, "only": [10, 20, 30, 40, 90]}\n'
        '{"user": 6, "only": [90]}\n'  # 6 has seen 90: nothing left
        '{"user": 1, "exclude": [100, 90]}\n', encoding="utf-8")  # the same user and filters again: fine
    users, own = read_users_file(users_file)
    assert users == [4, 1, 2, 6] and set(own) == {1, 2, 6} and own[1].exclude == (90, 100)
    out = tmp_path / "recs.jsonl"
    report = run(tiny_model, tiny_db, out, users=users, batch=2, exclude=[30], user_filters=own)
    records = read_records(out)
    assert report.errors == 1 and "nothing left" in records[6]["error"]
    with Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None) as rec:
        for user, exclude, only in ((4, [30], None), (1, [30, 90, 100], None), (2, [30], [10, 20, 30, 40, 90])):
            expected = rec.recommend(user=user, k=K, exclude=exclude, only=only)
            assert [(r["title"], r["score"]) for r in records[user]["items"]] == [
                (r.title, r.score) for r in expected.items]
    assert {i for r in records[1]["items"] for i in r["item_ids"]}.isdisjoint({30, 90, 100})
    assert {i for r in records[2]["items"] for i in r["item_ids"]} <= {10, 20, 40, 90}
    cli = tmp_path / "cli.jsonl"  # the CLI reads the same file into the same run
    assert main(["recommend", "--users-file", str(users_file), "--out", str(cli), "--model", str(tiny_model),
                 "--db", str(tiny_db), "--k", str(K), "--threads", "2", "--exclude", "30"]) == 0
    assert cli.read_bytes() == out.read_bytes()
    assert "user_filters_sha256" in json.loads(out.read_text(encoding="utf-8").splitlines()[0])["config"]
    assert run(tiny_model, tiny_db, out, users=users, exclude=[30], user_filters=own).resumed == 4
    with pytest.raises(UsageError, match=r"\(user_filters_sha256 differ\)"):
        run(tiny_model, tiny_db, out, users=users, exclude=[30], user_filters={1: {"exclude": [90]}})
    two = tmp_path / "two.jsonl"  # the same lines from two processes
    run(tiny_model, tiny_db, two, users=users, batch=2, exclude=[30], user_filters=own, workers=2)
    assert two.read_bytes() == out.read_bytes()


def test_bad_user_filters(tiny_model, tiny_db, tmp_path):
    from genrec_edge.batch import read_users_file

    users_file = tmp_path / "users.txt"
    for line, says in (('{"user": 1, "exclude": [1.5]}', "exclude is a list of item ids"),
                       ('{"user": 1, "excluded": [10]}', "a user line is an id or"),
                       ('{"user": true}', "not a user id: True"),
                       ('{"user": 1, "only": 10}', "only is a list of item ids"),
                       ('{"user": 1, "only": [99999999999999999999]}', "out of range"),
                       ('{"user": 1,', "not a user id or a JSON object"),
                       ('[1]', "not a user id: '[1]'"),
                       ('{"user": 2, "user": 3}', "'user' is given twice"),  # json.loads kept the 3
                       ('{"user": 2, "exclude": [1], "exclude": [2]}', "'exclude' is given twice"),
                       ('{"user": ' + "9" * 5000 + "}", "not a user id or a JSON object of ids"),  # was exit 70
                       ('{"user": 2, "exclude": ' + "[" * 100_000 + "}", "not a user id or a JSON object of ids"),
                       ("9" * 5000, "user id 99999999999999999999... (5000 digits) is out of range")):
        users_file.write_text(f"4\n{line}\n", encoding="utf-8")
        with pytest.raises(IngestError, match=re.escape(f"{users_file}:2: ") + ".*" + re.escape(says)):
            read_users_file(users_file)
    users_file.write_text("2\x0c\n{bad}\n", encoding="utf-8")  # a form feed is no line break: line 2, not 3
    with pytest.raises(IngestError, match=":2: not a user id or a JSON object"):
        read_users_file(users_file)
    users_file.write_text('{"user": 1, "exclude": [10]}\n1\n', encoding="utf-8")
    with pytest.raises(IngestError, match=":2: user 1 is listed before with other filters"):
        read_users_file(users_file)
    out = tmp_path / "recs.jsonl"
    with pytest.raises(NotFoundError, match=r"unknown item 999 in only: not in the catalog \(user 2's filters\)"):
        run(tiny_model, tiny_db, out, users=[1, 2], user_filters={2: {"only": [10, 999]}})
    with pytest.raises(UsageError, match="filters given for user 3, who is not among"):
        run(tiny_model, tiny_db, out, users=[1, 2], user_filters={3: {"exclude": [10]}})
    with pytest.raises(UsageError, match="a user's filters are"):
        run(tiny_model, tiny_db, out, users=[1], user_filters={1: [10]})
    assert not out.exists()
    run(tiny_model, tiny_db, out, users=[1], user_filters={1: {"exclude": [], "only": None}})
    assert "user_filters_sha256" not in json.loads(out.read_text(encoding="utf-8").splitlines()[0])["config"]  # no filters, as a users file's {"user": 1} has none
