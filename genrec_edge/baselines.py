"""Non-LLM baselines under the same protocol (``evaluation.py``): popularity and SASRec-CE.

Both take plain chronological sequences ``[(user, [item ids])]`` and a ``Catalog``, rank *titles*
(duplicate titles merged, a title's score is its best item's score) and never return a title the user has
already seen. Each ranker returns one item id per title, best first: the title's first item id. Both also
give a score matrix (``scores(examples)``, columns in ``Catalog.unique_titles`` order) for the vectorised
``evaluation.evaluate_scores``; their rankings are "by score, ties by title index" (the title's first item id).

Leak-free training data, by split:
- scoring the **test** split, a model may learn from every item but each user's last one;
- scoring the **valid** split, from every item but each user's last two.
Popularity counts exactly that part. SASRec always trains on all items but the last two (and early-stops
on the validation split), then scores test with the full history before the test item as input.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import Catalog
from .errors import CatalogMismatchError, CorruptModelError, NotFoundError, UsageError
from .evaluation import TitleSpace, evaluate_scores, seen_titles, top_k_titles
from .prompts import Example, leave_one_out

if TYPE_CHECKING:  # torch is imported lazily: popularity must not pay for it
    import torch

Sequences = Iterable[tuple[int, Sequence[int]]]

# How many items at the end of each sequence a split holds out from training.
HELD_OUT = {"test": 1, "valid": 2}


def training_part(sequences: Sequences, split: str) -> list[tuple[int, list[int]]]:
    """Each user's items a model may learn from when it is scored on ``split`` ("test" or "valid")."""
    if split not in HELD_OUT:
        raise UsageError(f"unknown split {split!r}; use one of {sorted(HELD_OUT)}")
    held_out = HELD_OUT[split]
    return [(user, list(seq)[: max(0, len(seq) - held_out)]) for user, seq in sequences]


def split_examples(sequences: Sequences, split: str) -> tuple[Example, ...]:
    """The leave-one-out examples of ``split`` (one per user who has one)."""
    loo = leave_one_out(sequences, train=False)
    if split == "test":
        return loo.test
    if split == "valid":
        return loo.valid
    raise UsageError(f"unknown split {split!r}; use one of {sorted(HELD_OUT)}")


def _check_items(sequences: Sequence[tuple[int, Sequence[int]]], catalog: Catalog) -> None:
    known = set(catalog.item_ids)
    for user, seq in sequences:
        for item in seq:
            if item not in known:
                raise NotFoundError(f"user {user} has item id {item}, which is not in the catalog")


# --------------------------------------------------------------------------------------------- popularity


@dataclass(frozen=True)
class PopularityRanker:
    """Titles by training-part interaction count (a title's count sums its items), unseen ones first.

    Ties are broken by the title's smallest item id, so the ranking is deterministic.
    """

    catalog: Catalog = field(repr=False)
    ranked_titles: tuple[str, ...] = field(repr=False)
    counts: dict[str, int] = field(repr=False)
    split: str = "test"

    def __post_init__(self) -> None:
        import numpy as np

        counts = [self.counts.get(t, 0) for t in self.catalog.unique_titles]
        # float32 holds every count up to 2**24 exactly (so ties stay ties) and halves the memory traffic.
        dtype = np.float32 if max(counts, default=0) <= 2**24 else np.float64
        vector = np.asarray(counts, dtype=dtype)
        vector.flags.writeable = False
        object.__setattr__(self, "_vector", vector)

    def scores(self, examples: Sequence[Example]):
        """Every title's training count for each example (one shared row, read-only), unique_titles order."""
        import numpy as np

        return np.broadcast_to(self._vector, (len(examples), len(self._vector)))

    def rank(self, example: Example, k: int | None = None) -> list[int]:
        """The ``k`` most popular titles the user has not seen (all of them if ``k`` is None), as item ids."""
        seen = seen_titles(example, self.catalog)
        out: list[int] = []
        for title in self.ranked_titles:
            if title in seen:
                continue
            out.append(self.catalog.title_to_items[title][0])
            if k is not None and len(out) >= k:
                break
        return out

    __call__ = rank


def popularity(sequences: Sequences, catalog: Catalog, split: str = "test") -> PopularityRanker:
    """Count each title's interactions in the training part of ``split`` and rank titles by count."""
    sequences = list(sequences)
    _check_items(sequences, catalog)
    counts: Counter[str] = Counter()
    for _, seq in training_part(sequences, split):
        counts.update(catalog.title_of(item) for item in seq)
    first_item = {title: items[0] for title, items in catalog.title_to_items.items()}
    ranked = sorted(catalog.title_to_items, key=lambda t: (-counts[t], first_item[t]))
    return PopularityRanker(catalog, tuple(ranked), {t: counts[t] for t in ranked}, split)


