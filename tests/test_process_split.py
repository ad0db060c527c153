"""bench.process_split on the tiny model: real worker processes on real llama.cpp, and a report of what they did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.process_split import main, parse_layouts, render, summarize


def test_layouts_parse_and_bad_ones_are_refused():
    assert parse_layouts("1x2, 2x1") == [(1, 2, False, ""), (2, 1, False, "")]
    assert parse_layouts("before,1x4", cpus=4) == [(1, 4, True, ""), (1, 4, False, "")]  # same split, other runtime
    assert parse_layouts("before@old,1x2@new,1x2") == [(1, 2, True, "old"), (1, 2, False, "new"), (1, 2, False, "")]
    for bad in ("2", "1x2", "1x2,1x2", "0x1,1x1", "1x2,ax1", "1x-1,2x1", "before,before", "after,1x2", "1x2@a,1x2@a"):
        with pytest.raises(ValueError):
            parse_layouts(bad)


def _run(seconds, results):
    return {"seconds": seconds, "results": results}


def test_summary_pairs_each_rep_and_counts_identical_users():
    same = {"1": {"titles": ["A"], "scores": [-1.0]}, "2": {"titles": ["B"], "scores": [-2.0]}}
    moved = {"1": {"titles": ["A"], "scores": [-1.0]}, "2": {"titles": ["B"], "scores": [-2.0000001]}}
    runs = [{"1x2": _run(10.0, same), "2x1": _run(8.0, same)},
            {"1x2": _run(10.0, same), "2x1": _run(5.0, moved)}]
    s = summarize(runs, ["1x2", "2x1"])
    assert s["layouts"]["2x1"]["ratio"] == [1.25, 2.0] and s["layouts"]["1x2"]["ratio"] == [1.0, 1.0]
    assert s["layouts"]["2x1"]["ratio_median"] == 1.625 and s["layouts"]["2x1"]["users_per_s"][1] == 0.4
    assert s["identical_users"] == 1 and s["users"] == 2  # a score moved in the last bit counts as different
    swapped = {"1": {"titles": ["A"], "scores": [-1.0]}, "2": {"titles": ["C"], "scores": [-2.0]}}
    runs = [{"before": _run(20.0, moved), "1x2": _run(10.0, same)}, {"before": _run(20.0, swapped), "1x2": _run(8.0, same)}]
    s = summarize(runs, ["before", "1x2"])
    assert s["layouts"]["1x2"]["ratio"] == [2.0, 2.5] and s["identical_users"] == 2  # the old runtime held apart
    assert s["before_same_titles"] == 1 and 0 < s["before_max_score_diff"] < 1e-6  # user 2 changed title in rep 2


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path):
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "3", "--reps", "2",
                 "--layouts", "before,1x1,2x1", "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("process-split-*.json"))
    data = json.loads(saved.read_text())
    assert data["orders"] == [["before", "1x1", "2x1"], ["2x1", "1x1", "before"]]
    assert all(s > 0 for rep in data["seconds"] for s in rep.values())
    summ = data["summary"]
    # Neither the thread/process split nor the old runtime (no jump-forward, fixed threads) changes a result
    assert summ["users"] == 3 and summ["identical_users"] == 3 and summ["before_same_titles"] == 3
    assert summ["before_max_score_diff"] < 1e-4
    text = saved.with_suffix(".md").read_text()
    assert "**3/3** users" in text and "2x1 / before" in text and "`before` = the runtime before issue 14" in text
    assert saved.with_suffix(".png").stat().st_size > 0
    assert_rerender_reproduces(main, render, saved, tmp_path)  # --render redraws the same report


def test_a_layout_under_another_interpreter_runs_there_and_is_compared_apart(tiny_model, tiny_db, tmp_path):
    """LAYOUT@NAME runs in a child of --python NAME=PATH (here this interpreter again, so the same build): its
    results are held to the same titles (another build would round differently), one process reports a p50."""
    import sys

    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "3", "--reps", "2",
                 "--layouts", "1x1,before@again,1x1@again", "--python", f"again={sys.executable}",
                 "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("process-split-*.json"))
    summ = json.loads(saved.read_text())["summary"]
    assert summ["base"] == "1x1" and summ["identical_users"] == 3
    assert summ["others"]["1x1@again"] == {"same_titles": 3, "max_score_diff": 0.0}  # the same build: same bits
    assert summ["others"]["before@again"]["same_titles"] == 3
    assert all(len(summ["layouts"][lay]["p50_s"]) == 2 and summ["layouts"][lay]["p50_s"][0] > 0
               for lay in ("1x1", "before@again", "1x1@again"))
    text = saved.with_suffix(".md").read_text()
    assert f"again = `{sys.executable}`" in text and "1x1@again: one user's median time by rep" in text
    assert_rerender_reproduces(main, render, saved, tmp_path)


def test_a_worker_that_cannot_start_is_one_error_line(tiny_db, tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(missing), "--db", str(tiny_db), "--users", "2", "--reps", "1", "--layouts", "1x1,2x1",
              "--out", str(tmp_path)])
    assert str(exc.value.code).startswith("error: layout 1x1: ") and "missing.gguf" in str(exc.value.code)
    assert not list(tmp_path.glob("process-split-*"))


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    err = usage_errors(main, (["--render", str(tmp_path / "missing.json")], ["--layouts", "1x2"], ["--users", "0"],
                              ["--layouts", "1x1,1x1@x"], ["--layouts", "1x1,2x1", "--python", "x"]), capsys)
    assert "no such saved run" in err and "--layouts: give at least two" in err
    assert "no --python NAME=PATH for x" in err and "--python: give NAME=PATH" in err


def test_the_benches_refuse_a_missing_or_empty_database_in_one_line(tmp_path):
    import subprocess
    import sys

    from bench.runtime_bench import bench_users
    from genrec_edge.errors import UsageError
    from genrec_edge.history import HistoryDB

    missing = tmp_path / "missing.db"
    for bench in ("process_split", "attention_cost", "runtime_bench"):
        done = subprocess.run([sys.executable, "-m", f"bench.{bench}", "--db", str(missing), "--users", "2"],
                              capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
        assert (done.returncode, done.stderr.strip()) == (3, f"error: no database at {missing} (run `genrec-edge init`)")
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    HistoryDB.open(empty, create=True).close()
    with pytest.raises(UsageError, match="no user in .* has 5 or more rated items"):
        bench_users(empty, 2)
