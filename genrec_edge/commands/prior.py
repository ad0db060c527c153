"""``genrec-edge prior build|tune|show``: the collaborative prior fused into the LLM's search (cf.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from . import DB_HELP, parse_users, table_console
from .history import read_sequences

# How `prior build --kind sasrec` trains the prior (its recipe, not SASRecConfig's own defaults).
SASREC_PRIOR = {"max_seconds": None, "epochs": 200, "eval_every": 2, "patience": 4, "seed": 0}


def _sampled_valid(db: Path | None, n: int | None, seed: int):
    from ..baselines import split_examples
    from ..evalruns import sample_examples

    sequences, catalog = read_sequences(db)
    return sample_examples(split_examples(sequences, "valid"), n, seed), catalog


def register(app: typer.Typer) -> None:
    prior_app = typer.Typer(
        help="The collaborative prior (SASRec or popularity) the LLM's search fuses: log P_LM + λ·log P_CF.",
        no_args_is_help=True,
    )
    app.add_typer(prior_app, name="prior")

    @prior_app.command("build")
    def build(
        out: Path = typer.Option(..., "--out", help="Directory of the GGUF(s) it serves with (the sidecar goes there)."),
        kind: str = typer.Option("sasrec", "--kind", help="sasrec (trained here, CPU minutes) or pop (counted)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        weight: float = typer.Option(1.0, "--weight", min=0.0, help="λ until `prior tune` chooses one."),
        variant: str = typer.Option(
            "max", "--variant", help="max or sum (inside the search: the best title, D3, or the prior mass below a "
            "trie node) or rerank; max is the default model's (it beat sum on the validation split)."
        ),
        max_seconds: float = typer.Option(None, "--max-seconds", help="SASRec: stop after the first validation past this."),
        epochs: int = typer.Option(None, "--epochs", help="SASRec: most epochs (early stopping usually ends sooner) "
                                   f"\\[default: {SASREC_PRIOR['epochs']}]."),
        eval_every: int = typer.Option(None, "--eval-every", help="SASRec: validate every this many epochs "
                                       f"\\[default: {SASREC_PRIOR['eval_every']}]."),
        patience: int = typer.Option(None, "--patience", help="SASRec: validations without improvement before "
                                     f"stopping \\[default: {SASREC_PRIOR['patience']}]."),
        seed: int = typer.Option(None, "--seed", help=f"SASRec: random seed \\[default: {SASREC_PRIOR['seed']}]."),
        force: bool = typer.Option(False, "--force", help="Replace an existing prior in --out."),
    ) -> None:
        """Build a prior on the database's training part (each user's items but the last two) and save it
        next to a model as cf-prior.json (+ cf-prior.safetensors for SASRec), bound to the catalog.

        Example: genrec-edge prior build --kind sasrec --out models/ --db ml.db
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        from ..cf import SIDECAR_JSON, PriorConfig, build_prior
        from ..errors import UsageError, refuse_options
        from ..paths import check_can_make_folder

        # Before SASRec trains (minutes), not when its result is saved: the checks of the config it will save.
        PriorConfig(kind, weight, variant)
        check_can_make_folder(out)
        if (out / SIDECAR_JSON).exists() and not force:
            raise UsageError(f"{out / SIDECAR_JSON} exists (use --force to replace it)")
        given = {"max_seconds": max_seconds, "epochs": epochs, "eval_every": eval_every, "patience": patience,
                 "seed": seed}
        given = {name: value for name, value in given.items() if value is not None}
        if kind != "sasrec":
            refuse_options(("--" + name.replace("_", "-") for name in given),
                           f"--kind sasrec (a {kind} prior is counted, not trained)")
        options = {**SASREC_PRIOR, **given} if kind == "sasrec" else {}
        sequences, catalog = read_sequences(db)
        prior = build_prior(kind, sequences, catalog, weight=weight, variant=variant, **options)
        path = prior.save(out)
        typer.echo(f"wrote {path} ({prior.kind}, λ={prior.weight:g}, variant {prior.config.variant})")

    @prior_app.command("tune")
    def tune(
        model: Path = typer.Option(None, "--model", help="GGUF (default: the default model)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        prior_dir: Path = typer.Option(None, "--prior-dir", help="Directory of the prior to tune (default: the model's)."),
        users: str = typer.Option("200", "--users", help="Validation users: N (a seeded sample) or all."),
        seed: int = typer.Option(0, "--seed", help="Seed of the user sample."),
        weights: str = typer.Option("0,0.25,0.5,0.75,1,1.5,2,3,5", "--weights", help="λ grid, comma-separated."),
        n_lm: int = typer.Option(20, "--n-lm", min=1, help="Candidates from the LLM's own top list."),
        n_cf: int = typer.Option(50, "--n-cf", min=1, help="Candidates from the prior's top list."),
        threads: int = typer.Option(None, "--threads", min=1, help="Most CPU threads for llama.cpp (fewer while other programs keep cores busy)."),
        variant: str = typer.Option(
            None, "--variant",
            help="How the prior will be served: sum or max (inside the search) or rerank (its top --n-cf "
            "titles re-scored); λ is chosen for it and it is written too (default: the prior's own).",
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the table; do not write λ into the prior."),
    ) -> None:
        """Choose λ on the VALIDATION split (never the test split) and write it into the prior's JSON.

        Per user, the LLM's top titles and the prior's top titles are scored exactly by the LLM, then ranked
        by log P_LM + λ·log P_CF for every λ of the grid (genrec_edge/tune.py); λ with the best NDCG@10 wins.
        Check it with the real fused search: genrec-edge evaluate --split valid.

        Example: genrec-edge prior tune --model models/model-Q8_0.gguf --users 200
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        from dataclasses import replace

        from ..cf import SIDECAR_JSON, VARIANTS, CFPrior
        from ..errors import UsageError
        from ..models import default_model_path
        from ..paths import default_db
        from ..recommend import MAX_PRIOR_WEIGHT, Recommender, check_prior_weight
        from ..tune import tune_weight

        try:
            grid = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise UsageError(f"--weights must be comma-separated numbers (got {weights!r})") from None
        for w in grid:  # before the costly part, not after it
            try:
                check_prior_weight(w)
            except UsageError:
                raise UsageError(f"--weights: {w:g} is not a λ (a number from 0 to {MAX_PRIOR_WEIGHT:g})") from None
        grid = list(dict.fromkeys(grid))
        if len(grid) < 2:
            raise UsageError("--weights needs two or more different λ to choose from")
        n_users = parse_users(users)
        db_path = db if db is not None else default_db()
        examples, catalog = _sampled_valid(db_path, n_users, seed)
        model_path = model if model is not None else default_model_path()
        directory = prior_dir if prior_dir is not None else model_path.parent
        prior = CFPrior.load(directory, catalog)
        variant = variant or prior.config.variant
        if variant not in VARIANTS:
            raise UsageError(f"--variant is one of {', '.join(VARIANTS)} (got {variant!r})")
        with Recommender.open(model_path, db_path, threads=threads, prior="none", warn=lambda m: None) as rec:
            result = tune_weight(rec, prior, examples, catalog, grid, n_lm=n_lm, n_cf=n_cf, rerank=variant == "rerank")
        from rich.table import Table

        table = Table(title=f"λ for the {prior.kind} prior on {result.n_users} validation users "
                            f"(candidates hold the target for {result.candidates_hold_target:.1%})")
        for column in ("λ", "HR@10", "NDCG@10", f"top-{n_cf} rerank HR@10", "rerank NDCG@10"):
            table.add_column(column, justify="right")
        for row in result.table():
            mark = " *" if result.decisive and row["weight"] == result.best_weight else ""
            table.add_row(f"{row['weight']:g}{mark}", f"{row['HR@10']:.4f}", f"{row['NDCG@10']:.4f}",
                          f"{row['rerank HR@10']:.4f}", f"{row['rerank NDCG@10']:.4f}")
        table_console().print(table)
        from ..stats import SMALL_SAMPLE, SMALL_SAMPLE_NOTE

        if result.n_users < SMALL_SAMPLE:
            typer.echo("note: " + SMALL_SAMPLE_NOTE.format(users=result.n_users) + "; a λ chosen on them is close to "
                       "a guess.")
        if dry_run:
            if not result.decisive:
                typer.echo(f"every λ scored the same on these {result.n_users} users: none is chosen (* marks a "
                           "choice); tune on more users (--users)")
            return
        if not result.decisive:  # the tie went to the smallest λ: writing it would switch the prior off
            raise UsageError(f"every λ scored the same on these {result.n_users} users: nothing to choose from, so "
                             f"nothing written (λ stays {prior.config.weight:g}); tune on more users (--users)")
        metric = f"NDCG@10 of the prior's top {n_cf} re-ranked" if variant == "rerank" else \
            f"NDCG@10 of the LLM's top {n_lm} and the prior's top {n_cf} re-ranked (approximates the search)"
        tuned = {"split": "valid", "users": result.n_users, "seed": seed, "metric": metric, "n_lm": n_lm,
                 "n_cf": n_cf, "model": model_path.name, "seconds": round(result.seconds, 1), "table": result.table()}
        config = replace(prior.config, weight=result.best_weight, variant=variant, tuned=tuned,
                         candidates=n_cf if variant == "rerank" else prior.config.candidates)
        prior = CFPrior(config, prior.titles, prior.item_title, prior.item_index, prior.weights, prior.title_log_counts)
        prior.save(directory)
        typer.echo(f"λ = {result.best_weight:g} ({variant}) written to {directory / SIDECAR_JSON}")

    @prior_app.command("show")
    def show(
        model: Path = typer.Option(None, "--model", help="GGUF (default: the default model)."),
        prior_dir: Path = typer.Option(None, "--prior-dir", help="Directory of the prior (default: the model's)."),
    ) -> None:
        """Print the prior a model serves with: kind, λ, variant, how it was trained and tuned.

        Example: genrec-edge prior show --model models/model-Q8_0.gguf
        """
        from ..cf import SIDECAR_JSON
        from ..errors import CorruptModelError, NotFoundError
        from ..jsonlog import read_json_object
        from ..models import default_model_path, require_model_file

        if prior_dir is not None and model is not None:
            from ..errors import UsageError

            raise UsageError("give --model (its prior sits next to it) or --prior-dir, not both")
        if model is not None:
            require_model_file(model)  # its sidecar sits next to it; a directory goes in --prior-dir
        directory = prior_dir if prior_dir is not None else (model if model is not None else default_model_path()).parent
        path = directory / SIDECAR_JSON
        if not path.is_file():
            raise NotFoundError(f"no prior at {path}")
        data = read_json_object(path, CorruptModelError, "collaborative prior")
        if isinstance(data.get("trained_on"), dict):
            data["trained_on"].pop("title_counts", None)
        typer.echo(json.dumps(data, indent=1, ensure_ascii=False))
