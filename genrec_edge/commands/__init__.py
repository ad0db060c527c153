"""CLI commands, one module per stage. Each defines ``register(app)`` and imports heavy code lazily."""

DB_HELP = "History database (default: the one `genrec-edge init` builds under GENREC_EDGE_HOME)."


def parse_users(users: str) -> int | None:
    """``--users N|all`` (evaluate, prior tune): None for all, else N >= 1; UsageError otherwise."""
    from ..errors import UsageError

    if users.strip().lower() == "all":
        return None
    try:
        count = int(users)
    except ValueError:
        raise UsageError(f"--users takes a number or 'all' (got {users!r})") from None
    if count < 1:
        raise UsageError(f"--users must be >= 1 or 'all' (got {count})")
    return count


def table_console(**kwargs):
    """A rich Console for tables on stdout: the terminal's width; where stdout is a file or a pipe (rich's 80
    columns, unless COLUMNS says otherwise), wide enough that no column is squeezed out or cut short.

    Markup is off: cells hold data (a title such as "[/x] Tag" crashed the command, "[bold]Bold" lost its
    brackets), printed as it is."""
    import os

    from rich.console import Console

    kwargs.setdefault("markup", False)
    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=max(console.width, 200), **kwargs)
    return console
