"""A torch view of the runtime's catalog trie (``genrec_edge.trie.CatalogTrie``) for batched GPU work.

The trainer has no trie of its own: validation's beam search and the trie-masked loss read the same CSR
arrays the runtime walks (``child_offsets`` / ``child_token`` / ``child_node``, ``leaf_title``), moved to
the model's device once. What the runtime does per beam in numpy, this does for a whole batch of rows in
a few tensor ops:

* :meth:`TrieTensors.expand` lists every (row, token, child) edge out of a tensor of nodes;
* :meth:`TrieTensors.child` finds the child of (node, token) pairs by binary search over the edges, whose
  CSR order is already sorted by (parent, token);
* :meth:`TrieTensors.unseen_mask` is ``CatalogTrie.unseen_counts(seen) > 0`` per user: a node with no
  unseen title below it is "blocked", so a search never enters it (and a colliding title, unreachable in
  the trie, is unreachable here too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import CorruptModelError
from ..trie import CatalogTrie


def build_catalog_trie(titles: Sequence[str], tokenize, eos_id: int) -> CatalogTrie:
    """The runtime's trie over ``tokenize(title, False) + [EOS]`` (``tokenize`` as in ``prompts.Tokenize``)."""
    try:
        return CatalogTrie.build(titles, lambda text: tokenize(text, False), eos_id)
    except ValueError as exc:  # a title that tokenizes to EOS
        raise CorruptModelError(f"cannot build the catalog trie with this tokenizer: {exc}") from None


class TrieTensors:
    """``trie``'s arrays as int64 tensors on ``device``; see the module docstring."""

    def __init__(self, trie: CatalogTrie, device="cpu"):
        import torch

        self.trie = trie
        self.device = torch.device(device)
        self.eos_id = trie.eos_id
        self.n_nodes = trie.n_nodes
        self.max_depth = trie.max_depth

        def tensor(array: np.ndarray):
            return torch.as_tensor(np.asarray(array, dtype=np.int64), device=self.device)

        self.child_offsets = tensor(trie.child_offsets)
        self.child_token = tensor(trie.child_token)
        self.child_node = tensor(trie.child_node)
        self.leaf_title = tensor(trie.leaf_title)
        self.child_count = self.child_offsets[1:] - self.child_offsets[:-1]
        # Edges in CSR order are grouped by parent and sorted by token within one: their keys ascend.
        self.key_base = int(trie.child_token.max(initial=-1)) + 1
        self.edge_key = tensor(trie.parent[trie.child_node]) * self.key_base + self.child_token
        if len(self.edge_key) > 1 and not bool((self.edge_key[1:] > self.edge_key[:-1]).all()):
            raise CorruptModelError("the catalog trie's children are not sorted by token")
        leaves = np.nonzero(trie.child_offsets[1:] == trie.child_offsets[:-1])[0]
        self.childless_node = int(leaves[0]) if len(leaves) else 0  # where dead beams park

    def expand(self, nodes):
        """Every (row, token, child) edge out of ``nodes[row]``, as three flat tensors in row order."""
        import torch

        counts = self.child_count[nodes]
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        offset_in_row = torch.arange(len(rows), device=nodes.device) - torch.repeat_interleave(starts, counts)
        edge = torch.repeat_interleave(self.child_offsets[nodes], counts) + offset_in_row
        return rows, self.child_token[edge], self.child_node[edge]

    def child(self, nodes, tokens):
        """The child of each (node, token) pair; the pair must be an edge of the trie."""
        import torch

        keys = nodes * self.key_base + tokens
        found = torch.searchsorted(self.edge_key, keys).clamp(max=len(self.edge_key) - 1)
        return self.child_node[found]

    def unseen_mask(self, seen_title_indices: Sequence[Iterable[int]]):
        """Bool ``(users, nodes)``: True where the node still has a title the user has not seen."""
        import torch

        rows = [self.trie.unseen_counts(list(seen)) > 0 for seen in seen_title_indices]
        stacked = np.stack(rows) if rows else np.zeros((0, self.n_nodes), dtype=bool)
        return torch.as_tensor(stacked, device=self.device)
