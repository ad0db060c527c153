"""Exact catalog-constrained beam search on llama.cpp: many requests per decode, forced suffixes decoded
ahead, and an optional collaborative prior inside the search.

One search step, for every request at once::

    expand   every live beam's allowed children (trie children with an unseen title below), scored
             score(beam) + log P_LM(token | prefix) + λ · (log m(child) - log m(node))
    finish   EOS children go to the request's top-k heap
    prune    keep children that can still beat the k-th finished title, the best `beam` of them
    decode   one llama_decode for the new tokens of *all* requests (each beam its own KV sequence)

**Exactness.** Every term added along a path is <= 0 (log-probabilities, and prior increments because a
node's prior mass bounds its children's), so a prefix's score bounds all its completions: a request stops
when no live beam can beat its k-th finished title, and with a beam as wide as the catalog the top-k is
the brute-force top-k of ``log P_LM(title) + λ · log P_CF(title)`` (tested).

**Forced suffixes (jump-forward).** When a new beam's node has exactly one allowed child, and that child
has exactly one, ... the whole chain is decoded in the *same* llama_decode call as the beam's token
(several consecutive positions of one sequence, logits at each), and each forced token's log-probability
is kept. In the following steps the beam walks down the chain from those stored values, with no decode:
it is still scored, finished and pruned step by step exactly as before, so the results are those of the
plain step-by-step search; only the number of llama_decode calls falls. Tokens decoded ahead for a beam
that is pruned later are wasted work, bounded per request by ``speculation`` cells.

**The prior.** ``prior_log_mass`` is ``CatalogTrie.prior_log_mass`` of the request's ``log P_CF`` over its
unseen titles (``sum``: the mass below a node; ``max``: the best title below it, D3's variant); the
increments telescope to ``λ · (log P_CF(title) - log m(root))`` at the leaf. λ = 0 (or no prior) is the
pure language model.

KV cache rules (engine.py): dead beams are moved to the graveyard sequence, never freed mid-search; each
request's beams use only its own sequence ids; the request's prompt sequence is never modified.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .engine import EXACT_BATCH, Engine, log_normalizers
from .errors import EngineError, stop_if_cancelled
from .trie import CatalogTrie


@dataclass
class SearchStats:
    search_steps: int = 0  # beam-search steps (one token of depth each)
    decode_steps: int = 0  # llama_decode calls
    decoded_tokens: int = 0  # tokens decoded, speculative ones included
    jumped_tokens: int = 0  # of those, decoded ahead on forced chains
    search_ms: float = 0.0
    decode_ms: float = 0.0  # inside llama_decode + reading the logits; the rest is the search's own
    batch_sizes: list = field(default_factory=list)  # tokens per llama_decode

    def add(self, other: SearchStats) -> None:
        for name in ("search_steps", "decode_steps", "decoded_tokens", "jumped_tokens", "search_ms", "decode_ms"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.batch_sizes.extend(other.batch_sizes)


@dataclass(frozen=True)
class Hit:
    title_index: int
    score: float  # what the search ranks by: log P_LM + λ · (log P_CF - log m(root))
    lm_score: float  # log P_LM(title + EOS | prompt) alone


@dataclass
class SearchRequest:
    """One user's search. The prompt is already decoded in ``prompt_seq`` (``prompt_len`` tokens) and
    ``prompt_logits`` is its last position's logits row."""

    prompt_seq: int
    prompt_len: int
    prompt_logits: np.ndarray
    unseen: np.ndarray  # CatalogTrie.unseen_counts: children with 0 are never expanded
    k: int
    beam: int
    beam_seqs: Sequence[int]  # at least ``beam`` sequence ids of this request's own
    prior_log_mass: np.ndarray | None = None  # per trie node, see the module docstring
    prior_weight: float = 0.0
    speculation: int | None = None  # cells this request may spend decoding ahead (None: beam * max depth)
    hits: list[Hit] = field(default_factory=list)


class _Beams:
    """Live beams of one request: parallel arrays plus, per beam, what is known below its node."""

    def __init__(self):
        self.scores = np.zeros(0)
        self.nodes = np.zeros(0, dtype=np.int64)
        self.seqs: list[int] = []
        # Per beam: forced children already decoded, as (node, log-prob) in walking order, and the logits
        # row (float32 copy) + log-normaliser at the deepest decoded node when it branches.
        self.ahead: list[list[tuple[int, float]]] = []
        self.rows: list[tuple[np.ndarray, float] | None] = []


