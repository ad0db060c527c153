"""The llama.cpp engine and the constrained beam search, on a tiny random LLaMA GGUF (real llama.cpp).

Ground truth is computed independently of the search: each title's summed log-probability from a
fresh KV cache (the prompt and the title decoded in one sequence, no copies, no trie).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinymodel import DEFAULT_TITLES, tiny_gguf

from genrec_edge.errors import CorruptModelError, NotFoundError
from genrec_edge.prompts import PromptTemplate, build_prompt_ids

llama_cpp = pytest.importorskip("llama_cpp")
from genrec_edge import engine as E  # noqa: E402
from genrec_edge import search as S  # noqa: E402
from genrec_edge.trie import CatalogTrie  # noqa: E402

EXTRA_TITLES = [
    "Alien",  # a prefix of "Alien (1979)" and "Aliens (1986)"
    "Alien (1979) (Director's Cut)",
    'He said "no" (1999)',
    "C:\\Path\\To (2004)",
    "Line\nBreak (2010)",
    "Tab\tStop (2011)",
    "Émilie (2001)",
    "東京物語 (1953)",
    "שלום (2005)",
    "Rocket 🚀 Man (2019)",
    "Zero‐width\u200bjoiner (2020)",
    "Heat 2 (2020)",
    "Heat (1986)",
    "Matrix (2021)",
    "Toy Story 2 (1999)",
    "Toy Story 3 (2010)",
    "Jumanji: Welcome to the Jungle (2017)",
    "Balto II: Wolf Quest (2002)",
    "Dracula (1931)",
    "Nixon (2008)",
    "Sabrina (1954)",
    "Sudden Impact (1983)",
    "Pulp (1972)",
    "Star Wars: Episode V - The Empire Strikes Back (1980)",
    "Star Wars: Episode VI - Return of the Jedi (1983)",
    "GoldenEye 007 (1997)",
    "American Beauty (1999)",
    "President, The (1990)",
    "Crouching Tiger (2000)",
    "The (2000)",
]
CATALOG = DEFAULT_TITLES + EXTRA_TITLES  # 50 distinct titles
HISTORY = ["Toy Story (1995)", "Heat (1995)", "Alien (1979)"]


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    # Shared by test_engine / test_recommend / test_grammar within one pytest session.
    cached = tmp_path_factory.getbasetemp() / "runtime-tiny-gguf" / "model-F32.gguf"
    if not cached.exists():
        tiny_gguf(cached.parent, corpus=CATALOG, seed=3)
    return cached


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = E.Engine.open(tiny_model_path, n_ctx=8192, n_seq_max=64, threads=2)
    yield eng
    eng.close()


def prompt_for(engine, history):
    return build_prompt_ids(engine.tokenize, engine.eos_id, history, PromptTemplate())


def brute_force_scores(engine, prompt, token_lists):
    """Summed log-probs from a cleared cache: the prompt, then the title's tokens in one call of one
    sequence, one title at a time (no copies, no trie, no other sequence)."""
    out = []
    for tokens in token_lists:
        llama_cpp.llama_memory_clear(engine.memory, True)
        engine.decode_sequence(prompt, 0, 0)
        total = float(E.log_softmax(engine.logits(-1))[tokens[0]])
        n = len(tokens) - 1
        if n:
            engine.decode(tokens[:-1], range(len(prompt), len(prompt) + n), [0] * n, [True] * n)
            total += sum(float(E.log_softmax(engine.logits(j))[tokens[j + 1]]) for j in range(n))
        out.append(total)
    llama_cpp.llama_memory_clear(engine.memory, True)
    return out


def run_search(engine, trie, history, seen_titles, k, beam):
    """The production search (genrec_edge.search) for one request: prompt in seq 0, beams 1..beam."""
    llama_cpp.llama_memory_clear(engine.memory, True)
    prompt = prompt_for(engine, history)
    prompt_seq, graveyard = 0, beam + 1
    engine.decode_sequence(prompt, prompt_seq, 0)
    index = {t: i for i, t in enumerate(trie.titles)}
    unseen = trie.unseen_counts([index[t] for t in seen_titles])
    stats = S.SearchStats()
    request = S.SearchRequest(prompt_seq, len(prompt), engine.logits(-1), unseen, k, beam, list(range(1, beam + 1)))
    hits = S.beam_search(engine, trie, [request], graveyard, stats)[0]
    return prompt, [(h.title_index, h.score) for h in hits], stats


def build_trie(engine, titles):
    return CatalogTrie.build(titles, lambda t: engine.tokenize(t, False), engine.eos_id)


def test_tokenizer_roundtrip_and_metadata(engine):
    for title in CATALOG:
        assert engine.detokenize(engine.tokenize(title)) == title
    assert engine.meta("general.architecture") == "llama"
    assert engine.meta("no.such.key") is None
    assert len(engine.tokenizer_fingerprint()) == 64


def test_exact_top_k_equals_brute_force(engine):
    trie = build_trie(engine, CATALOG)
    assert len(trie.titles) == 50
    seen = set(HISTORY)
    prompt, results, stats = run_search(engine, trie, HISTORY, seen, k=10, beam=50)
    candidates = [i for i, t in enumerate(trie.titles) if t not in seen]
    truth = brute_force_scores(engine, prompt, [trie.tokens_of(i) for i in candidates])
    expected = sorted(zip(candidates, truth, strict=True), key=lambda pair: -pair[1])[:10]
    assert [i for i, _ in results] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in results], [s for _, s in expected], atol=1e-4)
    assert stats.decode_steps > 0 and stats.decoded_tokens >= stats.decode_steps


def test_narrow_beam_scores_are_exact_for_what_it_finds(engine):
    # Regression: freeing a dead beam's KV cells mid-search made later tokens attend wrongly (off by
    # ~1 nat). Every score a narrow search reports must still be the title's true log-probability.
    trie = build_trie(engine, CATALOG)
    prompt, results, _ = run_search(engine, trie, HISTORY, set(HISTORY), k=5, beam=4)
    assert results
    truth = brute_force_scores(engine, prompt, [trie.tokens_of(i) for i, _ in results])
    np.testing.assert_allclose([s for _, s in results], truth, atol=1e-4)
    assert [s for _, s in results] == sorted((s for _, s in results), reverse=True)


def test_seen_titles_are_never_returned_even_when_most_likely(engine):
    trie = build_trie(engine, CATALOG)
    _, best, _ = run_search(engine, trie, HISTORY, set(), k=3, beam=50)
    top_title = trie.titles[best[0][0]]
    _, again, _ = run_search(engine, trie, HISTORY, {top_title}, k=3, beam=50)
    assert top_title not in {trie.titles[i] for i, _ in again}
    assert [i for i, _ in again][:2] == [i for i, _ in best][1:3]


def test_k_larger_than_unseen_returns_all_unseen(engine):
    titles = CATALOG[:6]
    trie = build_trie(engine, titles)
    _, results, _ = run_search(engine, trie, titles[:2], set(titles[:2]), k=10, beam=20)
    assert sorted(trie.titles[i] for i, _ in results) == sorted(titles[2:])


def test_decode_errors_raise_instead_of_passing_silently(engine):
    llama_cpp.llama_memory_clear(engine.memory, True)
    tokens = engine.tokenize("Heat (1995)")
    engine.decode_sequence(tokens, 3, 0)
    with pytest.raises(E.EngineError, match="llama_decode failed"):
        engine.decode([tokens[0]], [0], [3], [True])  # position 0 already held by seq 3
    llama_cpp.llama_memory_clear(engine.memory, True)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(NotFoundError):
        E.Engine.load_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(CorruptModelError):
        E.Engine.load_model(bad)


def test_truncated_model_is_refused(tiny_model_path, tmp_path):
    data = tiny_model_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError):
        E.Engine.load_model(cut)


ADVERSARIAL = st.sampled_from(['"', "\\", "\n", "\t", "🎬", "שלום", "東京", " ", "(1995)", "\x01", "é", "Alien"])
TITLE = st.lists(st.one_of(ADVERSARIAL, st.text(alphabet="abcAB xyz:'-,.0123456789", min_size=1, max_size=6)),
                 min_size=1, max_size=5).map("".join)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    titles=st.lists(TITLE, min_size=2, max_size=25),
    data=st.data(),
)
def test_property_results_are_distinct_unseen_catalog_titles(engine, titles, data):
    titles = titles + titles[:3]  # duplicates merge
    unique = list(dict.fromkeys(titles))
    trie = build_trie(engine, unique)
    reachable = [t for i, t in enumerate(trie.titles) if trie.title_leaf[i] >= 0]
    history = data.draw(st.lists(st.sampled_from(unique), min_size=1, max_size=4))
    k = data.draw(st.integers(1, 8))
    beam = data.draw(st.integers(1, 12))
    _, results, _ = run_search(engine, trie, history, set(history), k=k, beam=beam)
    found = [trie.titles[i] for i, _ in results]
    assert len(found) == len(set(found))
    assert set(found) <= set(reachable) - set(history)
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 and math.isfinite(s) for s in scores)
    if len(found) < k:  # only a narrow beam may fall short; a beam as wide as the catalog never does
        wide = run_search(engine, trie, history, set(history), k=k, beam=max(len(unique), 1))[1]
        assert len(wide) == min(k, len(set(reachable) - set(history)))


def test_a_tokens_logits_depend_only_on_its_own_sequence(tiny_model_path):
    """Alone, padded, next to other sequences' tokens, or above 600 cells of another sequence: the same
    logits, bit for bit (engine.py keeps llama.cpp on its row-by-row attention kernel)."""
    with E.Engine.open(tiny_model_path, n_ctx=2048, n_seq_max=8, threads=2) as eng:
        prompt = prompt_for(eng, HISTORY)
        title = eng.tokenize("Star Wars: Episode IV - A New Hope (1977)")
        filler = (prompt * 20)[:600]

        def run(below: int, companions: int) -> np.ndarray:
            llama_cpp.llama_memory_clear(eng.memory, True)
            if below:
                eng.decode_sequence(filler[:below], 5, 0, last_logits=False)
            eng.decode_sequence(prompt, 1, 0)
            for seq in range(2, 2 + companions):
                eng.seq_copy(1, seq, -1, -1)
            rows = []
            for j, token in enumerate(title):
                toks = [token] + [title[0]] * companions
                eng.decode(toks, [len(prompt) + j] * len(toks), [1, *range(2, 2 + companions)], [True] * len(toks))
                rows.append(eng.logits(0))
            return np.stack(rows)

        alone = run(0, 0)
        for below, companions in [(0, 3), (600, 0), (600, 3)]:
            # F32 weights: 1-row and n-row matrix products round differently (~1e-6); the attention
            # kernels this avoids move these logits by ~1e-2.
            np.testing.assert_allclose(run(below, companions), alone, atol=2e-5, rtol=0)
        llama_cpp.llama_memory_clear(eng.memory, True)
        with pytest.raises(E.EngineError, match="exceed the batch size"):
            eng.decode(list(range(E.EXACT_BATCH + 1)), range(E.EXACT_BATCH + 1), [1] * (E.EXACT_BATCH + 1),
                       [False] * (E.EXACT_BATCH + 1))
