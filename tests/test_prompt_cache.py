"""The prompt cache (``Recommender.open(prompt_cache=N)``, ``serve --prompt-cache``): a kept prompt's KV cells
are restored instead of decoded again, and every result is the one a fresh decode gives, to the bit."""

from __future__ import annotations

import pytest

from genrec_edge.errors import UsageError
from genrec_edge.recommend import Recommender, Request

# The same users asked again with another k, filter, prior or beam: the prompt is the same, the search not.
ASKS = [{"k": 3}, {"k": 5}, {"k": 3, "exclude": [90]}, {"k": 4, "only": [10, 20, 30, 60, 90, 100, 140]},
        {"k": 3, "prior": "pop", "prior_weight": 0.5}, {"k": 8}]


def answer(result):
    return [(r.title, r.score, r.lm_score) for r in result.items]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))


def open_pair(tiny_model, tiny_db, **options):
    kept = Recommender.open(tiny_model, tiny_db, threads=2, prompt_cache=4, warn=lambda m: None, **options)
    plain = Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None, **options)
    return kept, plain


def test_a_restored_prompt_gives_the_decoded_prompt_results_to_the_bit(tiny_model, tiny_db):
    kept, plain = open_pair(tiny_model, tiny_db)
    with kept, plain:
        users = [1, 4, 7]
        asked = 0
        for ask in ASKS:
            for user in users:
                assert answer(kept.recommend(user=user, **ask)) == answer(plain.recommend(user=user, **ask))
                asked += 1
        again = kept.recommend(user=7, k=2)
        assert again.timings.prefilled_tokens == 0 < plain.recommend(user=7, k=2).timings.prefilled_tokens
        asked += 1
        # Every ask after a user's first restored its prompt; the plain recommender keeps none.
        assert kept.prompt_hits == asked - len(users) and plain.prompt_hits == 0 and not plain._prompts
        history = ["Toy Story (1995)", "Heat (1995)"]  # an ad-hoc history is a prompt like any other
        first, again = kept.recommend(history=history, k=4), kept.recommend(history=history, k=2)
        assert answer(again) == answer(first)[:2] == answer(plain.recommend(history=history, k=2))
        assert kept.prompt_hits == asked - len(users) + 1
        # Sampling decodes from the prompt too.
        drawn = kept.recommend(user=4, k=3, sample=True, seed=7)
        assert kept.prompt_hits == asked - len(users) + 2
        assert [r.title for r in drawn.items] == [r.title for r in plain.recommend(user=4, k=3, sample=True, seed=7).items]
    assert not kept._prompts  # closed: the kept cells are let go


def test_batched_requests_restore_into_their_own_slots(tiny_model, tiny_db):
    kept, plain = open_pair(tiny_model, tiny_db, batch=3)
    with kept, plain:
        requests = [Request(user=1), Request(user=4, exclude=(90,)), Request(user=7)]
        first = kept.recommend_many(requests, k=3)
        assert kept.prompt_hits == 0
        # Restored and decoded prompts side by side in one search: 7 and 1 kept, 2 new between them.
        mixed = [Request(user=7), Request(user=2), Request(user=1, only=(60, 90, 100, 110, 120))]
        again = kept.recommend_many(mixed, k=4)
        assert kept.prompt_hits == 2
        expected = plain.recommend_many(mixed, k=4)
        assert [answer(r) for r in again] == [answer(r) for r in expected]
        assert [answer(r) for r in first] == [answer(r) for r in plain.recommend_many(requests, k=3)]


def test_least_recently_used_out_and_a_new_history_is_a_new_prompt(tiny_model, tiny_db):
    from genrec_edge.history import HistoryDB

    with Recommender.open(tiny_model, tiny_db, threads=2, prompt_cache=2, warn=lambda m: None) as rec:
        for user in (1, 2, 3, 1):  # 1 is out by the time it comes back
            rec.recommend(user=user, k=3)
        assert rec.prompt_hits == 0 and len(rec._prompts) == 2
        rec.recommend(user=3, k=4)
        assert rec.prompt_hits == 1
        with HistoryDB.open(tiny_db) as db:
            db.add_interaction(3, 200, timestamp=2_000_000_000, rating=4.0)
        rec.recommend(user=3, k=3)  # the prompt holds the new title: decoded, not restored
        assert rec.prompt_hits == 1


def test_a_refused_restore_decodes_the_prompt_again(tiny_model, tiny_db, monkeypatch):
    """llama.cpp answers 0 when it finds no room for the cells (``Engine.seq_restore`` -> False): the prompt
    is then decoded as if it had not been kept, with the same results."""
    kept, plain = open_pair(tiny_model, tiny_db)
    with kept, plain:
        expected = answer(plain.recommend(user=4, k=5))
        assert answer(kept.recommend(user=4, k=3)) == expected[:3]
        real = kept.engine.seq_restore
        refused = []

        def refuse(seq, state):
            refused.append(seq)
            kept.engine.seq_clear(seq)
            return False

        monkeypatch.setattr(kept.engine, "seq_restore", refuse)
        assert answer(kept.recommend(user=4, k=5)) == expected
        assert refused and kept.prompt_hits == 0
        monkeypatch.setattr(kept.engine, "seq_restore", real)
        assert answer(kept.recommend(user=4, k=5, exclude=[])) == expected
        assert kept.prompt_hits == 1


def test_prompt_cache_must_be_a_whole_number(tiny_model, tiny_db):
    for bad in (-1, 1.5, "8"):
        with pytest.raises(UsageError, match="prompt cache"):
            Recommender.open(tiny_model, tiny_db, prompt_cache=bad, warn=lambda m: None)


def test_llama_cpp_refuses_a_restore_without_room_and_restores_exactly_with_it(tiny_model):
    """Engine.seq_restore on real llama.cpp: no free cells for the copy -> False and the sequence empty;
    with room, the copy's next-token logits are the original sequence's, bit for bit."""
    import numpy as np

    from genrec_edge.engine import Engine

    with Engine.open(tiny_model, n_ctx=256, n_seq_max=4, threads=2, adapt_threads=False) as engine:
        text = engine.tokenize("Toy Story (1995) Heat (1995) Casino (1995) Sabrina (1995) " * 8)
        first, filler = text[:100], text[:120]
        engine.decode_sequence(first, 1, 0)
        state = engine.seq_state(1)
        engine.decode_sequence(filler, 2, 0)  # 220 of the 256 cells in use
        assert engine.seq_restore(3, state) is False and engine.seq_len(3) == 0
        engine.seq_clear(2)
        assert engine.seq_restore(3, state) is True and engine.seq_len(3) == len(first)
        nxt = text[100]
        engine.decode([nxt], [len(first)], [1], [True])
        original = engine.logits(0)
        engine.decode([nxt], [len(first)], [3], [True])
        assert np.array_equal(engine.logits(0), original)
