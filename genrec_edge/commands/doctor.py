"""``genrec-edge doctor``: check a database and a model before serving them."""

from __future__ import annotations

from pathlib import Path

import typer

from . import DB_HELP


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        model: Path = typer.Option(
            None, "--model", help="GGUF model to check against the database (default: the default model, if built)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    ) -> None:
        """Check that a database and a model are fit to serve: one line per check.

        llama.cpp: the instruction sets it was compiled with, that this CPU offers them, and a batched
        decode in a child process (a build for another CPU fails here with one line, not a crash).
        Database: quick_check, schema version, WAL, catalog hash. Model: GGUF header, architecture,
        tokenizer, catalog hash against the database; without --model, the default model if it is built.
        Exits non-zero with one `error:` line per problem.

        Example: genrec-edge doctor --db my.db --model model-Q8_0.gguf
        """
        from genrec_edge.doctor import exit_code, report_json, run_checks
        from genrec_edge.models import built_default_model
        from genrec_edge.paths import default_db

        # What `recommend` and `serve` serve without --model, when it is there: doctor never builds it (~40 s).
        model = model if model is not None else built_default_model()
        checks = run_checks(db if db is not None else default_db(), model, runtime=True,
                            no_model="skipped (no --model, and the default model is not built yet: "
                                     "`genrec-edge recommend` builds it on first use)")
        if as_json:
            typer.echo(report_json(checks))
        else:
            for check in checks:
                typer.echo(check.line())
            for check in checks:
                if not check.ok:
                    typer.echo(f"error: {check.name}: {check.detail}", err=True)
        code = exit_code(checks)
        if code:
            raise typer.Exit(code)
