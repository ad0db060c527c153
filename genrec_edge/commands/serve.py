"""``genrec-edge serve``: the local JSON HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from . import DB_HELP


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless --allow-remote)."),
        port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
        model: Path = typer.Option(None, "--model", help="GGUF model (default: the default model)."),
        db: Path = typer.Option(None, "--db", help=DB_HELP),
        threads: int = typer.Option(None, "--threads", min=1, help="Most llama.cpp threads (fewer while other programs keep cores busy)."),
        beam: int = typer.Option(None, "--beam", min=1, help="Beam width (default: max(10, 2k))."),
        batch: int = typer.Option(
            1, "--batch", min=1, help="Concurrent /recommend requests searched together (waiting at most 10 ms). "
            "1: one after another, the lower mean latency on 2 cores (bench/results/runtime.md); more where cores are spare."
        ),
        workers: int = typer.Option(
            1, "--workers", min=0, help="Processes that search, each with its own model (~410 MB resident at Q8_0): concurrent "
            "/recommend requests are answered up to this many at a time; a crashed one is replaced. 0: search in "
            "the HTTP process itself (least memory). Concurrent clients: one per core (bench/results/serve-workers-2026-12-02.md).",
        ),
        cache: int = typer.Option(
            256, "--cache", min=0, help="Searches each search process keeps for repeated requests (the same user "
            "with an unchanged history, filters, prior and k gets the same answer without a search); 0: none.",
        ),
        prompt_cache: int = typer.Option(
            8, "--prompt-cache", min=0, help="Decoded prompts each search process keeps (~6 MB each at the default "
            "model): the same user asked again with another k, filter or prior skips the prompt's ~0.4 s, with "
            "the same results; 0: none.",
        ),
        allow_remote: bool = typer.Option(
            False, "--allow-remote", help="Allow a non-loopback --host (no TLS: anyone who can reach it can use it)."
        ),
        token: str = typer.Option(
            None, "--token", envvar="GENREC_EDGE_TOKEN", show_envvar=True,
            help="Require `Authorization: Bearer TOKEN` on every route but /health.",
        ),
        busy_timeout: float = typer.Option(5.0, "--busy-timeout", min=0.0, help="Seconds a request waits for a "
                                           "database another process has locked (then 503)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log."),
    ) -> None:
        """Serve recommendations and history over a local JSON HTTP API (OpenAPI at /openapi.json).

        POST /recommend, POST /history, GET /users/{id}/history, GET /health. Stops on SIGTERM/SIGINT
        after finishing the requests in flight.

        Example: genrec-edge serve --db my.db --model model-Q8_0.gguf --port 8765
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp loads (see FINDINGS)
        from genrec_edge.paths import default_db
        from genrec_edge.serve import is_loopback
        from genrec_edge.serve import serve as run_server

        if model is None:
            from genrec_edge.models import default_model_path

            model = default_model_path()
        if allow_remote and not is_loopback(host):
            typer.echo(
                f"warning: listening on {host}: anyone who can reach this address can read and write "
                "the history; there is no TLS" + ("" if token else " and no --token"),
                err=True,
            )

        db = db if db is not None else default_db()

        def log(line: str) -> None:
            typer.echo(line, err=True)

        def ready(url: str) -> None:
            shown = {0: "", 1: "1 search process, "}.get(workers, f"{workers} search processes, ")
            typer.echo(f"serving on {url} ({shown}model {model}, db {db}); Ctrl-C to stop", err=True)

        run_server(
            db, model, host=host, port=port, threads=threads, beam=beam, batch=batch, workers=workers, cache=cache,
            prompt_cache=prompt_cache, allow_remote=allow_remote, token=token, busy_timeout=busy_timeout,
            log=None if quiet else log, ready=ready,
        )
        typer.echo("stopped", err=True)
