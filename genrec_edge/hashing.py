"""sha256 of files, read in 1 MiB blocks (models are hundreds of MB): one helper for every stage."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_from_file(digest, path: Path):
    """Feed ``path``'s bytes to ``digest`` (any hashlib object); returns it."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    return update_from_file(hashlib.sha256(), Path(path)).hexdigest()
