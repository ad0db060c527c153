"""Append-only JSON-lines files written as results come (``evalruns.ResultLog``, ``batch.OutFile``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def json_line(record: dict) -> bytes:
    """One record as a UTF-8 JSON line (non-ASCII kept as is)."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def lock_exclusive(fh, path: Path, writer: str = "another process") -> None:
    """Hold an exclusive advisory lock on an open file, or refuse at once: two writers would interleave
    lines. No-op where there is no ``fcntl`` (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path} is being written by {writer}; wait for it or pass another --out") from None
