"""``genrec-edge recommend`` (catalog-constrained top-k on llama.cpp) and ``genrec-edge grammar export``."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import typer

from ..recommend import DEFAULT_K, DEFAULT_SAMPLE_TEMPERATURE, MAX_K, MAX_PRIOR_WEIGHT, SAMPLE_TRIES_PER_TITLE
from . import DB_HELP, table_console

MODEL_HELP = "GGUF model (default: the shipped fine-tuned default, built on first use)."
PRIOR_HELP = (
    "Collaborative prior fused into the search: none (the language model alone), pop (popularity counted "
    "from the database), sasrec (the model's cf-prior sidecar) or a directory holding a prior (`prior build "
    "--out DIR`). Default: the model's sidecar if it has one."
)
PRIOR_WEIGHT_HELP = "λ in log P_LM + λ·log P_CF (default: the weight tuned for the model's prior)."


def _check_user(db: Path | None, user: int) -> None:
    """Unknown user / empty history: the same errors ``Recommender.recommend`` raises, in milliseconds."""
    from ..errors import EmptyHistoryError
    from ..history import HistoryDB
    from ..paths import default_db

    with HistoryDB.open(Path(db) if db is not None else default_db(), readonly=True) as database:
        if not database.history(int(user), limit=1):
            raise EmptyHistoryError(f"user {user} has no history to recommend from")


OUT_HELP = (
    "Batch: the JSON-lines file to write (one line per user); an existing one is resumed if it was written "
    "with the same model, database and settings."
)
RAY_HELP = (
    "Batch on a Ray cluster (pip install 'genrec-edge\\[cluster]'): ADDRESS is local (connect to the cluster "
    "RAY_ADDRESS or `ray start` names, else start one here), auto (a running cluster) or ray://HEAD:10001. "
    "--threads is then per actor (default 1)."
)


def _filters(exclude, only, exclude_file, only_file) -> tuple[list[int], list[int] | None, dict]:
    """``--exclude`` + ``--exclude-file`` ids; ``--only`` + ``--only-file`` ids (None: neither given); and
    ``{(list, id): "FILE:LINE"}`` for the ids that come from a file alone (see :func:`_naming_files`)."""
    from ..batch import read_items_file

    origins: dict[tuple[str, int], str] = {}

    def from_file(name, given, path, allow_empty) -> list[int]:
        lines = read_items_file(path, allow_empty=allow_empty)
        given = set(given)
        origins.update({(name, i): f"{path}:{line}" for i, line in lines.items() if i not in given})
        return list(lines)

    exclude = list(exclude or []) + (from_file("exclude", exclude or [], exclude_file, True) if exclude_file else [])
    if not only and only_file is None:
        return exclude, None, origins
    # An --only-file with no id is refused unless --only gives some: from nothing, nothing can be recommended.
    return exclude, list(only or []) + (from_file("only", only or [], only_file, bool(only)) if only_file else []), \
        origins


@contextmanager
def _naming_files(origins: dict):
    """An unknown item id that came from --exclude-file / --only-file is reported with the file and line."""
    from ..errors import UnknownItemError

    try:
        yield
    except UnknownItemError as exc:
        where = origins.get((exc.field, exc.item))
        if where is None:
            raise
        raise UnknownItemError(f"{exc} ({where})", exc.item, exc.field) from None


def _batch(all_users, users_file, out, model, db, k, threads, beam, batch, prior, prior_weight, parquet, ray, actors,
           ship_model, workers, json_output, exclude, only) -> None:
    from ..batch import read_users_file, recommend_users
    from ..errors import UsageError

    if all_users and users_file is not None:
        raise UsageError("give --all-users or --users-file, not both")
    if out is None:
        raise UsageError("a batch run needs --out FILE.jsonl")
    if (actors is not None or ship_model) and ray is None:
        raise UsageError("--actors and --ship-model apply to --ray runs")
    users, user_filters = read_users_file(users_file) if users_file is not None else (None, None)
    report = recommend_users(
        db, out, users, users_source=str(users_file) if users_file else None, model=model, k=k, beam=beam,
        batch=batch, threads=threads, prior=prior, prior_weight=prior_weight, parquet=parquet,
        ray=None if ray is None else (True if ray == "local" else ray), actors=actors, ship_model=ship_model,
        workers=workers if workers is not None else "auto", exclude=exclude, only=only, user_filters=user_filters,
    )
    if json_output:
        payload = {**report.__dict__, "out": str(report.out), "parquet": str(report.parquet) if report.parquet else None}
        typer.echo(json.dumps(payload, indent=1))
        return
    errors = f", {report.errors} with nothing left to recommend" if report.errors else ""
    resumed = f" ({report.resumed} already there)" if report.resumed else ""
    processes = f" by {report.processes} processes" if report.processes > 1 else ""
    typer.echo(f"{report.out}: {report.users} users{resumed}, {report.written} written{processes} in "
               f"{report.seconds:.1f} s{errors}" + (f"; {report.parquet}" if report.parquet else ""))


class _SamplingBar:
    """A progress bar on stderr for --sample (tries drawn, distinct titles found, an ETA): at a low temperature
    it draws the same titles again and again, up to its tries."""

    def __init__(self, tries: int, k: int):
        from tqdm.auto import tqdm

        self.k = k
        self.bar = tqdm(total=tries, desc="sample", unit="try", leave=False, dynamic_ncols=True)

    def progress(self, tries: int, found: int) -> None:
        self.bar.set_postfix_str(f"{found}/{self.k} titles", refresh=False)
        self.bar.update(tries - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend(
        user: int = typer.Option(None, "--user", help="User id in the database."),
        history: list[str] = typer.Option(
            None, "--history", help="Recommend for these exact catalog titles instead of a user (oldest first)."
        ),
        more_titles: list[str] = typer.Argument(None, help="More --history titles.", show_default=False),
        k: int = typer.Option(DEFAULT_K, "--k", min=1, max=MAX_K, help="How many items."),
        model: Path = typer.Option(None, "--model", help=MODEL_HELP),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        threads: int = typer.Option(None, "--threads", min=1, help="Most CPU threads for llama.cpp (default: all cores; fewer while other programs keep cores busy)."),
        beam: int = typer.Option(None, "--beam", min=1, help="Beam width (default: max(10, 2k))."),
        sample: bool = typer.Option(False, "--sample", help="Sample titles with the catalog grammar instead of beam search."),
        seed: int = typer.Option(None, "--seed", help="Random seed for --sample \\[default: 0]: 0 to 4294967294; the same seed, the same titles."),
        temperature: float = typer.Option(None, "--temperature", help="Temperature for --sample, > 0 "
                                          f"\\[default: {DEFAULT_SAMPLE_TEMPERATURE:g}]."),
        prior: str = typer.Option(None, "--prior", help=PRIOR_HELP),
        prior_weight: float = typer.Option(None, "--prior-weight", min=0.0, max=MAX_PRIOR_WEIGHT, help=PRIOR_WEIGHT_HELP),
        exclude: list[int] = typer.Option(None, "--exclude", metavar="ITEM_ID", help="An item id not to recommend, "
                                          "besides the history's (repeat the option for more)."),
        only: list[int] = typer.Option(None, "--only", metavar="ITEM_ID", help="Recommend from these item ids "
                                       "alone (repeat the option for more)."),
        exclude_file: Path = typer.Option(None, "--exclude-file", help="Item ids not to recommend, one per line "
                                          "(with --exclude: both)."),
        only_file: Path = typer.Option(None, "--only-file", help="Recommend from the item ids in FILE alone, one "
                                       "per line (with --only: both)."),
        all_users: bool = typer.Option(False, "--all-users", help="Batch: every user with a history (needs --out)."),
        users_file: Path = typer.Option(None, "--users-file", help="Batch: the user ids in FILE, one per line; a "
                                        "line may also be {\"user\": 42, \"exclude\": [ids], \"only\": [ids]}: that "
                                        "user's own filters, on top of --exclude / --only."),
        out: Path = typer.Option(None, "--out", help=OUT_HELP),
        batch: int = typer.Option(1, "--batch", min=1, help="Batch: users searched together per llama_decode "
                                  "(the same results; faster only with cores to spare)."),
        parquet: bool = typer.Option(False, "--parquet", help="Batch: also write OUT as .parquet (needs pyarrow)."),
        workers: str = typer.Option(None, "--workers", metavar="N|auto", help="Batch: processes ranking users "
                                    "here, each with its own model (~410 MB resident at Q8_0); the same lines. auto: one "
                                    "single-thread process per core (per --threads cores if given), within half the free "
                                    "memory; 2 on 2 cores: ~1.28x the users/s of 1 (bench/results/process-split-2026-12-01.md) \\[default: auto]."),
        ray: str = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
        actors: int = typer.Option(None, "--actors", min=1, help="With --ray: actors, each with --threads CPUs "
                                   "(default: the cluster's CPUs / threads)."),
        ship_model: bool = typer.Option(False, "--ship-model", help="With --ray: send the model through Ray's "
                                        "object store instead of reading its path on every worker."),
    ) -> None:
        """Recommend the next items for a user: the top-k unseen catalog titles by model probability.

        Decoding is constrained to the catalog (a token trie), so every result is a real, unseen item.
        A title's score is log P_LM(title | history) + λ·log P_CF(title | history) when the model has a
        collaborative prior (--prior none for the language model alone).
        With --history, recommend for an ad-hoc list of titles instead of a database user.
        With --all-users or --users-file, recommend for many users into --out (JSON lines, one per user,
        appended as they come): the same command resumes after a crash; --ray runs it on a Ray cluster.
        --exclude / --only (and their files) then apply to every user.

        Example: genrec-edge recommend --user 42 --k 10
        Example: genrec-edge recommend --history "Toy Story (1995)" "Heat (1995)" --json
        Example: genrec-edge recommend --user 42 --exclude 1028 --exclude 2080
        Example: genrec-edge recommend --all-users --out recs.jsonl --only-file in-stock.txt
        """
        from ..errors import UsageError, refuse_options

        if all_users or users_file is not None:
            if user is not None or history or more_titles or sample or seed is not None or temperature is not None:
                raise UsageError("--all-users / --users-file do not combine with --user, --history or --sample "
                                 "(nor its --seed and --temperature)")
            if parquet and out is not None and out.suffix.lower() == ".parquet":
                raise UsageError(f"--out {out} would be overwritten by the .parquet copy: name --out FILE.jsonl "
                                 "(the copy goes next to it)")
            exclude, only, origins = _filters(exclude, only, exclude_file, only_file)
            with _naming_files(origins):
                _batch(all_users, users_file, out, model, db, k, threads, beam, batch, prior, prior_weight, parquet,
                       ray, actors, ship_model, workers, json_output, exclude, only)
            return
        batch_only = (("--out", out), ("--ray", ray), ("--actors", actors), ("--parquet", parquet or None),
                      ("--ship-model", ship_model or None), ("--workers", workers),
                      ("--batch", batch if batch != 1 else None))
        refuse_options((name for name, value in batch_only if value is not None),
                       "batch runs: add --all-users or --users-file FILE")
        if sample:
            for name, value in (("--beam", beam), ("--prior", prior), ("--prior-weight", prior_weight),
                                ("--only", only or None), ("--only-file", only_file)):
                if value is not None:
                    raise UsageError(f"{name} does not apply to --sample (it draws titles one at a time from "
                                     "the whole catalog, with no beam and no prior)")
            if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
                raise UsageError(f"--temperature must be a finite number > 0 with --sample (got {temperature:g}); "
                                 "for the most likely titles, drop --sample")
        else:
            refuse_options((name for name, value in (("--seed", seed), ("--temperature", temperature))
                            if value is not None), "--sample only")
        exclude, only, origins = _filters(exclude, only, exclude_file, only_file)  # after the options' own checks
        from ..recommend import Recommender

        titles = list(history or [])
        if more_titles:
            if not titles:
                raise UsageError(f"unexpected argument {more_titles[0]!r} (titles go after --history)")
            titles += list(more_titles)
        if (user is None) == (not titles):
            raise UsageError("give either --user or --history (one of them)")
        if user is not None:
            _check_user(db, user)  # before loading (or, the first time, building) a model
        bar = _SamplingBar(SAMPLE_TRIES_PER_TITLE * k, k) if sample else None
        with _naming_files(origins), Recommender.open(model, db, threads=threads, beam=beam, prior=prior,
                                                      prior_weight=prior_weight) as rec:
            try:
                result = rec.recommend(
                    user=user, history=titles or None, k=k, sample=sample, seed=seed or 0,
                    temperature=DEFAULT_SAMPLE_TEMPERATURE if temperature is None else temperature,
                    progress=bar.progress if bar else None, exclude=exclude, only=only,
                )
            finally:
                if bar:
                    bar.close()
            model_name = rec.engine.path.name
        if json_output:
            payload = {"user": user, "history": titles or None, "exclude": sorted(set(exclude)),
                       "only": sorted(set(only)) if only is not None else None, "model": model_name,
                       **result.to_dict()}
            typer.echo(json.dumps(payload, ensure_ascii=False, indent=1))
            return
        from rich.table import Table

        who = f"user {user}" if user is not None else f"a history of {len(titles)} titles"
        fused = f", prior {result.prior} λ={result.prior_weight:g}" if result.prior != "none" else ""
        table = Table(title=f"top {len(result.items)} for {who} ({model_name}{fused})")
        table.add_column("rank", justify="right")
        table.add_column("title")
        table.add_column("year", justify="right")
        table.add_column("genres")
        table.add_column("score" if not sample else "sampled", justify="right")
        for r in result.items:
            score = f"{r.score:.3f}" if r.score == r.score else "-"  # NaN for sampled titles
            table.add_row(str(r.rank), r.title, "" if r.year is None else str(r.year), ", ".join(r.genres), score)
        console = table_console(soft_wrap=False)
        console.print(table)
        t = result.timings
        prior_part = f"prior {t.prior_ms:.0f} ms · " if result.prior != "none" else ""
        console.print(
            f"prefill {t.prefill_ms:.0f} ms ({t.prompt_tokens} prompt tokens) · {prior_part}search {t.search_ms:.0f} ms "
            f"({t.decode_steps} steps, {t.decoded_tokens} tokens) · total {t.total_ms:.0f} ms",
            highlight=False,
        )
        if len(result.items) < k and sample:
            console.print(f"sampling drew only {len(result.items)} distinct unseen titles in {SAMPLE_TRIES_PER_TITLE * k} tries "
                          "(a higher --temperature varies more)", highlight=False)
        elif len(result.items) < k:
            console.print(f"only {len(result.items)} unseen catalog titles could be recommended", highlight=False)

    grammar_app = typer.Typer(help="The catalog as a GBNF grammar.", no_args_is_help=True)
    app.add_typer(grammar_app, name="grammar")

    @grammar_app.command("export")
    def export(
        out: Path = typer.Option(..., "--out", help="Where to write the .gbnf file."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    ) -> None:
        """Write the catalog as a GBNF grammar (language: exactly the catalog's titles) for llama.cpp tools.

        Example: genrec-edge grammar export --out catalog.gbnf
        """
        from ..errors import FileAccessError, UsageError
        from ..grammar import grammar_for_titles
        from ..history import HistoryDB
        from ..paths import default_db

        if out.is_dir():  # "exists (use --force ...)", then --force's "Is a directory": neither said what to do
            raise FileAccessError(f"cannot use {out}: it is not a file (a folder is there); --out names the .gbnf file")
        if out.exists() and not force:
            raise UsageError(f"{out} exists (use --force to overwrite)")
        if out.is_file() and _is_sqlite(out):
            raise UsageError(f"{out} is a SQLite database: not overwriting it with a grammar, even with --force")
        with HistoryDB.open(Path(db) if db is not None else default_db(), readonly=True) as database:
            catalog = database.catalog()
        titles = catalog.unique_titles
        if not titles:
            raise UsageError("the database has no items: nothing to export")
        text = grammar_for_titles(titles)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        rules = text.count("\n")
        typer.echo(f"wrote {out}: {len(titles)} titles, {rules} rules, {len(text.encode('utf-8'))} bytes")
