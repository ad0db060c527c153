"""The catalog as a token trie: every distinct title's canonical tokens followed by EOS.

The runtime constrains generation by walking this trie: at a node, the only tokens the model may emit
are the node's children, so every finished sequence is exactly one catalog title (``tokenize(title) +
[EOS]``, the split training saw - see ``prompts.py``). The trie is stored as flat numpy arrays (CSR), so
a search step costs O(children of the node) and never O(vocabulary) Python work, and it saves to and
loads from one ``.npz`` file in the cache.

Arrays (``n`` nodes, node 0 is the root; node ids are creation order, so a parent's id is smaller than
its children's)::

    parent[n]            parent node (-1 for the root)
    token[n]             token that leads from the parent to the node (-1 for the root)
    child_offsets[n+1]   children of node v are child_node[child_offsets[v]:child_offsets[v+1]]
    child_node, child_token   (sorted by token within a node)
    title_count[n]       number of distinct titles below the node (1 at a leaf)
    leaf_title[n]        title index of a leaf (the node after EOS), else -1
    title_leaf[t]        leaf node of title t, or -1 if its tokens collide with an earlier title's

Seen items are excluded per request by :meth:`CatalogTrie.unseen_counts`: ``title_count`` minus the seen
titles' root-to-leaf paths; a child with zero unseen titles is masked, so a search can only finish
unseen titles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

TRIE_FORMAT = "genrec-trie-v1"


@dataclass(frozen=True, eq=False)
class CatalogTrie:
    titles: tuple[str, ...]
    parent: np.ndarray
    token: np.ndarray
    child_offsets: np.ndarray
    child_node: np.ndarray
    child_token: np.ndarray
    title_count: np.ndarray
    leaf_title: np.ndarray
    title_leaf: np.ndarray
    eos_id: int

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        titles: Sequence[str],
        tokenize: Callable[[str], Sequence[int]],
        eos_id: int,
        threads: int = 1,
    ) -> CatalogTrie:
        """Trie over ``tokenize(title) + [eos_id]`` for each distinct title (first occurrence order).

        ``tokenize`` must be the model's tokenizer without special tokens. Two distinct titles with the
        same tokens (possible with lossy tokenizers) share one leaf: the first title owns it and the
        later one gets ``title_leaf == -1`` (unreachable; see :attr:`collisions`). ``threads`` > 1
        tokenizes in that many threads (``tokenize`` must then be thread-safe); the trie is the same.
        """
        unique = list(dict.fromkeys(titles))
        sequences = []
        for index, ids in enumerate(_tokenize_all(unique, tokenize, threads)):
            if eos_id in ids:  # parse_special=False makes this impossible for llama.cpp tokenizers
                raise ValueError(f"title {unique[index]!r} tokenizes to the EOS token")
            sequences.append((ids + (eos_id,), index))
        return cls.from_sequences(unique, sequences, eos_id)

    @classmethod
    def from_sequences(
        cls, titles: Sequence[str], sequences: list[tuple[tuple[int, ...], int]], eos_id: int
    ) -> CatalogTrie:
        """Build from ``(tokens ending in eos_id, title index)`` pairs."""
        # Sorted sequences share prefixes with their predecessor, so one pass with the previous
        # sequence's node path creates every node exactly once, in depth-first order.
        order = sorted(sequences)
        parent = [-1]
        token = [-1]
        leaf_title = [-1]
        title_leaf = [-1] * len(titles)
        prev: tuple[int, ...] = ()
        path = [0]  # path[d] = node at depth d of the previous sequence
        for ids, title_index in order:
            common = 0
            limit = min(len(prev), len(ids))
            while common < limit and prev[common] == ids[common]:
                common += 1
            if common == len(ids):  # identical token sequence: an earlier title owns the leaf
                continue
            del path[common + 1 :]
            for tok in ids[common:]:
                parent.append(path[-1])
                token.append(tok)
                leaf_title.append(-1)
                path.append(len(parent) - 1)
            leaf_title[path[-1]] = title_index
            title_leaf[title_index] = path[-1]
            prev = ids

        parent_a = np.asarray(parent, dtype=np.int32)
        token_a = np.asarray(token, dtype=np.int32)
        leaf_a = np.asarray(leaf_title, dtype=np.int32)
        n = len(parent_a)
        # Children stored contiguously per parent; a stable sort keeps them in token order.
        child_node = (np.argsort(parent_a[1:], kind="stable") + 1).astype(np.int32)
        counts = np.bincount(parent_a[1:], minlength=n) if n > 1 else np.zeros(n, dtype=np.int64)
        child_offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(counts, out=child_offsets[1:])
        title_count = (leaf_a >= 0).astype(np.int32)
        # Children have larger ids than parents: accumulate leaves upward one depth level at a time.
        depth = _depths(parent_a)
        for d in range(int(depth.max(initial=0)), 0, -1):
            at_depth = np.nonzero(depth == d)[0]
            np.add.at(title_count, parent_a[at_depth], title_count[at_depth])
        return cls(
            titles=tuple(titles),
            parent=parent_a,
            token=token_a,
            child_offsets=child_offsets,
            child_node=child_node,
            child_token=token_a[child_node],
            title_count=title_count,
            leaf_title=leaf_a,
            title_leaf=np.asarray(title_leaf, dtype=np.int32),
            eos_id=int(eos_id),
        )

    # ------------------------------------------------------------------ queries
    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def collisions(self) -> list[str]:
        """Titles whose tokens equal an earlier title's (unreachable through the trie)."""
        return [self.titles[i] for i in np.nonzero(self.title_leaf < 0)[0]]

    @cached_property
    def depth(self) -> np.ndarray:
        """Depth of every node (the root is 0): the number of tokens from the root."""
        return _depths(self.parent)

    @property
    def max_depth(self) -> int:
        """Tokens of the longest title, EOS included."""
        return int(self.depth.max(initial=0))

    @cached_property
    def subtree_end(self) -> np.ndarray:
        """Node ids are a depth-first preorder (``from_sequences`` walks sorted token sequences), so the
        subtree of ``v`` is exactly the id range ``[v, subtree_end[v])``."""
        size = np.ones(self.n_nodes, dtype=np.int64)
        depth = self.depth
        for d in range(int(depth.max(initial=0)), 0, -1):
            at_depth = np.nonzero(depth == d)[0]
            np.add.at(size, self.parent[at_depth], size[at_depth])
        return np.arange(self.n_nodes, dtype=np.int64) + size

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, child nodes) of ``node``."""
        start, end = self.child_offsets[node], self.child_offsets[node + 1]
        return self.child_token[start:end], self.child_node[start:end]

    def tokens_of(self, title_index: int) -> list[int]:
        """The title's tokens including EOS, read back from the trie."""
        node = int(self.title_leaf[title_index])
        out = []
        while node > 0:
            out.append(int(self.token[node]))
            node = int(self.parent[node])
        return out[::-1]

    def walk(self, tokens: Sequence[int]) -> int:
        """Node reached by ``tokens`` from the root, or -1 if they leave the trie."""
        node = 0
        for tok in tokens:
            toks, nodes = self.children(node)
            i = int(np.searchsorted(toks, tok))
            if i >= len(toks) or toks[i] != tok:
                return -1
            node = int(nodes[i])
        return node

    def unseen_counts(self, seen_title_indices: Sequence[int]) -> np.ndarray:
        """Per-node count of titles not in ``seen_title_indices`` (a fresh array)."""
        counts = self.title_count.copy()
        leaves = self.title_leaf[np.asarray(sorted(set(seen_title_indices)), dtype=np.int64)]
        nodes = leaves[leaves >= 0].astype(np.int64)
        while nodes.size:  # one iteration per depth level, all seen titles at once
            np.subtract.at(counts, nodes, 1)
            nodes = self.parent[nodes].astype(np.int64)
            nodes = nodes[nodes >= 0]
        return counts

    def counts_of(self, title_indices: Sequence[int]) -> np.ndarray:
        """Per-node count of the given titles below it (0 elsewhere): a search restricted to them."""
        counts = np.zeros(self.n_nodes, dtype=self.title_count.dtype)
        leaves = self.title_leaf[np.asarray(sorted(set(title_indices)), dtype=np.int64)]
        nodes = leaves[leaves >= 0].astype(np.int64)
        while nodes.size:
            np.add.at(counts, nodes, 1)
            nodes = self.parent[nodes].astype(np.int64)
            nodes = nodes[nodes >= 0]
        return counts

    def prior_log_mass(self, title_log_probs: np.ndarray, variant: str = "sum") -> np.ndarray:
        """Per-node log of the prior mass below it: ``log Σ P(t)`` (``sum``) or ``log max P(t)`` (``max``)
        over the titles ``t`` under the node, from per-title log-probabilities (``-inf`` = excluded).

        Along any root-to-leaf path the mass never grows, so increments ``log m(child) - log m(node)`` are
        <= 0 and telescope to ``log P(title) - log m(root)`` at the title's leaf. O(nodes) numpy: a prefix
        sum (or a max-reduce) over each node's preorder id range.
        """
        if variant not in ("sum", "max"):
            raise ValueError(f"unknown prior variant {variant!r}")
        n = self.n_nodes
        leaves = self.title_leaf
        reachable = leaves >= 0
        logp = np.asarray(title_log_probs, dtype=np.float64)
        values = np.full(n, -np.inf)
        values[leaves[reachable]] = logp[reachable]
        bounds = np.empty(2 * n, dtype=np.int64)
        bounds[0::2], bounds[1::2] = np.arange(n), self.subtree_end
        best = np.maximum.reduceat(np.concatenate((values, [-np.inf])), bounds)[0::2]  # reduceat: indices < len
        if variant == "max":
            return best
        # Sums as prefix-sum differences over the preorder ranges, shifted by the largest log-prob. A
        # subtree's sum is never below its best title (so rounding cannot turn a far-below-the-top subtree
        # into zero mass), and leaves keep their exact log-prob: the telescoped sum ends on log P(t).
        peak = np.max(logp[reachable], initial=-np.inf)
        if not np.isfinite(peak):
            return best
        cumulative = np.concatenate(([0.0], np.cumsum(np.exp(values - peak))))
        mass = np.maximum(cumulative[self.subtree_end] - cumulative[:-1], np.exp(best - peak))
        with np.errstate(divide="ignore"):
            out = np.log(mass) + peak
        out[leaves[reachable]] = logp[reachable]
        return out

    # ------------------------------------------------------------------ cache
    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so a concurrent reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"format": TRIE_FORMAT, "eos_id": self.eos_id, "titles": list(self.titles)})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    meta=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8),
                    **{name: getattr(self, name) for name in _ARRAYS},
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> CatalogTrie:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode("utf-8"))
            if meta.get("format") != TRIE_FORMAT:
                raise ValueError(f"unknown trie format {meta.get('format')!r}")
            arrays = {name: data[name] for name in _ARRAYS}
        return cls(titles=tuple(meta["titles"]), eos_id=int(meta["eos_id"]), **arrays)


