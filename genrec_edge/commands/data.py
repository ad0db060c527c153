"""``genrec-edge init``, ``data ingest``, ``data download`` and ``items search``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

from . import DB_HELP, table_console
from .history import open_db_for_reading


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Download and ingest datasets into the history database.", no_args_is_help=True)
    items_app = typer.Typer(help="Look up catalog items.", no_args_is_help=True)
    app.add_typer(data_app, name="data")
    app.add_typer(items_app, name="items")

    @app.command("init")
    def init(
        force: bool = typer.Option(False, "--force", help="Rebuild even if the database already exists."),
    ) -> None:
        """Build the default database from the bundled MovieLens ml-latest-small (a few seconds).

        A no-op when it already exists and is complete. Its place is GENREC_EDGE_HOME/default.db.

        Example: GENREC_EDGE_HOME=~/genrec genrec-edge init
        """
        from ..ingest import build_default_db
        from ..paths import default_db

        path = default_db()
        report = build_default_db(path, force=force)
        if report is None:
            typer.echo(f"{path} already exists and is complete (use --force to rebuild)")
        else:
            typer.echo(
                f"built {path}: {report.items} items, {report.users} users, "
                f"{report.interactions} interactions in {report.seconds:.1f} s"
            )

    @data_app.command("ingest")
    def ingest_command(
        fmt: str = typer.Argument(..., metavar="FORMAT", help="movielens-csv, movielens-dat, movielens-100k or csv; "
                                  "a MovieLens release name (ml-1m, ml-100k, ...) for its format; auto: detect "
                                  "it from the release folder's files."),
        path: Path = typer.Argument(None, help="The extracted release folder (for csv: base folder, optional)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        interactions: Path = typer.Option(None, "--interactions", help="csv: the interactions file."),
        items: Path = typer.Option(None, "--items", help="csv: the items file."),
        # None: not given (refused for the MovieLens formats); ingest.CSV_DEFAULTS, shown here, apply to csv.
        user_col: str = typer.Option(None, "--user-col", help="csv: user id column.", show_default="user_id"),
        item_col: str = typer.Option(None, "--item-col", help="csv: item id column of the interactions.",
                                     show_default="item_id"),
        time_col: str = typer.Option(None, "--time-col", help="csv: unix seconds or ISO date column.",
                                     show_default="timestamp"),
        rating_col: str = typer.Option(None, "--rating-col", help="csv: rating column (used if present).",
                                       show_default="rating"),
        title_col: str = typer.Option(None, "--title-col", help="csv: title column of the items.", show_default="title"),
        item_id_col: str = typer.Option(None, "--item-id-col", help="csv: item id column of the items.",
                                        show_default="item_id"),
        genres_col: str = typer.Option(None, "--genres-col", help="csv: '|'-joined genres (used if present).",
                                       show_default="genres"),
        delimiter: str = typer.Option(None, "--delimiter", help="csv: field separator, one character (\\t or tab: a "
                                      "tab).", show_default=","),
        encoding: str = typer.Option("auto", "--encoding", help="auto, utf-8 or latin-1."),
        dataset_name: str = typer.Option(None, "--dataset-name", help="Name in the datasets table (default: the folder; csv without one: the interactions file's name)."),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count malformed rows instead of stopping."),
        busy_timeout: float = typer.Option(5.0, "--busy-timeout", min=0.0, help="Seconds to wait for a locked database."),
    ) -> None:
        """Ingest a dataset into the history database, in one transaction (all or nothing).

        Re-ingesting the same data adds nothing. A malformed row stops the ingest with FILE:LINE and
        leaves the database as it was, unless --skip-bad.

        Example: genrec-edge data ingest ml-1m ~/data/ml-1m --db ml1m.db
        """
        from ..ingest import ingest
        from ..paths import default_db

        report = ingest(
            db if db is not None else default_db(), fmt, path, interactions=interactions, items=items,
            user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col, title_col=title_col,
            item_id_col=item_id_col, genres_col=genres_col, delimiter=delimiter, encoding=encoding,
            dataset_name=dataset_name, skip_bad=skip_bad, busy_timeout=busy_timeout,
        )  # fmt: skip
        typer.echo(
            f"{report.dataset}: {report.items} new items, {report.users} new users, "
            f"{report.interactions} new interactions{report.kept()}, {report.skipped} bad rows skipped "
            f"({report.seconds:.1f} s)"
        )

    @data_app.command("download")
    def download_command(
        name: str = typer.Argument(..., help="ml-latest-small, ml-latest, ml-100k, ml-1m, ml-10m, ml-20m or ml-25m."),
        dest: Path = typer.Option(None, "--dest", help="Folder for the zip and the extracted release "
                                  "(default: GENREC_EDGE_HOME/downloads)."),
        sha256: str = typer.Option(None, "--sha256", help="Expected sha256 (needed where none is pinned)."),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the checksum (prints the computed one)."),
        base_url: str = typer.Option(None, "--base-url", help="Mirror (default: $GENREC_EDGE_MOVIELENS_URL "
                                     "or files.grouplens.org)."),
    ) -> None:  # fmt: skip
        """Download a MovieLens release (resumable), verify its sha256 and extract it.

        Example: genrec-edge data download ml-1m && genrec-edge data ingest ml-1m ~/.local/share/genrec-edge/downloads/ml-1m
        """
        from ..download import download

        result = download(name, dest, sha256=sha256, no_verify=no_verify, base_url=base_url)
        verified = "verified" if result.verified else "NOT verified"
        typer.echo(f"{result.zip_path}: sha256 {result.sha256} ({verified})")
        database = result.folder.parent / f"{result.name}.db"  # its own: releases number their items differently
        typer.echo(f"extracted to {result.folder}; ingest with: genrec-edge data ingest {result.name} "
                   f"{shlex.quote(str(result.folder))} --db {shlex.quote(str(database))}")

    @items_app.command("search")
    def search(
        text: str = typer.Argument(..., help="Part of a title (case-insensitive)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        limit: int = typer.Option(20, "--limit", min=1, help="At most this many items."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Find catalog items whose title contains TEXT: exact match first, then prefix matches.

        Example: genrec-edge items search "matrix" --limit 5
        """
        with open_db_for_reading(db) as database:
            found = database.find_items(text, limit=limit)
        if json_output:
            records = [{"item_id": i.id, "title": i.title, "year": i.year, "genres": list(i.genres)} for i in found]
            typer.echo(json.dumps(records, ensure_ascii=False, indent=1))
            return
        if not found:
            typer.echo(f"no item title contains {text!r}")
            return
        from rich.table import Table

        table = Table(title=f"items matching {text!r}")
        table.add_column("item id", justify="right")
        table.add_column("title")
        table.add_column("genres")
        for item in found:
            table.add_row(str(item.id), item.title, ", ".join(item.genres))
        table_console(soft_wrap=False).print(table)
