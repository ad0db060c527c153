"""Where genrec-edge keeps its files: one directory, moved with GENREC_EDGE_HOME."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "GENREC_EDGE_HOME"
PACKAGE_DATA = Path(__file__).parent / "data"
BUNDLED_DATASET = PACKAGE_DATA / "ml-latest-small"
DEFAULT_ADAPTER = PACKAGE_DATA / "default-adapter"


def home() -> Path:
    """The user data directory (``$GENREC_EDGE_HOME``, else the platform's user data dir)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("genrec-edge", appauthor=False))


def default_db() -> Path:
    """The database ``genrec-edge init`` builds from the bundled ml-latest-small."""
    return home() / "default.db"


def models_dir() -> Path:
    return home() / "models"


def cache_dir() -> Path:
    return home() / "cache"


def downloads_dir() -> Path:
    return home() / "downloads"
