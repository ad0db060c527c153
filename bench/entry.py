"""A bench script's entry point: our own errors are one ``error:`` line and their exit code, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], int]) -> int:
    """``raise SystemExit(run(main))``: a missing database or model, an empty sample, ... as one line."""
    from genrec_edge.errors import GenrecError

    try:
        return main()
    except GenrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
