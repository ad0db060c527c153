"""The catalog trie tokenized in threads is the trie tokenized in one thread (real llama.cpp tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import DEFAULT_TITLES

from genrec_edge import trie as T

llama_cpp = pytest.importorskip("llama_cpp")
from genrec_edge.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine.open(tiny_model, n_ctx=256, n_seq_max=1, threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def titles():
    rng = np.random.default_rng(7)
    words = sorted({w for t in DEFAULT_TITLES for w in t.split()})
    made = list(dict.fromkeys(
        " ".join(rng.choice(words, size=rng.integers(1, 6))) + f" ({rng.integers(1900, 2025)})" for _ in range(7000)
    ))[: 3 * T.PARALLEL_MIN_TITLES // 2]
    # Duplicates (one leaf), prefixes of other titles and non-ASCII text, spread over several chunks.
    return made[:3000] + DEFAULT_TITLES + made[3000:] + made[:50] + ["Toy Story", "東京物語 (1953)", "Émilie (2001)"]


def same_trie(a: T.CatalogTrie, b: T.CatalogTrie) -> None:
    assert a.titles == b.titles and a.eos_id == b.eos_id
    for name in T._ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


def test_threaded_build_is_identical(engine, titles):
    tokenize = lambda text: engine.tokenize(text, False)  # noqa: E731
    one = T.CatalogTrie.build(titles, tokenize, engine.eos_id, threads=1)
    assert len(one.titles) > T.PARALLEL_MIN_TITLES  # the threaded path really runs
    for threads in (2, 3, 8):
        same_trie(T.CatalogTrie.build(titles, tokenize, engine.eos_id, threads=threads), one)
    # Every title reads back as its own tokens: no chunk was shifted against the titles.
    for index in (0, 1023, 1024, 2047, 3000, len(one.titles) - 1):
        assert one.tokens_of(index) == engine.tokenize(one.titles[index], False) + [engine.eos_id]


def test_load_or_build_threads_and_cache(engine, titles, tmp_path):
    tokenize = lambda text: engine.tokenize(text, False)  # noqa: E731
    built, cached = T.load_or_build(tmp_path, "tok", "cat", titles, tokenize, engine.eos_id)  # default threads
    assert not cached
    same_trie(built, T.CatalogTrie.build(titles, tokenize, engine.eos_id))
    again, cached = T.load_or_build(tmp_path, "tok", "cat", titles, tokenize, engine.eos_id, threads=1)
    assert cached
    same_trie(again, built)


def test_tokenizer_errors_surface_from_threads(titles):
    def tokenize(text):
        if text == titles[-1]:
            raise ValueError("boom")
        return list(text.encode("utf-8"))

    with pytest.raises(ValueError, match="boom"):
        T.CatalogTrie.build(titles, tokenize, 999, threads=4)
    with pytest.raises(ValueError, match="EOS"):
        T.CatalogTrie.build(titles, lambda text: [7] if text == titles[5000] else [1, 2], 7, threads=4)
