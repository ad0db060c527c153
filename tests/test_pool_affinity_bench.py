"""bench/pool_affinity.py: its follow-up count on the tiny model, and bad arguments."""

from __future__ import annotations

import pytest

from bench.pool_affinity import follow_up_hits, main
from genrec_edge.pool import RecommenderPool


def test_follow_ups_are_counted_and_all_find_their_prompt(tiny_model, tiny_db):
    with RecommenderPool.open(tiny_model, tiny_db, workers=2, prompt_cache=8) as pool:
        assert follow_up_hits(pool, [1, 2, 3], shown=10) == (3 * 2, 3 * 2)
    with RecommenderPool.open(tiny_model, tiny_db, workers=2, prompt_cache=0) as pool:
        assert follow_up_hits(pool, [1, 2], shown=10) == (0, 2 * 2)  # nothing kept: nothing restored


@pytest.mark.parametrize("argv", [["hits", "--users", "0"], ["throughput", "--trees", "."],
                                  ["throughput", "--trees", ".,/nonexistent"]])
def test_bad_arguments_are_one_usage_line(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) <= 2