class _State:
    def __init__(self, request: SearchRequest, trie: CatalogTrie, engine: Engine):
        r = request
        if len(r.beam_seqs) < r.beam:
            raise EngineError(f"beam width {r.beam} needs {r.beam} sequences; the request has {len(r.beam_seqs)}")
        self.r = r
        self.weight = float(r.prior_weight) if r.prior_log_mass is not None else 0.0
        self.mass = r.prior_log_mass
        # Allowed-children counts: a node with exactly one allowed child is part of a forced chain.
        allowed = np.nonzero(r.unseen[1:] > 0)[0] + 1
        self.n_allowed = np.bincount(trie.parent[allowed], minlength=trie.n_nodes)
        self.finished: list[tuple[float, int, int]] = []  # min-heap of (score, -title, leaf): worst on top
        self.budget = r.speculation if r.speculation is not None else r.beam * trie.max_depth
        self.beams = _Beams()
        logits = np.asarray(r.prompt_logits, dtype=np.float32)
        self.beams.scores = np.zeros(1)
        self.beams.nodes = np.zeros(1, dtype=np.int64)
        self.beams.seqs = [r.prompt_seq]
        self.beams.ahead = [[]]
        self.beams.rows = [(logits, float(log_normalizers(logits[None])[0]))]
        self.done = False

    def kth(self) -> float:
        return self.finished[0][0] if len(self.finished) >= self.r.k else -np.inf


def _forced_child(trie: CatalogTrie, unseen: np.ndarray, node: int) -> int:
    start, end = trie.child_offsets[node], trie.child_offsets[node + 1]
    children = trie.child_node[start:end]
    return int(children[np.argmax(unseen[children] > 0)])


