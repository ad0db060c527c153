"""The ``genrec-edge`` command: a thin dispatcher over the library.

Each stage's commands live in ``genrec_edge/commands/<stage>.py``; those modules import only typer at
import time and import their stage's module inside the command body, so ``genrec-edge --help`` stays fast.
Every :class:`~genrec_edge.errors.GenrecError` becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading

import typer

from .errors import FileAccessError, GenrecError

COMMAND_MODULES = (
    "data",
    "history",
    "prompts",
    "baseline",
    "evaluate",
    "train",
    "convert",
    "recommend",
    "prior",
    "bench",
    "serve",
    "doctor",
)

app = typer.Typer(
    name="genrec-edge",
    help="LLM generative recommendation on a laptop: a LoRA-tuned LLaMA served by llama.cpp, "
    "constrained to your catalog.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    # An option callback: the group's own callback runs only before a command, so `--version` alone would
    # be "Missing command".
    if value:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    pass


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f".commands.{_name}", __package__)
    except ModuleNotFoundError as exc:  # a stage not built yet
        if exc.name != f"{__package__}.commands.{_name}":
            raise
        continue
    _module.register(app)


def error_line(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def file_access_message(exc: OSError) -> str:
    """``cannot use PATH: No such file or directory``, from the OSError a file operation raised."""
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileExistsError) and exc.filename is not None and os.path.isfile(exc.filename):
        reason = "a file is there, where a folder is needed"  # mkdir(parents=True) met a file on the way
    return f"cannot use {names}: {reason}" if names else f"file access failed: {reason}"


class Stopped(BaseException):
    """Ctrl-C or SIGTERM, raised in place of KeyboardInterrupt (which click and typer swallow with a blank
    line) and of the default SIGTERM death (which skips every cleanup: a first ingest left an empty
    database). A BaseException, so ``except Exception`` does not stop it and ``finally`` blocks run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_signals():
    """Ctrl-C and SIGTERM raise :class:`Stopped` while a command runs, where the process handles them as
    Python does by default (a job started with them ignored, `cmd &`, keeps ignoring them); then the
    handlers before are back. Only the main thread can set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {sig: signal.getsignal(sig) for sig in defaults}
    for sig, default in defaults.items():
        if previous[sig] is default:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning our errors into one line and an exit code."""
    try:
        with _stop_signals():
            app(args=argv, prog_name="genrec-edge", standalone_mode=True)
    except GenrecError as exc:
        error_line(str(exc))
        return exc.exit_code
    except (KeyboardInterrupt, Stopped) as exc:
        terminated = isinstance(exc, Stopped) and exc.signum == signal.SIGTERM
        error_line("terminated" if terminated else "interrupted")
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except OSError as exc:  # a path the command cannot use: one line naming it, not an internal error
        error_line(file_access_message(exc))
        return FileAccessError.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # a bug: still one line unless debugging
        if os.environ.get("GENREC_EDGE_DEBUG"):
            raise
        error_line(f"internal error ({type(exc).__name__}): {exc}. Set GENREC_EDGE_DEBUG=1 for a traceback.")
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