# ------------------------------------------------------------------------------------------------- SASRec


@dataclass(frozen=True)
class SASRecConfig:
    """SASRec-CE hyper-parameters: causal transformer, learned positions, softmax CE over the full catalog.

    ``patience`` counts validations (every ``eval_every`` epochs) without a better valid HR@10.
    ``max_seconds`` stops training after the first validation past that wall time (None: no limit).
    """

    hidden: int = 64
    heads: int = 1
    blocks: int = 2
    max_len: int = 200
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 32  # 610 users at 128 is only 5 steps an epoch: 32 learns far more per CPU-minute
    epochs: int = 200
    eval_every: int = 5
    patience: int = 3
    seed: int = 0
    threads: int = 2
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "hidden": self.hidden >= 1,
            "heads": self.heads >= 1 and self.hidden % self.heads == 0,
            "blocks": self.blocks >= 1,
            "max_len": self.max_len >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1,
            "eval_every": self.eval_every >= 1,
            "patience": self.patience >= 1,
            "threads": self.threads >= 1,
            # NaN compared False everywhere (no limit, and "NaN" in the saved JSON); a limit <= 0 is no training
            "max_seconds": self.max_seconds is None or (math.isfinite(self.max_seconds) and self.max_seconds > 0),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UsageError(
                f"invalid SASRec settings: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}"
                + (" (hidden must be divisible by heads)" if "heads" in bad else "")
            )

    @classmethod
    def from_dict(cls, data: dict) -> SASRecConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CorruptModelError(f"unknown SASRec config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainReport:
    """What training did: the epoch whose weights were kept, the validation curve, the wall time."""

    best_epoch: int
    best_valid_hr10: float
    epochs_run: int
    valid_hr10: dict[int, float]
    train_loss: dict[int, float]
    seconds: float
    stopped_by: str  # "epochs", "patience" or "max_seconds"


def _build_net(n_items: int, config: SASRecConfig):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        """Pre-LayerNorm self-attention + point-wise feed-forward, both residual (as in SASRec)."""

        def __init__(self) -> None:
            super().__init__()
            d = config.hidden
            self.attn_norm = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.attn_out = nn.Linear(d, d)
            self.ffn_norm = nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, d))
            self.drop = nn.Dropout(config.dropout)

        def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
            batch, length, d = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
            heads = [
                t.view(batch, length, config.heads, d // config.heads).transpose(1, 2) for t in (q, k, v)
            ]
            attended = F.scaled_dot_product_attention(
                *heads, attn_mask=allowed, dropout_p=config.dropout if self.training else 0.0
            )
            x = x + self.drop(self.attn_out(attended.transpose(1, 2).reshape(batch, length, d)))
            return x + self.drop(self.ffn(self.ffn_norm(x)))

    class SASRecNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Index 0 is padding; item index i+1 is catalog.item_ids[i]. The output layer is this same
            # embedding (tied), which is what lets a 64-d model score 10k items.
            self.item_emb = nn.Embedding(n_items + 1, config.hidden, padding_idx=0)
            self.pos_emb = nn.Embedding(config.max_len, config.hidden)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(config.blocks))
            self.final_norm = nn.LayerNorm(config.hidden)
            for param in self.parameters():
                if param.dim() == 2:
                    nn.init.xavier_normal_(param)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            """(batch, L) left-padded item indices -> (batch, L, hidden) states; L <= max_len."""
            length = seq.size(1)
            real = (seq != 0).unsqueeze(-1)
            positions = torch.arange(config.max_len - length, config.max_len)
            x = self.item_emb(seq) * math.sqrt(config.hidden) + self.pos_emb(positions)
            x = self.drop(x) * real
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            # A query sees earlier real items; a padding query sees itself, so that no attention row is
            # empty (an all-masked row makes softmax NaN, and the NaN would spread through the values).
            allowed = (causal & (seq != 0)[:, None, :]) | torch.eye(length, dtype=torch.bool)
            allowed = allowed[:, None]
            for block in self.blocks:
                x = block(x, allowed) * real
            return self.final_norm(x)

        def item_logits(self, states: torch.Tensor) -> torch.Tensor:
            """Scores of every catalog item (index 1..N) for each state row."""
            return states @ self.item_emb.weight[1:].T

    return SASRecNet()


SCORE_BATCH = 256  # histories per SASRec forward pass when scoring


