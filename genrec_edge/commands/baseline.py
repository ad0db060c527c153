"""``genrec-edge baseline pop|sasrec``: score the non-LLM baselines under the evaluation protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from . import DB_HELP, table_console
from .history import read_sequences

SPLIT_HELP = "Which leave-one-out target to score: test (last item) or valid (second-to-last)."


def _passive_openmp() -> None:
    # Under CPU contention OpenMP's default spin-wait makes 2-thread torch 10-30x slower (measured: a
    # 15-epoch toy SASRec run took 89 s instead of 3 s). libgomp reads this once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def _report(name: str, split: str, result, as_json: bool, extra: dict | None = None) -> None:
    from ..stats import CONFIDENCE, SMALL_SAMPLE, SMALL_SAMPLE_NOTE, choose_method, mean_intervals

    intervals = mean_intervals(result.per_user(list(result.summary())))
    if as_json:
        payload = {"baseline": name, "split": split, **result.to_dict(per_user=False), **(extra or {})}
        payload["intervals"] = {m: {"low": e.to_dict()["low"], "high": e.to_dict()["high"]}
                                for m, e in intervals.items()}
        payload["interval"] = {"confidence": CONFIDENCE, "method": f"bootstrap ({choose_method(result.n_users)})"}
        typer.echo(json.dumps(payload, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{name} on the {split} split ({result.n_users} users, full-catalog ranking)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column(f"{CONFIDENCE:.0%} interval (bootstrap over users)", justify="right")
    for metric, value in result.summary().items():
        low, high = intervals[metric].low, intervals[metric].high
        table.add_row(metric, f"{value:.4f}", f"[{low:.4f}, {high:.4f}]" if low == low else "—")
    for key, value in (extra or {}).items():
        table.add_row(key, str(value))
    console = table_console()
    console.print(table)
    if result.n_users < SMALL_SAMPLE:
        console.print("note: " + SMALL_SAMPLE_NOTE.format(users=result.n_users) + ".", highlight=False)


def _examples(sequences, split: str, db: Path | None):
    """The split's examples; none is an error, as in ``evaluate`` (not metrics of 0 on 0 users)."""
    from ..baselines import split_examples
    from ..errors import UsageError

    examples = split_examples(sequences, split)
    if not examples:
        raise UsageError(f"no user has a {split} example in {db or 'the default database'} "
                         "(a user needs 3 or more items)")
    return examples


def register(app: typer.Typer) -> None:
    baseline_app = typer.Typer(
        help="Non-LLM baselines (popularity, SASRec) scored like the LLM: leave-one-out, full catalog.",
        no_args_is_help=True,
    )
    app.add_typer(baseline_app, name="baseline")

    @baseline_app.command("pop")
    def pop(
        db: Path | None = typer.Option(None, help=DB_HELP),
        split: str = typer.Option("test", help=SPLIT_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout (progress stays on stderr)."),
    ) -> None:
        """Most popular unseen titles, counted on the training part of the split only.

        Prints HR@1/5/10, NDCG@1/5/10 and MRR with 95% bootstrap intervals over users.

        Example: genrec-edge baseline pop --db movies.db --split test
        """
        from ..baselines import popularity
        from ..evaluation import evaluate_scores

        sequences, catalog = read_sequences(db)
        examples = _examples(sequences, split, db)
        ranker = popularity(sequences, catalog, split=split)
        result = evaluate_scores(ranker.scores, examples, catalog)
        _report("popularity", split, result, as_json)

    @baseline_app.command("sasrec")
    def sasrec(
        db: Path | None = typer.Option(None, help=DB_HELP),
        split: str = typer.Option("test", help=SPLIT_HELP),
        epochs: int = typer.Option(200, help="Most epochs to train (early stopping usually ends sooner)."),
        max_len: int = typer.Option(200, help="Most recent items the model reads."),
        hidden: int = typer.Option(64, help="Embedding and hidden size."),
        heads: int = typer.Option(1, help="Attention heads (hidden must be divisible by it)."),
        batch_size: int = typer.Option(32, help="Sequences per training step."),
        eval_every: int = typer.Option(5, help="Validate (HR@10 on the valid split) every this many epochs."),
        patience: int = typer.Option(3, help="Validations without improvement before stopping."),
        max_seconds: float | None = typer.Option(
            None, help="Stop after the first validation past this time."
        ),
        seed: int = typer.Option(0, help="Random seed (weights, shuffling, dropout)."),
        save: Path | None = typer.Option(None, help="Save the trained model into this new directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout (progress stays on stderr)."),
    ) -> None:
        """Train SASRec-CE (early-stopped on valid HR@10), then score it with seen titles masked.

        --split valid scores the split it was early-stopped on (optimistic): tune on it, report test.

        Example: genrec-edge baseline sasrec --db movies.db --epochs 50 --save sasrec-ml
        """
        _passive_openmp()
        from ..baselines import SASRecModel, train_sasrec
        from ..errors import UsageError
        from ..evaluation import evaluate_scores

        if save is not None:  # before the training, not when its result is saved
            from ..paths import check_can_make_folder

            check_can_make_folder(save)  # a file there, or on the way: exit 14
        if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
            raise UsageError(f"{save} exists and is not an empty directory; choose another --save path")
        sequences, catalog = read_sequences(db)
        examples = _examples(sequences, split, db)  # validates --split before the long training
        model: SASRecModel = train_sasrec(
            sequences,
            catalog,
            epochs=epochs,
            max_len=max_len,
            hidden=hidden,
            heads=heads,
            batch_size=batch_size,
            eval_every=eval_every,
            patience=patience,
            max_seconds=max_seconds,
            seed=seed,
        )
        result = evaluate_scores(model.scores, examples, catalog)
        report = model.report
        extra = {
            "best_epoch": report.best_epoch,
            "epochs_run": report.epochs_run,
            "best_valid_hr10": round(report.best_valid_hr10, 4),
            "stopped_by": report.stopped_by,
            "train_seconds": round(report.seconds, 1),
        }
        if save is not None:
            extra["saved_to"] = str(model.save(save))
        _report("SASRec", split, result, as_json, extra)
