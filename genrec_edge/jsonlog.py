"""JSON files: append-only JSON lines written as results come (``evalruns.ResultLog``, ``batch.OutFile``),
and the one reader of a JSON-object file (run configs, config files, prior sidecars)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import GenrecError, UsageError


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


def read_json_object(path: Path, error: type[GenrecError], what: str) -> dict:
    """The JSON object in ``path``; ``error`` with one line naming ``what`` the file is if it cannot be read,
    is not JSON, or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise error(f"{what} {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data
