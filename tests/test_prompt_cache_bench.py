"""bench.prompt_cache on the tiny model: a page of shelves with and without kept prompts, and its report."""

from __future__ import annotations

import json

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.prompt_cache import ASKS, main, render, summarize


def test_summary_ratios_are_of_the_same_users_pages():
    times = {"plain": {"for you": [1.0, 2.0], "shelf": [1.0, 2.0], "show more": [2.0, 4.0]},
             "kept": {"for you": [1.0, 2.0], "shelf": [0.5, 1.0], "show more": [1.5, 3.0]}}
    s = summarize(times, same=5, total=6)
    assert s["p50_s"]["kept"]["shelf"] == 0.75 and s["page_p50_s"] == {"plain": 6.0, "kept": 4.5}
    assert s["page_ratio"] == pytest.approx(0.75) and s["follow_up_ratio"] == pytest.approx(3.0 / 4.5)
    assert (s["faster_pages"], s["users"], s["same"], s["answers"]) == (2, 2, 5, 6)


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path):
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "3", "--threads", "2",
                 "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("prompt-cache-*.json"))
    data = json.loads(saved.read_text())
    summ = data["summary"]
    assert (summ["users"], summ["answers"], summ["same"]) == (3, 9, 9)
    assert data["meta"]["prompt_hits"] == 3 * (len(ASKS) - 1)  # every ask after a user's first
    assert all(len(data["prefill_ms"][layout][ask]) == 3 for layout in ("plain", "kept") for ask in ASKS)
    assert "prefill p50 ms" in saved.with_suffix(".md").read_text()
    assert "**9/9**" in saved.with_suffix(".md").read_text() and saved.with_suffix(".png").stat().st_size > 0
    assert_rerender_reproduces(main, render, saved, tmp_path)


def test_bad_arguments_are_one_usage_line(tiny_db, tmp_path, capsys):
    argvs = (["--render", str(tmp_path / "missing.json")], ["--users", "0"], ["--prompt-cache", "0"],
             ["--db", str(tiny_db), "--genre", "Western"])
    err = usage_errors(main, argvs, capsys)
    assert "no such saved run" in err and "no item has it" in err
