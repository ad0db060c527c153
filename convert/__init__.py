"""HF-LLaMA → GGUF conversion and GGUF header validation (installed as ``genrec_edge.convert``).

Importing this package is cheap (gguf only); torch and transformers are imported inside ``convert``.
"""

from .header import (
    GGUFHeaderInfo,
    TensorInfo,
    provenance_of,
    read_provenance,
    require_llama,
    validate_gguf_header,
)
from .hf_to_gguf import PROVENANCE_FILE, PROVENANCE_KEYS, convert

__all__ = [
    "GGUFHeaderInfo",
    "PROVENANCE_FILE",
    "PROVENANCE_KEYS",
    "TensorInfo",
    "convert",
    "provenance_of",
    "read_provenance",
    "require_llama",
    "validate_gguf_header",
]
