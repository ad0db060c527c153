"""`genrec-edge evaluate` end to end: the tiny LLaMA through real llama.cpp, a saved SASRec and popularity on a
real SQLite database; intervals, paired differences, slices, the resumable JSONL log, and bad input."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from conftest import cli_help_in_a_fresh_process

from genrec_edge.baselines import popularity, split_examples
from genrec_edge.cli import main
from genrec_edge.evalruns import (
    ResultLog,
    Run,
    data_fingerprint,
    llm_run,
    run_unlogged,
)
from genrec_edge.evaluation import (
    evaluate,
    evaluate_scores,
    history_length_slices,
    target_popularity_slices,
)
from genrec_edge.history import HistoryDB
from genrec_edge.prompts import Example
from genrec_edge.recommend import Recommender

N_TEST_USERS = 7  # tiny database: users 1-5, 7, 8 have a test example (user 6 has one item)


@pytest.fixture(scope="module")
def db(tiny_movielens_dir, tmp_path_factory):
    from genrec_edge.ingest import ingest

    path = tmp_path_factory.mktemp("evaluate") / "tiny.db"
    ingest(path, "movielens-csv", tiny_movielens_dir, progress=False)
    return path


@pytest.fixture(scope="module")
def sasrec_dir(db, tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec") / "model"
    rc = main(["baseline", "sasrec", "--db", str(db), "--epochs", "2", "--eval-every", "1", "--hidden", "16",
               "--max-len", "8", "--save", str(out), "--json"])
    assert rc == 0
    return out


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run_json(capsys, *args) -> dict:
    rc = main(["evaluate", *args, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def read(db_path):
    with HistoryDB.open(db_path, readonly=True) as database:
        return list(database.sequences()), database.catalog()


def comparable(report: dict) -> dict:
    """A report without what legitimately differs between a resumed and an uninterrupted run."""
    out = {k: v for k, v in report.items() if k not in ("seconds", "results_file")}
    out["recommenders"] = {n: {k: v for k, v in r.items() if k != "resumed"} for n, r in report["recommenders"].items()}
    return out


def test_three_recommenders_with_intervals_differences_and_slices(db, tiny_model, sasrec_dir, tmp_path, capsys):
    log = tmp_path / "results.jsonl"
    report = run_json(capsys, "--db", str(db), "--model", str(tiny_model), "--sasrec", str(sasrec_dir), "--pop",
                      "--out", str(log), "--by", "popularity,history", "--threads", "2")
    names = list(report["recommenders"])
    assert names == ["LLM model-F32", "SASRec", "popularity"]
    assert report["n_users"] == N_TEST_USERS and report["split"] == "test"
    # The LLM returns 10 titles: every recommender's MRR is MRR@10, so that the three compare alike.
    assert report["metrics"] == ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@10"]
    for name in names:
        for metric, est in report["recommenders"][name]["metrics"].items():
            assert est["low"] <= est["mean"] <= est["high"], (name, metric)

    # The LLM's numbers are the protocol's per-user path over the Recommender's own rankings.
    sequences, catalog = read(db)
    examples = split_examples(sequences, "test")
    with Recommender.open(tiny_model, db, threads=2, warn=lambda m: None) as rec:
        def rank_fn(ex):
            history = [catalog.title_of(i) for i in ex.history]
            return [catalog.title_to_items[t][0] for t in rec.rank_titles(history, set(history), 10).titles]

        direct = evaluate(rank_fn, examples, catalog, k_max=10, progress=False)
    llm = report["recommenders"]["LLM model-F32"]["metrics"]
    assert llm["HR@10"]["mean"] == pytest.approx(direct.hr[10], abs=1e-12)
    assert llm["NDCG@5"]["mean"] == pytest.approx(direct.ndcg[5], abs=1e-12)
    assert llm["MRR@10"]["mean"] == pytest.approx(direct.mrr, abs=1e-12)
    pop = evaluate_scores(popularity(sequences, catalog).scores, examples, catalog, k_max=10, progress=False)
    assert report["recommenders"]["popularity"]["metrics"]["MRR@10"]["mean"] == pytest.approx(pop.mrr, abs=1e-12)

    pairs = [(d["a"], d["b"]) for d in report["differences"]]
    assert pairs == [("LLM model-F32", "SASRec"), ("LLM model-F32", "popularity"), ("SASRec", "popularity")]
    for d in report["differences"]:
        for metric, est in d["metrics"].items():
            a, b = report["recommenders"][d["a"]]["metrics"][metric], report["recommenders"][d["b"]]["metrics"][metric]
            assert est["mean"] == pytest.approx(a["mean"] - b["mean"], abs=1e-12)
            assert est["low"] <= est["mean"] <= est["high"]

    for slicing in ("popularity", "history"):
        groups = report["slices"][slicing]
        assert sum(g["users"] for g in groups.values()) == N_TEST_USERS
        for name in names:
            weighted = sum(g["users"] * g["recommenders"][name]["HR@10"]["mean"] for g in groups.values())
            assert weighted / N_TEST_USERS == pytest.approx(report["recommenders"][name]["metrics"]["HR@10"]["mean"])

    # The log: a header, one config line per recommender, one line per user per recommender.
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["format"] == "genrec-edge-eval-results"
    assert sum("config" in r for r in lines) == 3 and sum("user" in r for r in lines) == 3 * N_TEST_USERS
    assert all(r["resumed"] == 0 for r in report["recommenders"].values())

    # Run again: everything comes from the log, and the report is the same.
    again = run_json(capsys, "--db", str(db), "--model", str(tiny_model), "--sasrec", str(sasrec_dir), "--pop",
                     "--out", str(log), "--by", "popularity,history")
    assert all(r["resumed"] == N_TEST_USERS for r in again["recommenders"].values())
    assert comparable(again) == comparable(report)
    assert len(log.read_text(encoding="utf-8").splitlines()) == len(lines)


def test_resume_from_a_file_cut_short_equals_an_uninterrupted_run(db, tiny_model, tmp_path, capsys):
    full_log, cut_log = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    args = ["--db", str(db), "--model", str(tiny_model), "--pop", "--by", "history"]
    full = run_json(capsys, *args, "--out", str(full_log))
    lines = full_log.read_bytes().splitlines(keepends=True)
    # Header, the LLM's config line and 3 of its users, then a crash in the middle of the 4th line.
    cut_log.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    resumed = run_json(capsys, *args, "--out", str(cut_log))
    assert resumed["recommenders"]["LLM model-F32"]["resumed"] == 3
    assert comparable(resumed) == comparable(full)
    records = [json.loads(line) for line in cut_log.read_text(encoding="utf-8").splitlines()]
    users = [(r["run"], r["user"]) for r in records if "user" in r]
    assert len(users) == len(set(users)) == 2 * N_TEST_USERS  # the cut line was dropped, nobody twice


def test_a_crash_midway_resumes_with_the_remaining_users_only(db, tiny_model, tmp_path):
    sequences, catalog = read(db)
    examples = split_examples(sequences, "test")
    base = {"split": "test", "data_sha256": data_fingerprint(sequences)}
    log = ResultLog(tmp_path / "log.jsonl")
    asked: list[int] = []
    with Recommender.open(tiny_model, db, threads=2, warn=lambda m: None) as rec:
        run = llm_run(rec, catalog, base, k=10, prior=None, beam=None)
        uninterrupted = run_unlogged(run, examples, progress=False)

        def crashing(todo):
            for i, chunk in enumerate(run.produce(todo)):
                if i == 3:
                    raise KeyboardInterrupt  # what Ctrl-C or a kill does between two users
                yield chunk

        def counting(todo):
            asked.extend(ex.user for ex in todo)
            yield from run.produce(todo)

        with pytest.raises(KeyboardInterrupt):
            log.run(Run(run.name, run.config, crashing, run.top_k), examples, progress=False)
        assert len(log.read()[run.key]) == 3
        results, reused = log.run(Run(run.name, run.config, counting, run.top_k), examples, progress=False)
    assert reused == 3 and asked == [ex.user for ex in examples[3:]]
    assert results == uninterrupted
    assert [r.user for r in results] == [ex.user for ex in examples]


def test_users_sample_split_and_default_log(db, tmp_path, home, capsys):
    three = run_json(capsys, "--db", str(db), "--pop", "--users", "3", "--seed", "1")
    sequences, _ = read(db)
    test_users = sorted(ex.user for ex in split_examples(sequences, "test"))
    assert three["users"] == sorted(random.Random(1).sample(test_users, 3)) and three["n_users"] == 3
    assert run_json(capsys, "--db", str(db), "--pop", "--users", "3", "--seed", "1")["users"] == three["users"]
    assert (home / "cache" / "evaluate" / "results.jsonl").is_file()  # the default --out
    valid = run_json(capsys, "--db", str(db), "--pop", "--split", "valid", "--users", "all")
    assert valid["split"] == "valid" and valid["n_users"] == len(split_examples(sequences, "valid"))
    assert valid["metrics"][-1] == "MRR"  # no top-k recommender: the full MRR
    assert valid["differences"] == [] and valid["slices"] == {}
    rc = main(["evaluate", "--db", str(db), "--pop", "--users", "3"])  # the table
    out = capsys.readouterr().out
    assert rc == 0 and "popularity" in out and "HR@10" in out and "[" in out
    assert "note: 3 users is a small sample" in " ".join(out.split())  # quality on a few users is noise: said


def test_llm_options_need_a_model_and_k_covers_hr_at_10(db, capsys):
    # Without --model they would be ignored; with k < 10 the table's HR@10 would be HR@k under another name.
    for extra, message in ((["--k", "20"], "--k applies to --model"),
                           (["--beam", "3", "--batch", "2", "--workers", "2"], "--beam, --batch, --workers apply"),
                           (["--ray", "local"], "--ray applies to --model")):
        assert main(["evaluate", "--db", str(db), "--pop", "--users", "2", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--db", str(db), "--model", "default", "--k", "5"]) == 2
    assert "greater than or equal to 10" in capsys.readouterr().err


def test_small_sample_note_only_below_its_threshold(db, capsys, monkeypatch):
    from genrec_edge import stats

    monkeypatch.setattr(stats, "SMALL_SAMPLE", 3)
    assert main(["evaluate", "--db", str(db), "--pop", "--users", "3"]) == 0
    assert "small sample" not in capsys.readouterr().out
    assert main(["evaluate", "--db", str(db), "--pop", "--users", "2"]) == 0
    assert "note: 2 users is a small sample" in " ".join(capsys.readouterr().out.split())


def test_each_prior_is_a_run_of_its_own(db, tiny_model, capsys):
    """--prior none --prior pop: the model twice, as two runs on the same users, with paired differences."""
    rc = main(["evaluate", "--db", str(db), "--model", str(tiny_model), "--prior", "none", "--prior", "pop",
               "--users", "3", "--batch", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    runs = report["recommenders"]
    assert set(runs) == {"LLM model-F32", "LLM model-F32 +pop"}
    assert runs["LLM model-F32"]["config"]["prior"] == "none" and runs["LLM model-F32 +pop"]["config"]["prior"] == "pop"
    # A pop prior counted from the database is in no file the config hashes: how it is searched is named, so
    # results logged when it searched with another variant ('sum') are not reused for it.
    assert runs["LLM model-F32 +pop"]["config"]["prior_counted"] == {"kind": "pop", "variant": "max"}
    assert "prior_counted" not in runs["LLM model-F32"]["config"]
    assert len(report["differences"]) == 1
    rc = main(["evaluate", "--db", str(db), "--pop", "--prior", "pop"])
    assert rc == 2 and "apply to --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([], 2, "nothing to evaluate"),
        (["--pop", "--users", "0"], 2, "--users"),
        (["--pop", "--users", "many"], 2, "--users"),
        (["--pop", "--split", "train"], 2, "unknown split"),
        (["--pop", "--by", "genre"], 2, "unknown --by"),
        (["--prior", "pop", "--pop"], 2, "--prior"),
        (["--model", "x.gguf", "--prior", "magic"], 2, "--prior"),
        (["--sasrec", "/nonexistent/sasrec"], 4, "not a saved SASRec"),
        (["--model", "/nonexistent/model.gguf"], 4, "model file not found"),
    ],
)
def test_bad_input_is_one_line(db, capsys, args, code, message):
    rc = main(["evaluate", "--db", str(db), *args])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_log_that_is_not_ours_or_is_damaged_is_left_untouched(db, tmp_path, capsys):
    assert main(["evaluate", "--db", str(tmp_path / "missing.db"), "--pop"]) == 3
    capsys.readouterr()
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\nline two", encoding="utf-8")
    rc = main(["evaluate", "--db", str(db), "--pop", "--out", str(foreign)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a genrec-edge results log" in err
    assert foreign.read_text(encoding="utf-8") == "my notes\nline two"

    log = tmp_path / "log.jsonl"
    assert main(["evaluate", "--db", str(db), "--pop", "--out", str(log), "--json"]) == 0
    capsys.readouterr()
    lines = log.read_bytes().splitlines(keepends=True)
    damaged = b"".join(lines[:3]) + b"{not json\n" + b"".join(lines[3:])
    log.write_bytes(damaged)
    rc = main(["evaluate", "--db", str(db), "--pop", "--out", str(log)])
    err = capsys.readouterr().err
    assert rc == 6 and f"{log}:4" in err and len(err.strip().splitlines()) == 1
    assert log.read_bytes() == damaged


def test_slices_by_hand():
    from genrec_edge.catalog import Catalog

    catalog = Catalog.from_pairs([(i, f"T{i}") for i in range(1, 8)])
    # Training part of the test split (all but each user's last item): T1 x5, T2 x3, T3 x1, T4 x1 (10 in all).
    sequences = [
        (1, [1, 2, 3, 5]),
        (2, [1, 2, 4, 6]),
        (3, [1, 2, 1, 7]),
        (4, [1, 1, 5]),
    ]
    counts = popularity(sequences, catalog).counts
    assert [counts[f"T{i}"] for i in range(1, 8)] == [6, 3, 1, 1, 0, 0, 0]
    examples = split_examples(sequences, "test")
    # Sorted counts 6, 3, 1, 1 of 11: T1 alone reaches 6/11 >= 50% -> head is count >= 6; 80% is reached
    # at T2 (9/11) -> torso is count >= 3; the rest (counts 1 and 0) is tail. Targets: T5, T6, T7, T5.
    assert target_popularity_slices(sequences, catalog, "test", examples) == ["tail"] * 4
    probes = [Example(9, (2,), 1), Example(10, (1,), 2), Example(11, (1,), 3), Example(12, (1,), 7)]
    assert target_popularity_slices(sequences, catalog, "test", probes) == ["head", "torso", "tail", "tail"]
    assert history_length_slices(examples) == ["1-5"] * 4
    lengths = [1, 5, 6, 20, 21, 200, 201]
    fake = [Example(u, tuple(range(n)), 0) for u, n in enumerate(lengths)]
    assert history_length_slices(fake) == ["1-5", "1-5", "6-20", "6-20", "21-50", "101-200", ">200"]


def test_help_imports_neither_torch_nor_scipy():
    out, imported = cli_help_in_a_fresh_process([["--help"], ["evaluate", "--help"], ["baseline", "pop", "--help"]],
                                                {"torch", "scipy", "llama_cpp"})
    assert "Example: genrec-edge evaluate" in out
    assert imported == []


def test_workers_write_the_log_one_process_writes(db, tiny_model, tmp_path, capsys):
    """--workers 2: the LLM's searches in two spawned processes; the same report and the same log bytes
    (the results are written in the users' order, as one process writes them)."""
    one_log, two_log = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--db", str(db), "--model", str(tiny_model), "--batch", "2"]
    one = run_json(capsys, *args, "--out", str(one_log), "--workers", "1")
    two = run_json(capsys, *args, "--out", str(two_log), "--workers", "2")
    assert comparable(two) == comparable(one)
    assert two_log.read_bytes() == one_log.read_bytes()
    assert main(["evaluate", *args, "--workers", "2", "--ray", "local"]) == 2
    assert "--workers is for runs here" in capsys.readouterr().err
    assert main(["evaluate", *args, "--workers", "many"]) == 2
    assert "--workers takes a number of processes (1 or more) or auto, not 'many'" in capsys.readouterr().err


def test_the_llm_runs_one_single_thread_process_per_core_by_default(db, tiny_model, tmp_path, capsys,
                                                                    two_core_pool_opens):
    """No --workers: one process per core (here 2, whatever CI has) with one thread each, as many as there are
    groups of --batch users at most; the same log bytes as one process."""
    started = two_core_pool_opens
    one_log, auto_log = tmp_path / "one.jsonl", tmp_path / "auto.jsonl"
    args = ["--db", str(db), "--model", str(tiny_model), "--batch", "2"]
    one = run_json(capsys, *args, "--out", str(one_log), "--workers", "1")
    assert started == []
    auto = run_json(capsys, *args, "--out", str(auto_log))
    assert started == [(2, 1)]
    assert comparable(auto) == comparable(one) and auto_log.read_bytes() == one_log.read_bytes()
    users = len(one["users"])
    assert users > 2  # else the next check would not tell a cap from the default
    run_json(capsys, *args[:-1], str(users), "--out", str(tmp_path / "all-in-one.jsonl"))  # one group of every user
    assert started == [(2, 1)]  # one group: one process, in this one
    # A rerun counts only the users the log lacks: all there, no process is started; one group left, one process;
    # two groups, two. The resumed logs end as they would have.
    lines = one_log.read_bytes().splitlines(keepends=True)
    for dropped, pools in ((0, []), (1, []), (3, [(2, 1)])):
        auto_log.write_bytes(b"".join(lines[:len(lines) - dropped]))
        again = run_json(capsys, *args, "--out", str(auto_log))
        assert started == [(2, 1), *pools], dropped
        assert [r["resumed"] for r in again["recommenders"].values()] == [users - dropped]
        assert comparable(again) == comparable(one) and auto_log.read_bytes() == one_log.read_bytes()


def test_tables_piped_to_a_file_keep_every_column(db, sasrec_dir, capsys, monkeypatch):
    # rich draws 80 columns where stdout is not a terminal: with three recommenders the metric names were
    # squeezed out and the paired differences cut short ("…") in logs and pipes.
    monkeypatch.delenv("COLUMNS", raising=False)
    rc = main(["evaluate", "--db", str(db), "--pop", "--sasrec", str(sasrec_dir), "--sasrec", str(sasrec_dir),
               "--users", "all", "--by", "history"])
    out = capsys.readouterr().out
    assert rc == 0
    for metric in ("HR@1", "HR@5", "NDCG@5", "NDCG@10", "MRR"):
        assert any(line.strip().startswith(metric) for line in out.splitlines()), out
    assert "…" not in out, out


def test_runs_of_the_same_name_are_numbered(db, sasrec_dir, capsys):
    """A third SASRec was named 'SASRec #2 #2'."""
    rc = main(["evaluate", "--db", str(db), *["--sasrec", str(sasrec_dir)] * 3, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert list(json.loads(captured.out)["recommenders"]) == ["SASRec", "SASRec #2", "SASRec #3"]


def test_the_log_records_the_llama_cpp_build_and_a_resume_by_another_build_warns(db, tiny_model, tmp_path):
    """Builds for other instruction sets round differently (docs/FINDINGS.md): a log says which build wrote it, and
    reusing its results under another build is said in one warning (another build simulated by its origin)."""
    import dataclasses

    from genrec_edge.engine import build_identity

    sequences, catalog = read(db)
    examples = split_examples(sequences, "test")
    base = {"split": "test", "data_sha256": data_fingerprint(sequences)}
    log, heard = ResultLog(tmp_path / "log.jsonl"), []
    with Recommender.open(tiny_model, db, threads=2, warn=lambda m: None) as rec:
        run = llm_run(rec, catalog, base, k=10, prior=None, beam=None)
        assert run.origin == build_identity() and run.origin.startswith("llama-cpp-python ")
        log.run(run, examples[:2], progress=False, warn=heard.append)
        config_line = json.loads(log.path.read_text(encoding="utf-8").splitlines()[1])
        assert config_line["origin"] == run.origin and "origin" not in config_line["config"]  # not in the key
        log.run(run, examples[:3], progress=False, warn=heard.append)
        assert heard == []  # the same build resumes silently
        other = dataclasses.replace(run, origin="llama-cpp-python 0.0.0; CPU : AVX2 = 1 |")
        results, reused = log.run(other, examples[:3], progress=False, warn=heard.append)
        assert reused == 3 and len(heard) == 1
        assert "another llama.cpp build" in heard[0] and "AVX2 = 1" in heard[0] and "give another --out" in heard[0]
        # A log written without an origin (a Ray run's, or an older one's) cannot tell: nothing is said
        quiet = ResultLog(tmp_path / "ray.jsonl")
        quiet.run(dataclasses.replace(run, origin=None), examples[:2], progress=False, warn=heard.append)
        quiet.run(run, examples[:3], progress=False, warn=heard.append)
    assert len(heard) == 1
