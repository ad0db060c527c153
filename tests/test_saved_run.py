"""bench/saved_run.py: a bench's run of record is never overwritten by a later run."""

from __future__ import annotations

import json

from bench.saved_run import fresh_stem, save_run


def _render(data, stem):
    stem.with_suffix(".md").write_text(f"# {data['meta']['users']} users\n")


def test_a_second_run_on_the_same_day_keeps_the_first(tmp_path, capsys):
    data = {"meta": {"date": "2026-12-02 08:00", "users": 32}}
    first = save_run(data, tmp_path, "serve-cache", _render)
    second = save_run({"meta": {"date": "2026-12-02 09:00", "users": 1}}, tmp_path, "serve-cache", _render)
    assert first.name == "serve-cache-2026-12-02" and second.name == "serve-cache-2026-12-02-2"
    assert json.loads(first.with_suffix(".json").read_text())["meta"]["users"] == 32  # the record is intact
    assert first.with_suffix(".md").read_text() == "# 32 users\n"
    assert fresh_stem(tmp_path, "serve-cache-2026-12-02").name == "serve-cache-2026-12-02-3"
    assert fresh_stem(tmp_path, "runtime").name == "runtime"
