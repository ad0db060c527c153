"""The catalog token trie: structure, seen-title masking, cache. No model: a pure-Python tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_edge.trie import CatalogTrie, load_or_build, trie_cache_key

EOS = 1000


def byte_tokenize(text: str) -> list[int]:
    """UTF-8 bytes, with "ab" merged into token 300: a stand-in BPE with a non-trivial split."""
    data = text.encode("utf-8")
    out, i = [], 0
    while i < len(data):
        if data[i : i + 2] == b"ab":
            out.append(300)
            i += 2
        else:
            out.append(data[i])
            i += 1
    return out


TITLES = ["Alien (1979)", "Aliens (1986)", "Alien", "Heat (1995)", "Heat (1995)", "abab", "ab", "", "東京 (1953)"]


def build(titles=TITLES):
    return CatalogTrie.build(titles, byte_tokenize, EOS)


def test_every_title_is_its_tokens_plus_eos_and_duplicates_merge():
    trie = build()
    assert trie.titles == tuple(dict.fromkeys(TITLES))
    for index, title in enumerate(trie.titles):
        assert trie.tokens_of(index) == byte_tokenize(title) + [EOS]
        leaf = trie.walk(byte_tokenize(title) + [EOS])
        assert leaf == trie.title_leaf[index] and trie.leaf_title[leaf] == index
    assert trie.title_count[0] == len(trie.titles) == 8
    assert trie.collisions == []
    assert trie.max_depth == max(len(byte_tokenize(t)) + 1 for t in TITLES)


def test_children_are_sorted_and_counts_sum():
    trie = build()
    for node in range(trie.n_nodes):
        tokens, nodes = trie.children(node)
        assert list(tokens) == sorted(tokens)
        assert all(trie.parent[c] == node for c in nodes)
        if trie.leaf_title[node] >= 0:
            assert len(nodes) == 0 and trie.title_count[node] == 1
        else:
            assert trie.title_count[node] == trie.title_count[nodes].sum()


def test_prefix_title_has_an_eos_branch():
    trie = build()
    node = trie.walk(byte_tokenize("Alien"))
    tokens, _ = trie.children(node)
    assert EOS in tokens and ord(" ") in tokens and ord("s") in tokens
    assert trie.walk(byte_tokenize("Alienz")) == -1


def test_unseen_counts_subtract_seen_paths():
    trie = build()
    index = {t: i for i, t in enumerate(trie.titles)}
    unseen = trie.unseen_counts([index["Alien"], index["Alien (1979)"]])
    assert unseen[0] == trie.title_count[0] - 2
    assert unseen[trie.walk(byte_tokenize("Alien"))] == 1  # only "Aliens (1986)" left below
    assert unseen[trie.title_leaf[index["Alien"]]] == 0
    assert (trie.title_count >= unseen).all() and (unseen >= 0).all()
    assert (trie.title_count == build().title_count).all()  # the trie itself is not modified


def test_colliding_titles_are_reported():
    lossy = CatalogTrie.build(["A", "a", "B"], lambda t: [ord(t.lower())], EOS)
    assert lossy.collisions == ["a"]
    assert lossy.title_count[0] == 2


def test_save_load_roundtrip(tmp_path):
    trie = build()
    trie.save(tmp_path / "t.npz")
    loaded = CatalogTrie.load(tmp_path / "t.npz")
    assert loaded.titles == trie.titles and loaded.eos_id == EOS
    for name in ("parent", "token", "child_offsets", "child_node", "child_token", "title_count", "leaf_title"):
        assert np.array_equal(getattr(loaded, name), getattr(trie, name))


def test_load_or_build_uses_the_cache_and_rebuilds_on_change(tmp_path):
    calls = []

    def counting(text):
        calls.append(text)
        return byte_tokenize(text)

    trie, cached = load_or_build(tmp_path, "tok-a", "cat-1", TITLES, counting, EOS)
    assert not cached and calls
    calls.clear()
    again, cached = load_or_build(tmp_path, "tok-a", "cat-1", TITLES, counting, EOS)
    assert cached and not calls and again.titles == trie.titles
    # Another tokenizer or catalog hash is another file.
    assert trie_cache_key("tok-b", "cat-1") != trie_cache_key("tok-a", "cat-1")
    _, cached = load_or_build(tmp_path, "tok-b", "cat-1", TITLES, counting, EOS)
    assert not cached
    # A damaged cache file is rebuilt, not trusted.
    path = tmp_path / (trie_cache_key("tok-a", "cat-1") + ".npz")
    path.write_bytes(b"garbage")
    rebuilt, cached = load_or_build(tmp_path, "tok-a", "cat-1", TITLES, counting, EOS)
    assert not cached and rebuilt.titles == trie.titles


def test_large_catalog_builds_quickly():
    import time

    rng = np.random.default_rng(0)
    sequences = [(tuple(rng.integers(0, 5000, size=rng.integers(3, 15)).tolist()) + (EOS,), i) for i in range(20000)]
    started = time.perf_counter()
    trie = CatalogTrie.from_sequences([f"t{i}" for i in range(20000)], sequences, EOS)
    elapsed = time.perf_counter() - started
    assert trie.title_count[0] == len({s for s, _ in sequences})
    assert elapsed < 5.0  # ~0.3 s quiet; generous for a shared CPU


@settings(max_examples=60, deadline=None)
@given(
    titles=st.lists(st.text(alphabet="ab \"\\\n東é", max_size=6), min_size=1, max_size=25),
    seen_fraction=st.floats(0, 1),
)
def test_property_unseen_counts_match_brute_force(titles, seen_fraction):
    trie = CatalogTrie.build(titles, byte_tokenize, EOS)
    unique = trie.titles
    seen = list(range(int(len(unique) * seen_fraction)))
    unseen = trie.unseen_counts(seen)
    # Brute force: for each node, count unseen titles whose token path passes through it.
    paths = {i: byte_tokenize(t) + [EOS] for i, t in enumerate(unique)}
    for node in range(trie.n_nodes):
        prefix = []
        v = node
        while v > 0:
            prefix.append(int(trie.token[v]))
            v = int(trie.parent[v])
        prefix.reverse()
        expected = sum(1 for i, p in paths.items() if i not in seen and p[: len(prefix)] == prefix)
        assert unseen[node] == expected


def test_eos_inside_a_title_is_refused():
    with pytest.raises(ValueError, match="EOS"):
        CatalogTrie.build(["x"], lambda t: [EOS], EOS)