def beam_search(
    engine: Engine,
    trie: CatalogTrie,
    requests: Sequence[SearchRequest],
    graveyard_seq: int,
    stats: SearchStats | None = None,
    jump: bool = True,
    cancel: Callable[[], bool] | None = None,
) -> list[list[Hit]]:
    """Top-k unseen titles for each request, best first (see the module docstring); fills ``request.hits``.

    ``cancel`` is asked before each step's llama_decode: True raises
    :class:`~genrec_edge.errors.SearchCancelled` (the KV cache is left to the next search's reset)."""
    stats = stats if stats is not None else SearchStats()
    started = time.perf_counter()
    states = [_State(r, trie, engine) for r in requests]
    offsets, child_node, token, depth = trie.child_offsets, trie.child_node, trie.token, trie.depth
    eos = trie.eos_id
    for s in states:
        if graveyard_seq in s.r.beam_seqs or graveyard_seq == s.r.prompt_seq:
            raise EngineError(f"graveyard sequence {graveyard_seq} overlaps a request's sequences")

    while True:
        active = [s for s in states if not s.done]
        if not active:
            break
        stop_if_cancelled(cancel)
        stats.search_steps += 1
        batch_tokens: list[int] = []
        batch_pos: list[int] = []
        batch_seq: list[int] = []
        need_token: list[int] = []  # per decoded token: the token whose log-prob is wanted, -1 = the row
        pending: list[tuple[_State, int, list[int]]] = []  # (state, beam index, decoded chain nodes)
        for s in active:
            r, b = s.r, s.beams
            # ---- expand: candidates in beam order, children in token order (the plain search's order)
            c_scores, c_parent, c_node, c_forced = [], [], [], []
            for i in range(len(b.seqs)):
                node = int(b.nodes[i])
                if b.ahead[i]:
                    child, lp = b.ahead[i][0]
                    score = b.scores[i] + lp
                    if s.weight:
                        score += s.weight * (s.mass[child] - s.mass[node])
                    c_scores.append(np.array([score]))
                    c_node.append(np.array([child], dtype=np.int64))
                    c_forced.append(np.ones(1, dtype=bool))
                else:
                    row, lse = b.rows[i]
                    children = child_node[offsets[node]: offsets[node + 1]]
                    keep = r.unseen[children] > 0
                    if not keep.all():
                        children = children[keep]
                    sc = (b.scores[i] - lse) + row[token[children]].astype(np.float64)
                    if s.weight:
                        sc = sc + s.weight * (s.mass[children] - s.mass[node])
                    c_scores.append(sc)
                    c_node.append(children.astype(np.int64))
                    c_forced.append(np.zeros(len(children), dtype=bool))
                c_parent.append(np.full(len(c_node[-1]), i))
            scores = np.concatenate(c_scores)
            parents = np.concatenate(c_parent)
            nodes = np.concatenate(c_node)
            forced = np.concatenate(c_forced)
            tokens = token[nodes]

            # ---- finish: EOS children are complete titles
            done = tokens == eos
            for score, node in zip(scores[done], nodes[done], strict=True):
                entry = (float(score), -int(trie.leaf_title[node]), int(node))
                if len(s.finished) < r.k:
                    heapq.heappush(s.finished, entry)
                elif score > s.kth():
                    heapq.heapreplace(s.finished, entry)
            # ---- prune
            keep = ~done & (scores > s.kth())
            scores, parents, nodes, forced = scores[keep], parents[keep], nodes[keep], forced[keep]
            if len(scores) > r.beam:
                top = np.argpartition(-scores, r.beam - 1)[: r.beam]
                scores, parents, nodes, forced = scores[top], parents[top], nodes[top], forced[top]
            beam_seqs = r.beam_seqs
            if len(scores) == 0:
                for seq in b.seqs:
                    if seq != r.prompt_seq:
                        _bury(engine, seq, graveyard_seq)
                s.done = True
                continue
            order = np.argsort(parents, kind="stable")
            scores, parents, nodes, forced = scores[order], parents[order], nodes[order], forced[order]

            # ---- assign sequences: a parent's first child inherits its sequence, the others copy it into
            # sequences freed by parents that died (never a source that is still needed).
            used = set(parents.tolist())
            free = [b.seqs[i] for i in range(len(b.seqs)) if i not in used and b.seqs[i] != r.prompt_seq]
            for seq in free:
                _bury(engine, seq, graveyard_seq)
            free += [seq for seq in beam_seqs[: r.beam] if seq not in b.seqs]
            new = _Beams()
            new.scores, new.nodes = scores, nodes
            inherited: set[int] = set()
            for j, parent in enumerate(parents.tolist()):
                parent_seq = b.seqs[parent]
                if parent not in inherited and parent_seq != r.prompt_seq:
                    inherited.add(parent)
                    seq = parent_seq
                else:
                    seq = free.pop()
                    engine.seq_copy(parent_seq, seq, -1, -1)
                new.seqs.append(seq)
                if forced[j]:  # walking down a chain decoded earlier: nothing to decode
                    new.ahead.append(b.ahead[parent][1:])
                    new.rows.append(b.rows[parent])
                    continue
                node = int(nodes[j])
                chain = [node]
                if jump:  # decode ahead while the path is forced (and the budget lasts)
                    x = node
                    while s.n_allowed[x] == 1 and s.budget > 0:
                        y = _forced_child(trie, r.unseen, x)
                        if token[y] == eos:
                            break
                        chain.append(y)
                        s.budget -= 1
                        x = y
                start = r.prompt_len + int(depth[node]) - 1
                for offset, x in enumerate(chain):
                    batch_tokens.append(int(token[x]))
                    batch_pos.append(start + offset)
                    batch_seq.append(seq)
                    # What this position's logits are needed for: the next chain token's log-prob, EOS's
                    # when only EOS is left, else the whole row (the beam branches here).
                    if offset + 1 < len(chain):
                        need_token.append(int(token[chain[offset + 1]]))
                    elif s.n_allowed[x] == 1 and token[_forced_child(trie, r.unseen, x)] == eos:
                        need_token.append(eos)
                    else:
                        need_token.append(-1)
                stats.jumped_tokens += len(chain) - 1
                pending.append((s, j, chain))
                new.ahead.append([])
                new.rows.append(None)
            s.beams = new

        if not batch_tokens:
            continue
        # ---- llama_decode for every request's new tokens, logits at every position, in calls of at most
        # EXACT_BATCH tokens: then a token's logits do not depend on what else is in the batch or the
        # cache (engine.py), so batching requests and decoding ahead change no score.
        t0 = time.perf_counter()
        n = len(batch_tokens)
        lps = np.zeros(n)
        rows: dict[int, tuple[np.ndarray, float]] = {}
        for begin in range(0, n, EXACT_BATCH):
            end = min(n, begin + EXACT_BATCH)
            engine.decode(batch_tokens[begin:end], batch_pos[begin:end], batch_seq[begin:end], [True] * (end - begin))
            view = engine.all_logits(end - begin)
            lse = log_normalizers(view)
            for i in range(end - begin):
                want = need_token[begin + i]
                if want >= 0:
                    lps[begin + i] = float(view[i, want]) - float(lse[i])
                else:
                    rows[begin + i] = (view[i].copy(), float(lse[i]))
            stats.decode_steps += 1
            stats.batch_sizes.append(end - begin)
        stats.decode_ms += (time.perf_counter() - t0) * 1000
        stats.decoded_tokens += n
        out = 0
        for s, j, chain in pending:
            b = s.beams
            ahead = []
            for x in chain:
                if out in rows:  # the last position of a branching chain
                    b.rows[j] = rows[out]
                else:
                    ahead.append((_forced_child(trie, s.r.unseen, x), lps[out]))
                out += 1
            b.ahead[j] = ahead

    hits_all = []
    for s in states:
        r = s.r
        root = float(s.mass[0]) if s.weight else 0.0
        ranked = sorted(s.finished, key=lambda e: (-e[0], -e[1]))
        r.hits = [
            Hit(-neg_title, score, score - s.weight * (float(s.mass[leaf]) - root) if s.weight else score)
            for score, neg_title, leaf in ranked
        ]
        for seq in r.beam_seqs:
            engine.seq_clear(seq)
        hits_all.append(r.hits)
    engine.seq_clear(graveyard_seq)  # frees only cells after the prompts': the next search grows from there
    stats.search_ms += (time.perf_counter() - started) * 1000
    return hits_all


def _bury(engine: Engine, seq: int, graveyard: int) -> None:
    """Keep a dead beam's cells occupied (see engine.py) and free its sequence id."""
    engine.seq_copy(seq, graveyard, -1, -1)
    engine.seq_clear(seq)
