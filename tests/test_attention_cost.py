"""bench.attention_cost on the tiny model: every part runs on real llama.cpp and the report says what it measured."""

from __future__ import annotations

import json

from conftest import assert_rerender_reproduces, usage_errors

from bench.attention_cost import main, render, summarize


def _row(user, on_ms, off_ms, on_titles, off_titles, off_scores=(-1.0, -2.0)):
    return {"user": user, "on": {"ms": on_ms, "prefill_ms": 1.0, "titles": on_titles, "scores": [-1.0, -2.0]},
            "off": {"ms": off_ms, "prefill_ms": 1.0, "titles": off_titles, "scores": list(off_scores)}}


def test_summary_counts_agreement_and_pairs_ratios():
    rows = [_row(1, 100.0, 80.0, ["A", "B"], ["A", "B"], (-1.0, -2.5)),
            _row(2, 200.0, 220.0, ["A", "B"], ["B", "C"])]
    s = summarize(rows)
    assert s["same_top"] == 1 and s["faster_off"] == 1
    assert abs(s["ratio_median"] - (0.8 + 1.1) / 2) < 1e-12 and s["ratio_min"] == 0.8
    assert s["max_score_diff_same_top"] == 0.5  # only users whose titles agree
    assert abs(s["mean_overlap"] - 0.75) < 1e-12


def test_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_db, tmp_path, capsys):
    assert main(["--model", str(tiny_model), "--db", str(tiny_db), "--users", "2", "--reps", "1",
                 "--contexts", "0,40", "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("attention-cost-*.json"))
    data = json.loads(saved.read_text())
    assert set(data["contexts"]) == {"on", "off"} and set(data["contexts"]["on"]) == {"0", "40"}
    assert all(ms > 0 for part in data["contexts"].values() for ms in part.values())
    assert all(ms > 0 for ms in data["prefill"].values()) and len(data["prefill"]) == 2
    assert len(data["requests"]) == 2 and all(len(r["on"]["titles"]) > 0 for r in data["requests"])
    text = saved.with_suffix(".md").read_text()
    assert "| 40 |" in text and f"/{len(data['requests'])}** users" in text
    assert saved.with_suffix(".png").stat().st_size > 0
    assert_rerender_reproduces(main, render, saved, tmp_path)  # --render redraws the same report


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    argvs = (["--render", str(tmp_path / "missing.json")], ["--contexts", "a,b"], ["--users", "0"])
    assert "no such saved run" in usage_errors(main, argvs, capsys)
