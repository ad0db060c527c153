"""bench.quality's arguments: one line and exit 2, checked before SASRec trains for minutes."""

from __future__ import annotations

import time

import pytest

from bench.quality import main


@pytest.mark.parametrize(("argv", "message"), [
    (["--users", "abc"], "--users takes a number or 'all'"),
    (["--users", "0"], "--users must be >= 1"),
    (["--split", "bogus"], "--split is test or valid"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--workers", "many"], "--workers takes a number of processes (1 or more) or auto, not 'many'"),
    (["--sasrec", "."], "not a SASRec saved by"),
])
def test_bad_arguments_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    started = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert time.perf_counter() - started < 5 and not (tmp_path / "out").exists()
