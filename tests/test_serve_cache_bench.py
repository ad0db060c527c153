"""bench.serve_cache on the tiny model: a real `genrec-edge serve --cache` asked again over HTTP, and its report."""

from __future__ import annotations

import json

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.serve_cache import main, render, summarize


def test_summary_counts_repeats_that_match_the_first_answer():
    a = [{"s": 1.0, "cached": False, "items": [1]}, {"s": 0.01, "cached": True, "items": [1]},
         {"s": 0.03, "cached": True, "items": [2]}]  # a changed answer does not count
    b = [{"s": 3.0, "cached": False, "items": [5]}, {"s": 0.02, "cached": False, "items": [5]}]  # nor a search
    s = summarize({"1": a, "2": b})
    assert (s["first_p50_s"], s["repeat_p50_s"], s["repeats"], s["repeats_same"]) == (2.0, 0.02, 3, 1)
    assert s["ratio"] == pytest.approx(0.01) and s["first_cached"] == 0


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path):
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "2", "--repeats", "2",
                 "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("serve-cache-*.json"))
    summ = json.loads(saved.read_text())["summary"]
    assert (summ["users"], summ["repeats"], summ["repeats_same"], summ["first_cached"]) == (2, 4, 4, 0)
    assert "**4/4**" in saved.with_suffix(".md").read_text() and saved.with_suffix(".png").stat().st_size > 0
    assert_rerender_reproduces(main, render, saved, tmp_path)


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    argvs = (["--render", str(tmp_path / "missing.json")], ["--cache", "0"], ["--repeats", "0"])
    assert "no such saved run" in usage_errors(main, argvs, capsys)
