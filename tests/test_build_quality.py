"""bench.build_quality on the tiny model: `evaluate` run under each interpreter, its logs read back and paired."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import assert_rerender_reproduces, usage_errors

from bench.build_quality import main, render, summarize


def _result(user, rank, top):
    return {"user": user, "target": "T", "rank": rank, "top": top}


def test_summary_pairs_users_and_counts_what_moved():
    ref = [_result(1, 1, ["A", "B"]), _result(2, None, ["C", "D"]), _result(3, 2, ["E", "F"])]
    other = [_result(1, 1, ["A", "B"]), _result(2, 2, ["D", "T"]), _result(3, None, ["F", "G"])]
    s = summarize({"a": ref, "b": other})
    assert s["users"] == 3
    assert s["agreement"]["b"] == {"identical_top10": 1, "mean_overlap_at_10": pytest.approx((2 + 1 + 1) / 3 / 10),
                                   "hit_gained": 1, "hit_lost": 1}
    assert s["recommenders"]["a"]["HR@10"]["mean"] == pytest.approx(2 / 3)
    (diff,) = s["differences"]
    assert diff["a"] == "a" and diff["b"] == "b" and diff["metrics"]["HR@10"]["mean"] == pytest.approx(0.0)
    assert diff["metrics"]["MRR"]["mean"] == pytest.approx((1 + 0 + 0.5) / 3 - (1 + 0.5 + 0) / 3)
    with pytest.raises(SystemExit, match="other users"):
        summarize({"a": ref, "b": other[::-1]})


def test_one_build_twice_agrees_with_itself_end_to_end(tiny_model, tiny_db, tmp_path):
    """The same interpreter under two names: the same llama.cpp, so every list and metric must agree."""
    import os

    # A relative path too: the children run from the logs folder, so it must be made absolute first.
    argv = ["--python", f"one={os.path.relpath(sys.executable)}", "--python", f"two={sys.executable}", "--model", str(tiny_model),
            "--db", str(tiny_db), "--users", "4", "--logs", str(tmp_path / "logs"), "--out", str(tmp_path)]
    assert main(argv) == 0
    saved = next(tmp_path.glob("build-quality-*.json"))
    data = json.loads(saved.read_text())
    s = data["summary"]
    assert s["users"] == 4 and s["agreement"]["two"]["identical_top10"] == 4
    assert s["agreement"]["two"]["hit_gained"] == s["agreement"]["two"]["hit_lost"] == 0
    assert all(e["mean"] == 0.0 for e in s["differences"][0]["metrics"].values())
    assert data["meta"]["builds"]["one"]["system_info"] and data["meta"]["builds"]["one"]["run_key"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["one-valid-4-s0.jsonl", "two-valid-4-s0.jsonl"]
    text = saved.with_suffix(".md").read_text()
    assert "| two − one (paired) |" in text and "| two | 4/4 | 1.000 | 0 | 0 |" in text
    assert_rerender_reproduces(main, render, saved, tmp_path)
    # A rerun reuses both logs, and says so
    assert main(argv) == 0
    (second,) = [p for p in tmp_path.glob("build-quality-*.json") if p != saved]  # a run of record is kept
    again = json.loads(second.read_text())
    assert again["meta"]["builds"]["two"]["reused"] == 4 and again["summary"] == s
    assert "4 users' results reused from its log" in second.with_suffix(".md").read_text()


def test_bad_arguments_are_one_usage_line(tmp_path, capsys):
    err = usage_errors(main, (["--python", "a=x"], ["--python", "a", "--python", "b=y"],
                              ["--python", "a=x", "--python", "a=y"], ["--render", str(tmp_path / "no.json")]), capsys)
    assert "at least two builds" in err and "give NAME=PATH" in err and "a given twice" in err
    assert "no such saved run" in err


def test_a_python_that_cannot_run_is_one_error_line(tiny_db, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--python", f"a={tmp_path / 'nope' / 'python'}", "--python", f"b={sys.executable}", "--db", str(tiny_db),
              "--logs", str(tmp_path / "logs"), "--out", str(tmp_path)])
    assert str(exc.value.code).startswith("error: cannot run ") and "nope" in str(exc.value.code)
    assert not list(tmp_path.glob("build-quality-*"))