_ARRAYS = (
    "parent",
    "token",
    "child_offsets",
    "child_node",
    "child_token",
    "title_count",
    "leaf_title",
    "title_leaf",
)


PARALLEL_MIN_TITLES = 4096  # below this, starting threads costs more than it saves
_TOKENIZE_CHUNK = 1024


def _tokenize_all(titles: list[str], tokenize: Callable[[str], Sequence[int]], threads: int) -> list[tuple[int, ...]]:
    """``tokenize`` of every title, in order; in ``threads`` threads over chunks of titles.

    llama.cpp's ``llama_tokenize`` costs ~40 µs a call, almost all inside the C call, which ctypes makes
    with the GIL released: threads tokenize a 62k-title catalog nearly ``threads`` times faster. The
    result is the same list as one thread's, so the trie is byte-identical.
    """
    def chunk(part: Sequence[str]) -> list[tuple[int, ...]]:
        return [tuple(int(t) for t in tokenize(title)) for title in part]

    if threads <= 1 or len(titles) < PARALLEL_MIN_TITLES:
        return chunk(titles)
    from concurrent.futures import ThreadPoolExecutor

    parts = [titles[i : i + _TOKENIZE_CHUNK] for i in range(0, len(titles), _TOKENIZE_CHUNK)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="trie-tokenize") as pool:
        return [ids for done in pool.map(chunk, parts) for ids in done]


