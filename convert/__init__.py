"""HF-LLaMA → GGUF conversion and GGUF header validation (installed as ``genrec_edge.convert``)."""
