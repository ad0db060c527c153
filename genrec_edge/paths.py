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


def check_can_make_folder(folder: str | Path) -> Path:
    """``folder``, if it is one or could be created (FileAccessError naming a file in the way): checked
    before a long job, created by :func:`make_folder` when its first file is written."""
    folder = Path(folder)
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                from .errors import FileAccessError

                raise FileAccessError(f"cannot use {folder}: {ancestor} is a file, where a folder is needed")
            break
    return folder


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its missing parents, as an output's folder (after :func:`check_can_make_folder`)."""
    folder = check_can_make_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