def default_tokenize_threads() -> int:
    """The CPUs this process may run on (at most 8: tokenizing is a few seconds at most)."""
    from .cpu_share import usable_cpus

    return max(1, min(8, usable_cpus()))


def _depths(parent: np.ndarray) -> np.ndarray:
    """Depth of every node: climb all nodes one level per iteration (max-depth numpy gathers)."""
    n = len(parent)
    depth = np.zeros(n, dtype=np.int32)
    cursor = np.arange(n, dtype=np.int64)
    alive = np.arange(1, n)
    while alive.size:
        depth[alive] += 1
        cursor[alive] = parent[cursor[alive]]
        alive = alive[cursor[alive] > 0]
    return depth


def trie_cache_key(tokenizer_fingerprint: str, catalog_sha256: str) -> str:
    """Cache file stem for one (tokenizer, catalog) pair."""
    digest = hashlib.sha256(f"{TRIE_FORMAT}\0{tokenizer_fingerprint}\0{catalog_sha256}".encode()).hexdigest()
    return f"trie-{digest[:32]}"


def load_or_build(
    cache_dir: Path | None,
    tokenizer_fingerprint: str,
    catalog_sha256: str,
    titles: Sequence[str],
    tokenize: Callable[[str], Sequence[int]],
    eos_id: int,
    threads: int | None = None,
) -> tuple[CatalogTrie, bool]:
    """The cached trie for this tokenizer and catalog, or a fresh build saved to the cache.

    Returns ``(trie, from_cache)``. A cache file that is unreadable or whose titles differ is rebuilt.
    A build tokenizes in ``threads`` threads (None: :func:`default_tokenize_threads`), so ``tokenize``
    must be thread-safe, as llama.cpp's is (the runtime passes ``engine.tokenize``).
    """
    unique = tuple(dict.fromkeys(titles))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (trie_cache_key(tokenizer_fingerprint, catalog_sha256) + ".npz")
        if path.exists():
            try:
                trie = CatalogTrie.load(path)
                if trie.titles == unique and trie.eos_id == eos_id:
                    return trie, True
            except (OSError, ValueError, KeyError):
                pass  # a stale or damaged cache entry is simply rebuilt
    trie = CatalogTrie.build(unique, tokenize, eos_id, threads or default_tokenize_threads())
    if path is not None:
        try:
            trie.save(path)
        except OSError:
            pass  # a read-only cache dir costs a rebuild next time, nothing else
    return trie, False
