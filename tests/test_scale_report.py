"""bench.scale_report end to end on a 1/100 synthetic release: each step in its own process, JSON + markdown."""

from __future__ import annotations

import json
from pathlib import Path

from bench.scale_report import main


def test_small_scale_report(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the steps run as `python -m bench.scale_report`
    out = tmp_path / "results"
    argv = ["--work", str(tmp_path / "work"), "--scale", "0.01", "--steps", "ingest,lookups,evaluate",
            "--out-dir", str(out), "--name", "small"]
    assert main(argv) == 0
    report = json.loads((out / "small.json").read_text(encoding="utf-8"))
    ingest = report["steps"]["ingest"]
    assert (ingest["rows"], ingest["users"], ingest["items"]) == (250_001, 1_625, 624)
    assert ingest["peak_rss_mb"] > 0 and ingest["db_bytes"] > 0
    lookups = report["steps"]["lookups"]
    assert lookups["sample_users"] == 1000 and lookups["history_ms"]["sample"]["p50"] > 0
    assert lookups["cli_history_show"]["heaviest"]["best_s"] > 0
    assert report["steps"]["evaluate"]["users"] == 1_625
    text = (out / "small.md").read_text(encoding="utf-8")
    assert "250,001 rows" in text and "`evaluate_scores`" in text and "python -m bench.scale_report" in text
