"""LoRA (or full) sequence training of a LLaMA base on users' histories, validated by the runtime's search.

Training is SASRec-style: each user's training part of the chronological sequence (``prompts.leave_one_out``:
the validation and test targets held out) is cut into windows of ``history_len + 1`` titles, and one
forward pass per window puts the loss on every title (+ EOS). The window's last title sees exactly the
inference prompt, so training and serving agree token for token. The loss is the plain LM loss or the
trie-masked one (softmax over the tokens the catalog trie allows). Validation is HR@10 / NDCG@10 on the
validation split by the runtime's constrained beam search over the runtime's catalog trie, batched on the
model's device. The best model by validation is kept; runs checkpoint and resume exactly.

Modules, in the order a run uses them:

========================  ==================================================================================
``config``                :class:`TrainConfig`, ``resolve_config`` (defaults < config file < options)
``data``                  the split as titles, windows (+ trie nodes), length-bucketed batches, padding
``trie_view``             a torch view of ``genrec_edge.trie.CatalogTrie`` (the one catalog trie)
``loss``                  plain and trie-masked loss on a batch
``search``                the batched exact trie beam search (``rank_titles``) and the ``Validator``
``checkpoints``           the best model, the resumable checkpoint
``loop``                  ``LoopState``, the epoch/step loop, validation and checkpoint scheduling
``trainer``               ``train`` / ``train_on_sequences``: set a run up and run it
========================  ==================================================================================

The run directory's files are ``genrec_edge.runs``'. ``python -m genrec_edge.train`` (and ``accelerate
launch -m genrec_edge.train``) takes ``genrec-edge train``'s flags.
"""

from .config import DEFAULT_TARGET_MODULES, LOSSES, TrainConfig, check_config, resolve_config
from .data import (
    BucketBatchSampler,
    PadCollator,
    Window,
    build_windows,
    split_for_training,
    title_nodes,
    trie_edges,
)
from .loop import LoopState, TrainResult
from .loss import batch_loss, trie_masked_loss
from .search import TOP_K, Validator, rank_titles, ranking_metrics, search_titles
from .trainer import train, train_on_sequences
from .trie_view import TrieTensors, build_catalog_trie

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LOSSES",
    "TOP_K",
    "BucketBatchSampler",
    "LoopState",
    "PadCollator",
    "TrainConfig",
    "TrainResult",
    "TrieTensors",
    "Validator",
    "Window",
    "batch_loss",
    "build_catalog_trie",
    "build_windows",
    "check_config",
    "rank_titles",
    "ranking_metrics",
    "resolve_config",
    "search_titles",
    "split_for_training",
    "title_nodes",
    "train",
    "train_on_sequences",
    "trie_edges",
    "trie_masked_loss",
]
