"""bench.serve_workers on the tiny model: real `genrec-edge serve` processes asked over HTTP, and its report."""

from __future__ import annotations

import json

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.serve_workers import main, parse_workers, render, summarize


def test_worker_counts_parse_and_bad_ones_are_refused():
    assert parse_workers("1, 2") == [1, 2] and parse_workers("0,1,2") == [0, 1, 2]
    for bad in ("2", "1,1", "0,0", "1,a", "1,-2", "1,2.5"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def _layout(seconds, lone_s, latencies, answers):
    return {"seconds": seconds, "lone_s": lone_s, "latencies": latencies, "answers": answers,
            "lone_answers": {"9": {"titles": ["C"], "scores": [-3.0]}}}


def test_summary_pairs_each_rep_and_counts_agreeing_answers():
    same = {"1": {"titles": ["A"], "scores": [-1.0]}, "2": {"titles": ["B"], "scores": [-2.0]}}
    close = {"1": {"titles": ["A"], "scores": [-1.00001]}, "2": {"titles": ["B"], "scores": [-2.0]}}
    moved = {"1": {"titles": ["A"], "scores": [-1.0]}, "2": {"titles": ["D"], "scores": [-2.0]}}
    runs = [{"1": _layout(10.0, [2.0, 4.0], [1.0, 3.0], same), "2": _layout(8.0, [1.0, 2.0], [1.0, 1.0], close)},
            {"1": _layout(10.0, [2.0, 2.0], [1.0, 1.0], same), "2": _layout(5.0, [3.0, 3.0], [2.0, 2.0], moved)}]
    s = summarize(runs, ["1", "2"])
    two = s["layouts"]["2"]
    assert two["throughput_ratio"] == [1.25, 2.0] and two["throughput_ratio_median"] == 1.625
    assert two["users_per_s"] == [0.25, 0.4] and s["layouts"]["1"]["throughput_ratio"] == [1.0, 1.0]
    assert two["lone_p50_s"] == [1.5, 3.0] and two["lone_ratio"] == [0.5, 1.5] and two["busy_mean_s"] == [1.0, 2.0]
    # user 1 within 1e-4 everywhere, user 2's titles differ in rep 2, the lone user agrees
    assert (s["agreeing"], s["asked"]) == (2, 3)


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path):
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "2", "--lone", "2", "--clients", "2",
                 "--reps", "2", "--workers", "0,2", "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("serve-workers-*.json"))
    data = json.loads(saved.read_text())
    assert data["orders"] == [["0", "2"], ["2", "0"]]
    assert len(data["users"]) == 2 and len(data["lone_users"]) == 2 and not set(data["users"]) & set(data["lone_users"])
    for run in data["runs"]:
        for layout in run.values():
            assert sorted(layout["answers"]) == sorted(str(u) for u in data["users"])
            assert len(layout["lone_s"]) == 2 and all(s > 0 for s in layout["lone_s"] + layout["latencies"])
    summ = data["summary"]
    assert (summ["agreeing"], summ["asked"]) == (4, 4)  # the worker count changes no answer
    text = saved.with_suffix(".md").read_text()
    assert "**4/4** requests" in text and "workers 2 / workers 0" in text
    assert saved.with_suffix(".png").stat().st_size > 0
    assert_rerender_reproduces(main, render, saved, tmp_path)


def test_a_server_that_cannot_start_is_one_error_line(tiny_db, tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(missing), "--db", str(tiny_db), "--users", "2", "--lone", "1", "--reps", "1",
              "--out", str(tmp_path)])
    assert str(exc.value.code).startswith("error: --workers 0: the server did not start: error: ")
    assert "missing.gguf" in str(exc.value.code)
    assert not list(tmp_path.glob("serve-workers-*"))


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    err = usage_errors(main, (["--render", str(tmp_path / "missing.json")], ["--workers", "2"], ["--clients", "0"]),
                       capsys)
    assert "no such saved run" in err and "--workers: give at least two" in err and "at least 1" in err