class SASRecModel:
    """A trained SASRec with the catalog it was trained for; ranks titles, seen titles excluded."""

    WEIGHTS = "model.pt"
    CONFIG = "config.json"

    def __init__(self, net, config: SASRecConfig, catalog: Catalog, report: TrainReport | None = None):
        import torch

        self.net = net.eval()
        self.config = config
        self.catalog = catalog
        self.report = report
        self.index_of = {item: i + 1 for i, item in enumerate(catalog.item_ids)}
        titles = catalog.unique_titles
        self.title_ids = {t: j for j, t in enumerate(titles)}
        self.title_item = [catalog.title_to_items[t][0] for t in titles]
        # item index - 1 -> title index, so item scores reduce to title scores with one scatter.
        self.item_title = torch.tensor([self.title_ids[t] for t in catalog.titles], dtype=torch.long)

    def _inputs(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        import torch

        length = self.config.max_len
        batch = torch.zeros(len(histories), length, dtype=torch.long)
        for row, history in enumerate(histories):
            recent = [self.index_of[i] for i in list(history)[-length:]]
            if recent:
                batch[row, length - len(recent) :] = torch.tensor(recent)
        return batch

    def _title_scores(self, examples: Sequence[Example]) -> torch.Tensor:
        import torch

        _check_items([(ex.user, ex.history) for ex in examples], self.catalog)
        with torch.no_grad():
            states = self.net(self._inputs([ex.history for ex in examples]))[:, -1]
            item_scores = self.net.item_logits(states)
            n_titles = len(self.title_item)
            scores = torch.full((len(examples), n_titles), -math.inf)
            return scores.scatter_reduce(1, self.item_title.expand_as(item_scores), item_scores, "amax")

    def title_scores(self, examples: Sequence[Example]) -> torch.Tensor:
        """(len(examples), n_titles) scores from each full history; seen titles set to -inf."""
        scores = self._title_scores(examples)
        for row, ex in enumerate(examples):
            seen = [self.title_ids[t] for t in seen_titles(ex, self.catalog)]
            scores[row, seen] = -math.inf
        return scores

    def scores(self, examples: Sequence[Example], batch_size: int = SCORE_BATCH):
        """(len(examples), n_titles) float32 numpy scores from each full history (seen titles not masked).

        Computed ``batch_size`` histories at a time (attention memory grows with batch x max_len²).
        """
        import numpy as np

        examples = list(examples)
        out = np.empty((len(examples), len(self.title_item)), dtype=np.float32)
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            out[start : start + len(batch)] = self._title_scores(batch).numpy()
        return out

    def rank_many(
        self, examples: Sequence[Example], k: int | None = None, batch_size: int = SCORE_BATCH
    ) -> list[list[int]]:
        """Top-``k`` unseen titles (all of them if None) per example, as item ids, best first.

        Ties (equal scores) are broken by title index, as ``evaluation.top_k_titles`` does everywhere.
        """
        space = TitleSpace(self.catalog)
        out: list[list[int]] = []
        for start in range(0, len(examples), batch_size):
            batch = list(examples[start : start + batch_size])
            scores = self.scores(batch)
            seen_rows, seen_cols, _ = space.batch(batch)
            scores[seen_rows, seen_cols] = -math.inf
            top = top_k_titles(scores, scores.shape[1] if k is None else k)
            out.extend([self.title_item[j] for j in row if j >= 0] for row in top.tolist())
        return out

    def rank(self, example: Example, k: int | None = None) -> list[int]:
        return self.rank_many([example], k)[0]

    __call__ = rank

    def save(self, path: Path) -> Path:
        """Write ``model.pt`` (state dict) and ``config.json`` into the directory ``path``; refuses to overwrite."""
        import torch

        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"{path} exists and is not an empty directory; choose another --save path")
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), path / self.WEIGHTS)
        meta = {
            "config": asdict(self.config),
            "n_items": len(self.catalog),
            "catalog_sha256": self.catalog.sha256,
            "report": asdict(self.report) if self.report else None,
            "torch_version": torch.__version__,
        }
        (path / self.CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path, catalog: Catalog) -> SASRecModel:
        """Load a saved model; the catalog must be the one it was trained for (same sha256)."""
        import torch

        path = Path(path)
        if not (path / cls.CONFIG).is_file() or not (path / cls.WEIGHTS).is_file():
            raise NotFoundError(f"{path} is not a saved SASRec model (needs {cls.CONFIG} and {cls.WEIGHTS})")
        try:
            meta = json.loads((path / cls.CONFIG).read_text(encoding="utf-8"))
            config = SASRecConfig.from_dict(meta["config"])
            trained_for = meta["catalog_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptModelError(f"{path / cls.CONFIG}: unreadable SASRec config ({exc})") from None
        if trained_for != catalog.sha256:
            raise CatalogMismatchError(
                f"{path} was trained for catalog {trained_for[:12]}, not this one ({catalog.sha256[:12]})"
            )
        net = _build_net(len(catalog), config)
        try:
            net.load_state_dict(torch.load(path / cls.WEIGHTS, weights_only=True))
        except Exception as exc:  # truncated file, wrong shapes: all mean the same to the user
            raise CorruptModelError(f"{path / cls.WEIGHTS}: cannot load weights ({exc})") from None
        report = TrainReport(**meta["report"]) if meta.get("report") else None
        if report is not None:  # JSON turned the int epoch keys into strings
            report = TrainReport(
                **{
                    **asdict(report),
                    "valid_hr10": {int(e): v for e, v in report.valid_hr10.items()},
                    "train_loss": {int(e): v for e, v in report.train_loss.items()},
                }
            )
        return cls(net, config, catalog, report)


def train_sasrec(
    sequences: Sequences,
    catalog: Catalog,
    config: SASRecConfig | None = None,
    progress: bool = True,
    **overrides,
) -> SASRecModel:
    """Train SASRec-CE on each user's items but the last two; keep the epoch with the best valid HR@10.

    Each user contributes one training sequence, its last ``max_len + 1`` training items: item t+1 is
    predicted from items <= t at every position, with softmax cross-entropy over the whole catalog.
    ``overrides`` replace fields of ``config`` (e.g. ``epochs=20``).
    """
    import torch
    from tqdm.auto import tqdm

    config = _merged_config(config, overrides)
    sequences = list(sequences)
    _check_items(sequences, catalog)
    valid = split_examples(sequences, "valid")
    train = [seq for _, seq in training_part(sequences, "valid") if len(seq) >= 2]
    if not train:
        raise UsageError("no user has the 4 or more items SASRec needs (2 to train on, 1 valid, 1 test)")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        shuffler = torch.Generator().manual_seed(config.seed)
        net = _build_net(len(catalog), config)
        model = SASRecModel(net, config, catalog)
        tails = [seq[-(config.max_len + 1) :] for seq in train]
        inputs = model._inputs([tail[:-1] for tail in tails])  # left-padded, aligned on the right
        targets = model._inputs([tail[1:] for tail in tails])  # the next item at every position
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)

        start = time.perf_counter()
        best_hr, best_epoch, best_state = -1.0, 0, None
        valid_curve: dict[int, float] = {}
        loss_curve: dict[int, float] = {}
        stale, stopped_by, epoch = 0, "epochs", 0
        bar = tqdm(range(1, config.epochs + 1), desc="SASRec", unit="epoch", disable=not progress)
        for epoch in bar:
            net.train()
            order = torch.randperm(len(inputs), generator=shuffler)
            total, count = 0.0, 0
            for first in range(0, len(order), config.batch_size):
                rows = order[first : first + config.batch_size]
                batch_in, batch_target = inputs[rows], targets[rows]
                states = net(batch_in)
                real = batch_target != 0
                # Only real positions reach the (positions x catalog) logits matrix, the dominant cost.
                logits = net.item_logits(states[real])
                loss = torch.nn.functional.cross_entropy(logits, batch_target[real] - 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * int(real.sum())
                count += int(real.sum())
            loss_curve[epoch] = total / count
            postfix = {"loss": f"{loss_curve[epoch]:.3f}"}
            over_time = config.max_seconds is not None and time.perf_counter() - start > config.max_seconds
            if epoch % config.eval_every == 0 or epoch == config.epochs or over_time:
                net.eval()
                hr10 = _valid_hr10(model, valid, catalog) if valid else 0.0
                valid_curve[epoch] = hr10
                if hr10 > best_hr:
                    best_hr, best_epoch, stale = hr10, epoch, 0
                    best_state = {name: t.detach().clone() for name, t in net.state_dict().items()}
                else:
                    stale += 1
                if stale >= config.patience:
                    stopped_by = "patience"
            if valid_curve:
                last = valid_curve[max(valid_curve)]
                postfix.update({"valid HR@10": f"{last:.4f}", "best epoch": best_epoch})
            bar.set_postfix(postfix)
            if stopped_by == "patience":
                break
            if over_time:
                stopped_by = "max_seconds"
                break
        bar.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        report = TrainReport(
            best_epoch=best_epoch,
            best_valid_hr10=max(best_hr, 0.0),
            epochs_run=epoch,
            valid_hr10=valid_curve,
            train_loss=loss_curve,
            seconds=time.perf_counter() - start,
            stopped_by=stopped_by,
        )
        return SASRecModel(net, config, catalog, report)
    finally:
        torch.set_num_threads(previous_threads)


def _valid_hr10(model: SASRecModel, examples: Sequence[Example], catalog: Catalog) -> float:
    return evaluate_scores(model.scores, examples, catalog, ks=(10,), progress=False).hr[10]


def _merged_config(config: SASRecConfig | None, overrides: dict) -> SASRecConfig:
    base = asdict(config or SASRecConfig())
    unknown = set(overrides) - set(base)
    if unknown:
        raise UsageError(f"unknown SASRec settings: {sorted(unknown)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SASRecConfig(**base)
