"""Collaborative priors for the fused search: ``P_CF(title | history)`` over a user's unseen titles.

The recommender ranks a title by ``log P_LM(title | history) + λ · log P_CF(title | history)`` (see
``search.py`` for how the prior enters the trie beam search). This module owns ``P_CF``:

- **sasrec**: the SASRec-CE baseline (``baselines.py``) exported to safetensors and run here in numpy,
  one history at a time (embeddings, ``blocks`` pre-LN attention blocks, final norm, tied output
  layer): no torch at serve time. A title's score is its best item's logit (duplicate titles merged).
- **pop**: log of (training interactions of the title + 1).

``P_CF`` is the softmax of those scores over the titles the user has *not* seen (seen titles get
probability 0), so it is a distribution over exactly the titles the search may return.

A prior is saved as a sidecar next to the GGUF it serves with: ``cf-prior.json`` (format, kind, λ, the
search variant, the catalog hash it is bound to, SASRec's config, how it was trained and tuned) and, for
SASRec, ``cf-prior.safetensors``. ``Recommender.open`` loads the sidecar of its model's directory; one
prior serves every quantization level of a model.

Leak-free by construction: both kinds learn from every user's items but the last two (the training part
of the validation split), so neither has seen a validation or test target.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .errors import CatalogMismatchError, CorruptModelError, NotFoundError, UsageError
from .jsonlog import read_json_object
from .recommend import check_prior_weight

PRIOR_FORMAT = "genrec-prior-v1"
SIDECAR_JSON = "cf-prior.json"
SIDECAR_WEIGHTS = "cf-prior.safetensors"
KINDS = ("sasrec", "pop")
VARIANTS = ("sum", "max", "rerank")
BUILD_VARIANT = "max"  # what build_prior makes (and --prior pop counts) by default: it beat sum (README)
DEFAULT_CANDIDATES = 50
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which baselines.SASRec uses


@dataclass(frozen=True)
class PriorConfig:
    """What travels with a model: which prior, how strongly (``weight`` = λ), how it enters the search.

    ``variant``, how ``log P_LM + λ · log P_CF`` is searched for:

    - ``sum`` (inside the search): a trie node carries the prior mass of the unseen titles below it;
    - ``max`` (inside the search, D3's choice): the largest single title's mass;
    - ``rerank``: the prior's top ``candidates`` unseen titles are scored exactly by the language model
      (one search restricted to them) and ranked by the fused score.

    ``sum`` and ``max`` telescope to ``λ · log P_CF(title)`` at a leaf, so they rank finished titles as
    ``rerank`` does; but a beam of 20 prunes by prefix scores in which the prior mass of a big subtree is an
    optimistic bound, and on the validation split it loses titles of higher fused score (README, Results).
    ``rerank`` is exact on its candidates and recommends only among them.
    """

    kind: str
    weight: float
    variant: str = "sum"
    catalog_sha256: str = ""
    candidates: int = DEFAULT_CANDIDATES  # rerank: how many of the prior's top titles are scored
    sasrec: dict | None = None  # SASRecConfig fields, for kind == "sasrec"
    trained_on: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)
    format: str = PRIOR_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown prior kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.variant not in VARIANTS:
            raise UsageError(f"unknown prior variant {self.variant!r}; use one of {', '.join(VARIANTS)}")
        check_prior_weight(self.weight)
        if not (isinstance(self.candidates, int) and not isinstance(self.candidates, bool) and self.candidates >= 1):
            raise UsageError(f"the prior's candidates must be a whole number >= 1 (got {self.candidates!r})")

    @classmethod
    def from_dict(cls, data: dict) -> PriorConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CorruptModelError(f"unknown keys in {SIDECAR_JSON}: {sorted(unknown)}")
        if data.get("format") != PRIOR_FORMAT:
            raise CorruptModelError(f"{SIDECAR_JSON}: unknown format {data.get('format')!r}")
        return cls(**data)


class CFPrior:
    """A loaded prior: title scores for a history, then log P_CF over the unseen titles."""

    def __init__(self, config: PriorConfig, titles: Sequence[str], item_title: np.ndarray,
                 item_index: dict[int, int], weights: dict[str, np.ndarray] | None = None,
                 title_log_counts: np.ndarray | None = None):
        self.config = config
        self.titles = tuple(titles)
        self.item_title = item_title  # catalog item position -> title index
        self.item_index = item_index  # item id -> catalog item position
        self.weights = weights
        self.title_log_counts = title_log_counts

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def weight(self) -> float:
        return self.config.weight

    @property
    def history_window(self) -> int:
        """How many of the most recent items the prior reads (0: none, popularity ignores the history)."""
        return int(self.config.sasrec["max_len"]) if self.kind == "sasrec" else 0

    def with_weight(self, weight: float, variant: str | None = None) -> CFPrior:
        config = replace(self.config, weight=float(weight), variant=variant or self.config.variant)
        return CFPrior(config, self.titles, self.item_title, self.item_index, self.weights, self.title_log_counts)

    # ------------------------------------------------------------------ scoring
    def title_scores(self, history_items: Sequence[int]) -> np.ndarray:
        """Unnormalised log-scores of every title (index = trie/catalog unique-title order)."""
        if self.kind == "pop":
            return self.title_log_counts
        positions = [self.item_index[i] for i in history_items if i in self.item_index]
        item_scores = sasrec_item_scores(self.weights, self.config.sasrec, positions)
        scores = np.full(len(self.titles), -np.inf)
        np.maximum.at(scores, self.item_title, item_scores)
        return scores

    def log_probs(self, history_items: Sequence[int], seen_titles: np.ndarray) -> np.ndarray:
        """log P_CF(title | history) for every title: a log-softmax over the unseen ones, -inf for seen.

        ``seen_titles``: a boolean mask over titles (or title indices) to exclude.
        """
        return masked_log_softmax(self.title_scores(history_items), seen_titles)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> Path:
        """Write the sidecar into ``directory`` (atomic per file); returns the JSON's path."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "sasrec":
            tmp = directory / (SIDECAR_WEIGHTS + ".tmp")
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}, str(tmp),
                      metadata={"format": PRIOR_FORMAT, "catalog_sha256": self.config.catalog_sha256})
            tmp.chmod(0o644)  # safetensors writes 0600; a shared install must be able to read it
            tmp.replace(directory / SIDECAR_WEIGHTS)
        else:
            (directory / SIDECAR_WEIGHTS).unlink(missing_ok=True)
        payload = asdict(self.config)
        if self.kind == "pop":
            payload["trained_on"] = dict(payload["trained_on"], title_counts=np.expm1(self.title_log_counts).round().astype(int).tolist())
        tmp = directory / (SIDECAR_JSON + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(directory / SIDECAR_JSON)
        return directory / SIDECAR_JSON

    @classmethod
    def load(cls, directory: Path, catalog: Catalog) -> CFPrior:
        """Load the sidecar in ``directory`` for ``catalog``; refuses a prior bound to another catalog."""
        directory = Path(directory)
        path = directory / SIDECAR_JSON
        if not path.is_file():
            raise NotFoundError(f"no collaborative prior in {directory} ({SIDECAR_JSON} is missing there; "
                                "`genrec-edge prior build --out DIR` makes one)")
        data = read_json_object(path, CorruptModelError, "collaborative prior")
        counts = (data.get("trained_on") or {}).get("title_counts")
        config = PriorConfig.from_dict(data)
        if config.catalog_sha256 != catalog.sha256:
            raise CatalogMismatchError(
                f"{path} was built for catalog {config.catalog_sha256[:12]}…, the database has {catalog.sha256[:12]}…"
            )
        titles, item_title, item_index = _title_maps(catalog)
        if config.kind == "pop":
            if not isinstance(counts, list) or len(counts) != len(titles):
                raise CorruptModelError(f"{path}: popularity prior without one count per title")
            return cls(config, titles, item_title, item_index, title_log_counts=np.log1p(np.asarray(counts, dtype=np.float64)))
        weights = _load_weights(directory / SIDECAR_WEIGHTS)
        _check_sasrec_shapes(weights, config.sasrec or {}, len(catalog), directory / SIDECAR_WEIGHTS)
        return cls(config, titles, item_title, item_index, weights=weights)


def has_sidecar(directory: Path) -> bool:
    return (Path(directory) / SIDECAR_JSON).is_file()


# ---------------------------------------------------------------------------------------- building
def _title_maps(catalog: Catalog) -> tuple[list[str], np.ndarray, dict[int, int]]:
    titles = catalog.unique_titles
    index = {t: j for j, t in enumerate(titles)}
    item_title = np.asarray([index[t] for t in catalog.titles], dtype=np.int64)
    item_index = {item: i for i, item in enumerate(catalog.item_ids)}
    return titles, item_title, item_index


def popularity_prior(sequences: Sequence[tuple[int, Sequence[int]]], catalog: Catalog, weight: float = 1.0,
                     variant: str = "sum") -> CFPrior:
    """Counts over every user's items but the last two (the validation split's training part)."""
    titles, item_title, item_index = _title_maps(catalog)
    counts = np.zeros(len(titles), dtype=np.float64)
    users = interactions = 0
    for _, seq in sequences:
        part = list(seq)[: max(0, len(seq) - 2)]
        users += bool(part)
        interactions += len(part)
        for item in part:
            counts[item_title[item_index[item]]] += 1
    if not interactions:
        raise UsageError("nothing to count: no user has 3 or more items (each user's last two are held out)")
    config = PriorConfig("pop", float(weight), variant, catalog.sha256,
                         trained_on={"part": "all but each user's last two items", "users": users,
                                     "interactions": interactions})
    return CFPrior(config, titles, item_title, item_index, title_log_counts=np.log1p(counts))


def sasrec_prior(model, weight: float = 1.0, variant: str = "sum") -> CFPrior:
    """Export a trained ``baselines.SASRecModel`` (torch) to a numpy prior."""
    catalog = model.catalog
    titles, item_title, item_index = _title_maps(catalog)
    weights = {name: t.detach().cpu().float().numpy().copy() for name, t in model.net.state_dict().items()}
    report = asdict(model.report) if getattr(model, "report", None) else {}
    config = PriorConfig("sasrec", float(weight), variant, catalog.sha256, sasrec=asdict(model.config),
                         trained_on={"part": "all but each user's last two items (early-stopped on valid HR@10)",
                                     **{k: report[k] for k in ("best_epoch", "epochs_run", "best_valid_hr10",
                                                               "seconds", "stopped_by") if k in report}})
    return CFPrior(config, titles, item_title, item_index, weights=weights)


def build_prior(kind: str, sequences, catalog: Catalog, weight: float = 1.0, variant: str = BUILD_VARIANT,
                progress: bool = True, **sasrec_overrides) -> CFPrior:
    """Train (SASRec) or count (popularity) a prior on the leak-free training part of ``sequences``.

    ``variant`` max is the shipped default's (README: it beat sum on the validation split)."""
    if kind == "pop":
        return popularity_prior(sequences, catalog, weight, variant)
    if kind == "sasrec":
        from .baselines import train_sasrec

        started = time.perf_counter()
        model = train_sasrec(list(sequences), catalog, progress=progress, **sasrec_overrides)
        prior = sasrec_prior(model, weight, variant)
        prior.config.trained_on.setdefault("seconds", round(time.perf_counter() - started, 1))
        return prior
    raise UsageError(f"unknown prior kind {kind!r}; use one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------- numpy SASRec
def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * weight + bias


def sasrec_item_scores(weights: dict[str, np.ndarray], config: dict, positions: Sequence[int]) -> np.ndarray:
    """Logits of every catalog item after the history (catalog item positions, oldest first).

    Mirrors ``baselines._build_net`` in eval mode (no dropout) for one left-padded row: padding
    positions neither attend nor are attended to, so only the real items are computed. The last block
    needs only the last position's query.
    """
    max_len, d, heads = int(config["max_len"]), int(config["hidden"]), int(config["heads"])
    emb = weights["item_emb.weight"]
    recent = np.asarray(list(positions)[-max_len:], dtype=np.int64) + 1  # index 0 is padding
    n = len(recent)
    if n == 0:  # an empty history: the model's view of "nothing yet" is every position padded
        x = np.zeros((1, d), dtype=np.float32)
        return _rows_dot(_layer_norm(x, weights["final_norm.weight"], weights["final_norm.bias"])[0], emb[1:])
    x = emb[recent] * np.float32(math.sqrt(d)) + weights["pos_emb.weight"][max_len - n:]
    head_dim = d // heads
    causal = np.tril(np.ones((n, n), dtype=bool))
    blocks = int(config["blocks"])
    for b in range(blocks):
        p = f"blocks.{b}."
        h = _layer_norm(x, weights[p + "attn_norm.weight"], weights[p + "attn_norm.bias"])
        qkv = _rows_dot(h, weights[p + "qkv.weight"]) + weights[p + "qkv.bias"]
        q, k, v = qkv[:, :d], qkv[:, d: 2 * d], qkv[:, 2 * d:]
        last = b == blocks - 1
        if last:  # only the final state is read: one query row
            q, x_rows, mask = q[-1:], x[-1:], causal[-1:]
        else:
            x_rows, mask = x, causal
        qh = q.reshape(len(q), heads, head_dim).transpose(1, 0, 2)
        kh = k.reshape(n, heads, head_dim).transpose(1, 0, 2)
        vh = v.reshape(n, heads, head_dim).transpose(1, 0, 2)
        att = np.einsum("hqd,hkd->hqk", qh, kh) / np.float32(math.sqrt(head_dim))
        att = np.where(mask[None], att, -np.inf)
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        out = np.einsum("hqk,hkd->hqd", att, vh).transpose(1, 0, 2).reshape(len(q), d)
        x = x_rows + _rows_dot(out, weights[p + "attn_out.weight"]) + weights[p + "attn_out.bias"]
        h = _layer_norm(x, weights[p + "ffn_norm.weight"], weights[p + "ffn_norm.bias"])
        h = np.maximum(_rows_dot(h, weights[p + "ffn.0.weight"]) + weights[p + "ffn.0.bias"], 0)
        x = x + _rows_dot(h, weights[p + "ffn.3.weight"]) + weights[p + "ffn.3.bias"]
    state = _layer_norm(x[-1], weights["final_norm.weight"], weights["final_norm.bias"])
    return _rows_dot(state, emb[1:])


def _rows_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` (``w`` as torch.nn.Linear stores it: one row per output) without BLAS: numpy's einsum loops
    sum each output in one fixed order, where OpenBLAS splits a product between as many threads as it runs
    (OPENBLAS_NUM_THREADS, Ray's single-thread workers) and the last bits of a score moved with them."""
    return np.einsum("...j,kj->...k", x, w)


def masked_log_softmax(scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """log-softmax of ``scores`` over the entries not in ``seen`` (bool mask or indices); -inf there."""
    out = np.asarray(scores, dtype=np.float64).copy()
    out[seen] = -np.inf
    peak = out.max()
    if not np.isfinite(peak):
        return np.full_like(out, -np.inf)
    return out - (peak + np.log(np.exp(out - peak).sum()))


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise NotFoundError(f"{path} is missing (the SASRec prior's weights)")
    try:
        return {k: v.astype(np.float32, copy=False) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptModelError(f"{path}: unreadable weights ({exc})") from None


def _check_sasrec_shapes(weights: dict[str, np.ndarray], config: dict, n_items: int, path: Path) -> None:
    try:
        d, max_len, blocks = int(config["hidden"]), int(config["max_len"]), int(config["blocks"])
        heads = int(config["heads"])
    except (KeyError, TypeError, ValueError):
        raise CorruptModelError(f"{path}: the prior's SASRec config is incomplete") from None
    expected = {"item_emb.weight": (n_items + 1, d), "pos_emb.weight": (max_len, d),
                "final_norm.weight": (d,), "final_norm.bias": (d,)}
    for b in range(blocks):
        p = f"blocks.{b}."
        expected.update({p + "attn_norm.weight": (d,), p + "attn_norm.bias": (d,), p + "qkv.weight": (3 * d, d),
                         p + "qkv.bias": (3 * d,), p + "attn_out.weight": (d, d), p + "attn_out.bias": (d,),
                         p + "ffn_norm.weight": (d,), p + "ffn_norm.bias": (d,), p + "ffn.0.weight": (d, d),
                         p + "ffn.0.bias": (d,), p + "ffn.3.weight": (d, d), p + "ffn.3.bias": (d,)})
    if heads < 1 or d % heads:
        raise CorruptModelError(f"{path}: hidden {d} is not divisible by heads {heads}")
    for name, shape in expected.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            got = None if name not in weights else tuple(weights[name].shape)
            raise CorruptModelError(f"{path}: tensor {name} has shape {got}, expected {shape} for this catalog")
