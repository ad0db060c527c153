"""genrec_edge.search on a tiny random LLaMA GGUF (real llama.cpp).

- jump-forward and several requests per decode change nothing: the results equal the old step-by-step
  search (tests/reference_search.py) for the same beam width, title for title, scores to 1e-4;
- with a collaborative prior and a beam as wide as the catalog, the top-k equals brute-force fused
  scoring ``log P_LM + λ log P_CF`` (both prior variants), and ``lm_score`` is the exact LM part.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_search import constrained_beam_search
from test_engine import CATALOG, HISTORY, brute_force_scores, build_trie, prompt_for, tiny_model_path  # noqa: F401

llama_cpp = pytest.importorskip("llama_cpp")
from genrec_edge import engine as E  # noqa: E402
from genrec_edge.cf import masked_log_softmax  # noqa: E402
from genrec_edge.search import SearchRequest, SearchStats, beam_search  # noqa: E402

BEAMS = 12  # sequences 1..BEAMS for the single-request tests
HISTORIES = [
    HISTORY,
    ["Matrix, The (1999)"],
    ["Star Wars: Episode IV - A New Hope (1977)", "Alien (1979)", "Aliens (1986)", "Heat (1995)"],
    ["Jumanji (1995)", "Balto (1995)"],
    ["東京物語 (1953)", "Pulp Fiction (1994)", "Toy Story 2 (1999)"],
]


@pytest.fixture(scope="module")
def engine(tiny_model_path):  # noqa: F811
    eng = E.Engine.open(tiny_model_path, n_ctx=8192, n_seq_max=200, threads=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def trie(engine):
    return build_trie(engine, CATALOG)


def _prefill(engine, history, seq):
    prompt = prompt_for(engine, history)
    engine.decode_sequence(prompt, seq, 0)
    return prompt, engine.logits(-1)


def _unseen(trie, seen):
    index = {t: i for i, t in enumerate(trie.titles)}
    return trie.unseen_counts([index[t] for t in seen])


def reference(engine, trie, history, k, beam):
    llama_cpp.llama_memory_clear(engine.memory, True)
    prompt, logits = _prefill(engine, history, BEAMS + 1)
    results = constrained_beam_search(
        engine, trie, _unseen(trie, history), len(prompt), E.log_softmax(logits), k, beam, SearchStats(),
        prompt_seq=BEAMS + 1, graveyard_seq=BEAMS + 2,
    )
    llama_cpp.llama_memory_clear(engine.memory, True)
    return results


def run_new(engine, trie, histories, k, beam, jump=True, priors=None, weight=0.0, stats=None):
    """All ``histories`` in one beam_search call; request r uses sequences [r*(beam+1)+1, ...]."""
    llama_cpp.llama_memory_clear(engine.memory, True)
    requests = []
    for r, history in enumerate(histories):
        base = 1 + r * (beam + 1)
        prompt, logits = _prefill(engine, history, base)
        requests.append(SearchRequest(
            prompt_seq=base, prompt_len=len(prompt), prompt_logits=logits, unseen=_unseen(trie, history), k=k,
            beam=beam, beam_seqs=list(range(base + 1, base + 1 + beam)),
            prior_log_mass=None if priors is None else priors[r], prior_weight=weight,
        ))
    graveyard = 1 + len(histories) * (beam + 1)
    out = beam_search(engine, trie, requests, graveyard, stats, jump=jump)
    llama_cpp.llama_memory_clear(engine.memory, True)
    return [[(h.title_index, h.score) for h in hits] for hits in out], requests


def assert_same(a, b):
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-4)


@pytest.mark.parametrize("k,beam", [(10, 10), (5, 4), (3, 1), (10, 12), (20, 8)])
def test_jump_forward_equals_the_step_by_step_search(engine, trie, k, beam):
    for history in HISTORIES:
        expected = reference(engine, trie, history, k, beam)
        for jump in (False, True):
            stats = SearchStats()
            (got,), _ = run_new(engine, trie, [history], k, beam, jump=jump, stats=stats)
            assert_same(got, expected)
            if jump:
                assert stats.jumped_tokens > 0 or stats.decode_steps <= 2


def test_jump_forward_needs_fewer_decode_calls(engine, trie):
    plain, jumped = SearchStats(), SearchStats()
    for history in HISTORIES:
        run_new(engine, trie, [history], 10, 10, jump=False, stats=plain)
        run_new(engine, trie, [history], 10, 10, jump=True, stats=jumped)
    assert jumped.decode_steps < plain.decode_steps
    assert jumped.search_steps == plain.search_steps  # the same walk, fewer llama_decode calls


def test_several_requests_per_decode_equal_one_at_a_time(engine, trie):
    alone = [run_new(engine, trie, [h], 10, 8)[0][0] for h in HISTORIES]
    stats = SearchStats()
    together, _ = run_new(engine, trie, HISTORIES, 10, 8, stats=stats)
    for a, b in zip(together, alone, strict=True):
        assert_same(a, b)
    single = SearchStats()
    run_new(engine, trie, [HISTORIES[0]], 10, 8, stats=single)
    assert max(stats.batch_sizes) > max(single.batch_sizes)  # the requests really shared decodes


def test_all_logits_rows_are_in_batch_order(engine):
    llama_cpp.llama_memory_clear(engine.memory, True)
    prompt = prompt_for(engine, HISTORY)
    engine.decode_sequence(prompt, 1, 0)
    for seq in (2, 3):
        engine.seq_copy(1, seq, -1, -1)
    toks = engine.tokenize("Heat (1995)")[:3]
    engine.decode([toks[0], toks[1], toks[2], toks[1]], [len(prompt), len(prompt), len(prompt), len(prompt) + 1],
                  [3, 1, 2, 1], [True] * 4)
    view = engine.all_logits(4)
    for i in range(4):
        np.testing.assert_array_equal(view[i], engine.logits(i))
    llama_cpp.llama_memory_clear(engine.memory, True)


@pytest.mark.parametrize("variant", ["sum", "max"])
@pytest.mark.parametrize("weight", [0.7, 3.0])
def test_fused_search_with_a_catalog_wide_beam_equals_brute_force(engine, trie, variant, weight):
    rng = np.random.default_rng(11)
    history = HISTORIES[2]
    seen = np.zeros(len(trie.titles), dtype=bool)
    seen[[trie.titles.index(t) for t in history]] = True
    log_p = masked_log_softmax(rng.normal(0, 2.0, size=len(trie.titles)), seen)
    mass = trie.prior_log_mass(log_p, variant)
    width = len(trie.titles)
    (hits,), (request,) = run_new(engine, trie, [history], 10, width, priors=[mass], weight=weight)

    llama_cpp.llama_memory_clear(engine.memory, True)
    prompt = prompt_for(engine, history)
    candidates = [i for i in range(len(trie.titles)) if not seen[i] and trie.title_leaf[i] >= 0]
    lm = brute_force_scores(engine, prompt, [trie.tokens_of(i) for i in candidates])
    fused = [s + weight * (log_p[i] - mass[0]) for i, s in zip(candidates, lm, strict=True)]
    expected = sorted(zip(candidates, fused, strict=True), key=lambda pair: -pair[1])[:10]
    assert_same(hits, expected)
    lm_of = dict(zip(candidates, lm, strict=True))
    np.testing.assert_allclose([h.lm_score for h in request.hits], [lm_of[h.title_index] for h in request.hits], atol=1e-4)
    # The prior changed the answer (else this test would not test it).
    plain = sorted(zip(candidates, lm, strict=True), key=lambda pair: -pair[1])[:10]
    assert [i for i, _ in expected] != [i for i, _ in plain]


def test_prior_mass_is_exact_at_the_leaves_and_monotone(trie):
    rng = np.random.default_rng(5)
    seen = rng.random(len(trie.titles)) < 0.3
    log_p = masked_log_softmax(rng.normal(size=len(trie.titles)), seen)
    for variant in ("sum", "max"):
        mass = trie.prior_log_mass(log_p, variant)
        reachable = trie.title_leaf >= 0
        np.testing.assert_allclose(mass[trie.title_leaf[reachable]], log_p[reachable])
        child = np.arange(1, trie.n_nodes)
        assert (mass[child] <= mass[trie.parent[child]] + 1e-12).all()
        # Brute force: the mass of a node from its titles.
        for node in rng.choice(trie.n_nodes, 40, replace=False):
            below = [t for t in range(len(trie.titles)) if reachable[t]
                     and node <= trie.title_leaf[t] < trie.subtree_end[node]]
            values = np.exp(log_p[below])
            want = values.sum() if variant == "sum" else values.max(initial=0.0)
            got = np.exp(mass[node])
            assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
    np.testing.assert_allclose(np.exp(trie.prior_log_mass(log_p, "sum")[0]), 1.0)


def test_subtree_ranges_are_preorder(trie):
    end = trie.subtree_end
    for node in range(1, trie.n_nodes):
        parent = trie.parent[node]
        assert parent < node < end[parent] and end[node] <= end[parent]


def test_counts_of_a_subset_equal_unseen_counts_of_its_complement(trie):
    rng = np.random.default_rng(3)
    subset = [int(j) for j in rng.choice(len(trie.titles), 12, replace=False)]
    others = [j for j in range(len(trie.titles)) if j not in subset]
    np.testing.assert_array_equal(trie.counts_of(subset), trie.unseen_counts(others))
