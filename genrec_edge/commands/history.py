"""``genrec-edge history show`` and ``history add``: read and append a user's history."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import DB_HELP, table_console


def open_db_for_reading(db: Path | None, busy_timeout: float = 5.0):
    """Open ``db`` (default: paths.default_db()); read-only when the file is, so reads work on read-only files."""
    from ..history import HistoryDB, _is_read_only_file
    from ..paths import default_db

    path = Path(db) if db is not None else default_db()
    readonly = path.exists() and path.is_file() and _is_read_only_file(path)
    return HistoryDB.open(path, readonly=readonly, busy_timeout=busy_timeout)


def read_sequences(db: Path | None):
    """Every user's history (``HistoryDB.sequences()``, as a list) and the catalog of ``db``."""
    with open_db_for_reading(db) as history:
        return list(history.sequences()), history.catalog()


def open_db_for_writing(db: Path | None, busy_timeout: float = 5.0):
    from ..history import HistoryDB
    from ..paths import default_db

    return HistoryDB.open(Path(db) if db is not None else default_db(), busy_timeout=busy_timeout)


def _format_time(timestamp: int, zone: str = "") -> str:
    """A UTC date, or the raw number where it is none: timestamps are any int64 (ingest and the HTTP API take
    sequence numbers or milliseconds as the order key), and a date only covers years 1 to 9999."""
    import datetime

    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + zone
    except (ValueError, OverflowError, OSError):
        return f"{timestamp} (not a date)"


def register(app: typer.Typer) -> None:
    history_app = typer.Typer(help="Show and add to a user's history.", no_args_is_help=True)
    app.add_typer(history_app, name="history")

    @history_app.command("show")
    def show(
        user: int = typer.Option(..., "--user", help="User id."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        limit: int = typer.Option(None, "--limit", min=1, help="Show only the last N interactions."),
        json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        busy_timeout: float = typer.Option(5.0, "--busy-timeout", min=0.0, help="Seconds to wait for a locked database."),
    ) -> None:
        """Show a user's history, oldest first: time, item id, title, rating.

        Example: genrec-edge history show --user 42 --limit 10
        """
        with open_db_for_reading(db, busy_timeout) as database:
            history = database.history(user, limit=limit)
            total = len(history) if limit is None else len(database.history(user))
        if json_output:
            records = [
                {"timestamp": h.timestamp, "item_id": h.item_id, "title": h.title, "year": h.year,
                 "genres": list(h.genres), "rating": h.rating}
                for h in history
            ]  # fmt: skip
            typer.echo(json.dumps(records, ensure_ascii=False, indent=1))
            return
        if not history:
            typer.echo(f"user {user} has no interactions yet (add one with `genrec-edge history add`)")
            return
        from rich.table import Table

        shown = f"the last {len(history)} of {total}" if len(history) < total else f"{total}"
        table = Table(title=f"user {user}: {shown} interactions, oldest first")
        table.add_column("time (UTC)")
        table.add_column("item id", justify="right")
        table.add_column("title")
        table.add_column("rating", justify="right")
        for h in history:
            table.add_row(_format_time(h.timestamp), str(h.item_id), h.title, "" if h.rating is None else f"{h.rating:g}")
        table_console(soft_wrap=False).print(table)

    @history_app.command("add")
    def add(
        user: int = typer.Option(..., "--user", help="User id (created if new)."),
        item: int = typer.Option(None, "--item", help="Item id."),
        title: str = typer.Option(None, "--title", help="Exact catalog title (instead of --item)."),
        rating: float = typer.Option(None, "--rating", help="Rating, e.g. 4.5: within the lowest and highest the database already holds (0.5 to 5 for ml-latest-small)."),
        timestamp: int = typer.Option(None, "--timestamp", help="Unix seconds (default: now)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        busy_timeout: float = typer.Option(5.0, "--busy-timeout", min=0.0, help="Seconds to wait for a locked database."),
    ) -> None:
        """Record that a user interacted with an item (by id, or by its exact title).

        Example: genrec-edge history add --user 42 --title "Heat (1995)" --rating 4.5
        """
        from ..errors import NotFoundError, UsageError

        if (item is None) == (title is None):
            raise UsageError("give exactly one of --item ID or --title TITLE")
        with open_db_for_writing(db, busy_timeout) as database:
            if title is not None:
                matches = database.item_by_title(title)
                if not matches:
                    near = database.find_items(title, limit=5)
                    hint = "; did you mean: " + ", ".join(f"{i.title!r} (id {i.id})" for i in near) if near else ""
                    raise NotFoundError(f"no item titled {title!r}{hint}")
                if len(matches) > 1:
                    ids = ", ".join(str(i.id) for i in matches)
                    raise UsageError(f"title {title!r} matches {len(matches)} items (ids {ids}): use --item ID")
                item = matches[0].id
            added, created = database.record_interaction(user, item, timestamp=timestamp, rating=rating)
        when = _format_time(added.timestamp, " UTC")
        if created:
            typer.echo(f"user {user}: added item {added.item_id} {added.title!r} at {when}")
        else:  # the same user, item and timestamp: the first record stays, its rating included
            kept = "" if added.rating is None else f", rating {added.rating:g}"
            typer.echo(f"user {user}: item {added.item_id} {added.title!r} at {when} was already recorded{kept}; "
                       "kept as it was")
