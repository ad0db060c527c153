"""bench.serve_soak on the tiny model: a real `genrec-edge serve --workers 1` asked many times, its memory read."""

from __future__ import annotations

import json
import os

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.serve_soak import growth_per_100, main, proc_memory, render, summarize


def test_growth_is_the_slope_over_the_second_half():
    flat_then_rising = [(0, 100.0), (25, 300.0), (50, 300.0), (75, 301.0), (100, 302.0)]
    assert growth_per_100(flat_then_rising) == pytest.approx(4.0)  # warm-up (0 -> 25) left out
    assert growth_per_100([(0, 5.0), (10, 5.0), (20, 5.0)]) == pytest.approx(0.0)
    assert growth_per_100([(0, 5.0)]) is None
    s = summarize([{"requests": 0, "server": [80.0, 90.0], "workers": {"7": [300.0, 300.0]}},
                   {"requests": 10, "server": [81.0, 90.0], "workers": {"7": [310.0, 311.0]}},
                   {"requests": 20, "server": [81.0, 90.0], "workers": {"7": [310.0, 311.0]}}])
    assert set(s) == {"server", "worker 1"} and s["worker 1"]["max_mb"] == 310.0
    assert s["server"]["growth_mb_per_100"] == pytest.approx(0.0)


def test_memory_of_this_process_and_of_none():
    rss, peak = proc_memory(os.getpid())
    assert 0 < rss <= peak
    assert proc_memory(2**22 + 12345) is None


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path):
    before = tiny_db.read_bytes()
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--requests", "24", "--every", "8",
                 "--out", str(tmp_path)]) == 0
    assert tiny_db.read_bytes() == before, "the run writes histories into a copy, never the database it is given"
    saved = next(tmp_path.glob("serve-soak-*.json"))
    data = json.loads(saved.read_text())
    assert [s["requests"] for s in data["samples"]] == [0, 8, 16, 24]
    assert all(len(s["workers"]) == 1 and s["server"][0] > 0 for s in data["samples"]), "one search worker, read"
    assert data["errors"] == [] and data["meta"]["histories"] == 1 and data["meta"]["recommends"] == 23
    assert data["meta"]["exit_code"] == 0
    assert set(data["summary"]) == {"server", "worker 1"}
    assert "Error answers: **0**" in saved.with_suffix(".md").read_text()
    assert_rerender_reproduces(main, render, saved, tmp_path)


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    argvs = (["--render", str(tmp_path / "missing.json")], ["--requests", "0"], ["--workers", "-1"])
    assert "no such saved run" in usage_errors(main, argvs, capsys)
