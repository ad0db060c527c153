"""genrec-edge: LLM generative recommendation on a laptop.

Heavy imports (torch, transformers, llama_cpp) are lazy: importing this package is cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
