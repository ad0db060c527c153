"""The step-by-step constrained beam search as it was before ``genrec_edge.search`` (jump-forward,
several requests per decode, the prior): kept verbatim here as the oracle that the optimised search must
reproduce for the same beam width ("optimised search equals the old one", tested in test_search.py).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from genrec_edge.engine import Engine, EngineError, log_normalizers
from genrec_edge.search import SearchStats
from genrec_edge.trie import CatalogTrie

FIRST_BEAM_SEQ = 1


def expand_beams(trie: CatalogTrie, unseen: np.ndarray, live_nodes, live_scores, logits, lse):
    """All one-token extensions of the live beams that still lead to an unseen title.

    Beam ``b``'s next-token log-probs are ``logits[b] - lse[b]`` (see :func:`log_normalizers`).
    Returns ``(scores, parent beam index, child node, token)`` arrays. Work is O(children of the live
    nodes): the trie's CSR slices, never a pass over the vocabulary or the catalog.
    """
    offsets, child_node, token = trie.child_offsets, trie.child_node, trie.token
    cand_scores, cand_parent, cand_node = [], [], []
    for b in range(len(live_nodes)):
        nodes = child_node[offsets[live_nodes[b]] : offsets[live_nodes[b] + 1]]
        keep = unseen[nodes] > 0
        if not keep.all():
            nodes = nodes[keep]
        cand_scores.append((live_scores[b] - lse[b]) + logits[b, token[nodes]].astype(np.float64))
        cand_parent.append(np.full(len(nodes), b))
        cand_node.append(nodes)
    nodes = np.concatenate(cand_node)
    return np.concatenate(cand_scores), np.concatenate(cand_parent), nodes, token[nodes]


@dataclass(order=True)
class Finished:
    neg_score: float
    title_index: int = field(compare=False)

    @property
    def score(self) -> float:
        return -self.neg_score


def constrained_beam_search(
    engine: Engine,
    trie: CatalogTrie,
    unseen: np.ndarray,
    prompt_len: int,
    prompt_log_probs: np.ndarray,
    k: int,
    beam: int,
    stats: SearchStats | None = None,
    prompt_seq: int = FIRST_BEAM_SEQ,
    graveyard_seq: int | None = None,
) -> list[tuple[int, float]]:
    """Top-``k`` unseen titles by summed log-probability, as ``[(title index, score)]`` best first.

    The prompt must already be decoded in sequence ``prompt_seq`` (``prompt_len`` tokens) with
    ``prompt_log_probs`` its last position's log-softmax. Beams live in sequences ``FIRST_BEAM_SEQ ..
    FIRST_BEAM_SEQ + beam - 1``; a ``prompt_seq`` outside that range is left untouched (so a second
    search can reuse the prompt), one inside it becomes the first beam. ``unseen`` is
    :meth:`CatalogTrie.unseen_counts`: children with no unseen title below are never expanded, so every
    finished title is unseen and distinct. With ``beam`` >= the number of catalog titles nothing is
    pruned and the result is exact; the search stops once ``k`` titles are finished and no live beam
    (whose score bounds all its completions, log-probs being <= 0) can beat the k-th.
    """
    stats = stats if stats is not None else SearchStats()
    started = time.perf_counter()
    beam_seqs = range(FIRST_BEAM_SEQ, FIRST_BEAM_SEQ + beam)
    if FIRST_BEAM_SEQ + beam > engine.n_seq_max:
        raise EngineError(f"beam width {beam} needs {beam + 3} sequences; the context has {engine.n_seq_max}")
    shared_prompt = prompt_seq not in beam_seqs
    graveyard = graveyard_seq if graveyard_seq is not None else engine.n_seq_max - 1
    if graveyard in beam_seqs or graveyard == prompt_seq:
        raise EngineError(f"graveyard sequence {graveyard} overlaps the beams or the prompt")

    def bury(seq: int) -> None:  # keep the cells occupied (see the module docstring), free the id
        engine.seq_copy(seq, graveyard, -1, -1)
        engine.seq_clear(seq)

    eos = trie.eos_id
    finished: list[Finished] = []  # max-heap by score through negation, bounded to k entries
    # Live beams: (score, node, seq id). The root beam owns the prompt's sequence.
    live_scores = np.zeros(1)
    live_nodes = np.zeros(1, dtype=np.int64)
    live_seqs = [prompt_seq]
    logits, lse = prompt_log_probs[None, :], np.zeros(1)  # already normalised
    length = prompt_len  # every live beam has the same length: one token per step

    def kth_score() -> float:
        return -finished[0].neg_score if len(finished) >= k else -np.inf

    while len(live_seqs):
        scores, parents, nodes, tokens = expand_beams(trie, unseen, live_nodes, live_scores, logits, lse)

        # Finished titles (EOS children) go to the result heap; they are complete and need no decode.
        done = tokens == eos
        for score, node in zip(scores[done], nodes[done], strict=True):
            entry = Finished(-float(score), int(trie.leaf_title[node]))
            if len(finished) < k:
                heapq.heappush(finished, _Worst(entry))
            elif score > kth_score():
                heapq.heapreplace(finished, _Worst(entry))
        # Continuing candidates: only those that can still beat the k-th finished (log-probs are <= 0,
        # so a prefix's score bounds all its completions), best ``beam`` of them. None left: done.
        open_ = ~done & (scores > kth_score())
        scores, parents, nodes, tokens = scores[open_], parents[open_], nodes[open_], tokens[open_]
        if len(scores) > beam:
            top = np.argpartition(-scores, beam - 1)[:beam]
            scores, parents, nodes, tokens = scores[top], parents[top], nodes[top], tokens[top]
        if len(scores) == 0:
            break

        # Assign sequences: a parent's first child inherits its sequence, further children copy it
        # into sequences freed by parents that died. No source is overwritten: freed sequences only
        # belonged to parents without children.
        order = np.argsort(parents, kind="stable")
        scores, parents, nodes, tokens = scores[order], parents[order], nodes[order], tokens[order]
        used_parent = set(parents.tolist())
        free = [live_seqs[b] for b in range(len(live_seqs)) if b not in used_parent and live_seqs[b] in beam_seqs]
        for seq in free:
            bury(seq)
        free += [s for s in beam_seqs if s not in live_seqs]
        new_seqs = []
        inherited = set()
        for parent in parents.tolist():
            if parent not in inherited and not (shared_prompt and live_seqs[parent] == prompt_seq):
                inherited.add(parent)
                new_seqs.append(live_seqs[parent])
            else:
                seq = free.pop()
                engine.seq_copy(live_seqs[parent], seq, -1, -1)
                new_seqs.append(seq)

        decode_started = time.perf_counter()
        engine.decode(tokens.tolist(), [length] * len(tokens), new_seqs, [True] * len(tokens))
        logits = np.stack([engine.logits(i) for i in range(len(tokens))])
        stats.decode_ms += (time.perf_counter() - decode_started) * 1000
        lse = log_normalizers(logits)
        stats.decode_steps += 1
        stats.decoded_tokens += len(tokens)
        stats.batch_sizes.append(len(tokens))
        length += 1
        live_scores, live_nodes, live_seqs = scores, nodes.astype(np.int64), new_seqs

    for seq in list(beam_seqs) + [graveyard]:
        engine.seq_clear(seq)  # frees only cells after the prompt's: the next search grows from there
    stats.search_ms += (time.perf_counter() - started) * 1000
    ranked = sorted((w.entry for w in finished), key=lambda e: (e.neg_score, e.title_index))
    return [(e.title_index, e.score) for e in ranked]


@dataclass(order=False)
class _Worst:
    """Heap item that puts the *worst* finished title on top, so the heap keeps the best k."""

    entry: Finished

    def __lt__(self, other: _Worst) -> bool:
        return self.entry.neg_score > other.entry.neg_score

    @property
    def neg_score(self) -> float:
        return self.entry.neg_score
