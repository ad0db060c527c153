"""Quantize an F16/F32 GGUF to smaller llama.cpp levels (``model-F16.gguf`` -> ``model-Q8_0.gguf`` ...).

Runs llama.cpp's own quantizer (``llama_model_quantize``) level by level, then reads each output's header
(with our bounded validator) to report what the level *really* became: llama.cpp silently falls back to
another type for a tensor whose rows are not a multiple of the K-quant block (256) - SmolLM2's 576-wide
tensors - so "Q4_K_M" can be mostly Q5_0. Size, bits per weight and per-type tensor counts say so.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QuantizeError, UsageError
from .paths import check_can_make_folder, make_folder
from .signals import held_signals

# The levels we ship and compare (make bench, python -m bench.run), best first; F16 is the unquantized reference.
LEVELS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
DEFAULT_LEVELS = LEVELS[1:]  # what `quantize` writes by default: every level below F16
UNQUANTIZED_TYPES = {"F32", "F16", "BF16"}
_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_SOURCE_SUFFIX = re.compile(r"-(F16|F32|BF16)$", re.IGNORECASE)
_PROGRESS_LINE = re.compile(rb"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


@dataclass(frozen=True)
class QuantResult:
    level: str
    path: Path
    size_bytes: int
    bpw: float  # GGUFHeaderInfo.bits_per_weight: file size * 8 / parameters
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    seconds: float = 0.0

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


def _llama_cpp():
    # Through engine.py, which sets OpenMP's environment before llama_cpp loads (FINDINGS.md).
    from .engine import llama_cpp

    return llama_cpp


def available_levels() -> dict[str, int]:
    """Level name -> llama_ftype, from the llama.cpp build we run (``LLAMA_FTYPE_MOSTLY_*``)."""
    llama_cpp = _llama_cpp()

    return {
        name[len(_FTYPE_PREFIX) :]: getattr(llama_cpp, name)
        for name in dir(llama_cpp)
        if name.startswith(_FTYPE_PREFIX) and isinstance(getattr(llama_cpp, name), int)
    }


def parse_levels(levels: str | Sequence[str]) -> list[str]:
    """``"q8_0, Q4_K_M"`` or a list -> upper-case names, checked against what llama.cpp offers."""
    names = [x.strip().upper() for x in (levels.split(",") if isinstance(levels, str) else levels) if x.strip()]
    if not names:
        raise UsageError("no quantization levels given")
    known = available_levels()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown quantization level(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def output_path(src: Path, level: str, out_dir: Path | None = None) -> Path:
    """``model-F16.gguf`` + ``Q4_0`` -> ``model-Q4_0.gguf`` (next to the source unless ``out_dir``)."""
    stem = _SOURCE_SUFFIX.sub("", src.stem)
    return (out_dir or src.parent) / f"{stem}-{level}.gguf"


class _LlamaLogCapture:
    """Route llama.cpp's log to us while the quantizer runs: keep the text, drive a progress bar.

    The previous callback is restored afterwards, so a runtime that installed its own keeps it.
    """

    def __init__(self, bar):
        self.llama_cpp = _llama_cpp()
        self.bar = bar
        self.lines: list[str] = []
        self._callback = self.llama_cpp.llama_log_callback(self._on_log)  # must outlive the C call

    def _on_log(self, level, text, user_data):
        if not text:
            return
        match = _PROGRESS_LINE.search(text)
        if match and self.bar is not None:
            done, total = int(match.group(1)), int(match.group(2))
            self.bar.total = total
            self.bar.update(done - self.bar.n)  # drawn at most every mininterval (a pipe got one line a tensor)
        self.lines.append(text.decode("utf-8", "replace"))

    def __enter__(self):
        self._prev_cb = self.llama_cpp.llama_log_callback()
        self._prev_data = ctypes.c_void_p()
        self.llama_cpp.llama_log_get(ctypes.byref(self._prev_cb), ctypes.byref(self._prev_data))
        self.llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        self.llama_cpp.llama_log_set(self._prev_cb, self._prev_data)

    def last_error(self) -> str:
        text = "".join(self.lines).strip().splitlines()
        errors = [line for line in text if "error" in line.lower() or "failed" in line.lower()]
        return (errors or text or ["no log"])[-1].strip()


def _is_quantized(info) -> bool:
    return any(t.ggml_type.name not in UNQUANTIZED_TYPES for t in info.tensors if len(t.shape) > 1)


def _result(level: str, path: Path, seconds: float) -> QuantResult:
    from genrec_edge.convert.header import require_llama, validate_gguf_header

    info = require_llama(validate_gguf_header(path))
    return QuantResult(
        level=level,
        path=path,
        size_bytes=info.file_size,
        bpw=info.bits_per_weight,
        tensor_types=info.tensor_type_counts(),
        seconds=seconds,
    )


def quantize(
    src: str | Path,
    levels: str | Sequence[str] = DEFAULT_LEVELS,
    out_dir: str | Path | None = None,
    threads: int | None = None,
    force: bool = False,
    allow_requantize: bool = False,
    progress: bool = True,
) -> list[QuantResult]:
    """Quantize ``src`` to each level; returns one :class:`QuantResult` per level, in order.

    Writes ``<stem>-<LEVEL>.gguf`` (a trailing -F16/-F32 stripped from the source stem) next to ``src`` or
    in ``out_dir``. ``F16`` on an F16 source means "no quantization": its result is the source itself.
    Refuses an existing output unless ``force`` and an already-quantized source unless ``allow_requantize``.
    """
    from tqdm import tqdm

    from genrec_edge.convert.header import require_llama, validate_gguf_header

    llama_cpp = _llama_cpp()
    src = Path(src)
    names = parse_levels(levels)
    ftypes = available_levels()
    # Untrusted input: our bounded parser first, llama.cpp's after.
    src_info = require_llama(validate_gguf_header(src))
    requantizing = _is_quantized(src_info)
    if requantizing and not allow_requantize:
        raise UsageError(
            f"{src} is already quantized ({', '.join(src_info.tensor_type_counts())}); quantize an F16/F32 "
            "model, or pass --allow-requantize (quality suffers)"
        )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"--threads must be >= 1 (got {threads!r})")
    out_dir = check_can_make_folder(out_dir) if out_dir is not None else None  # made before the first write
    src_is_f16 = src_info.metadata.get("general.file_type") == ftypes["F16"]

    plan = []
    for level in names:
        dst = output_path(src, level, out_dir)
        if level == "F16" and src_is_f16:
            plan.append((level, src))  # nothing to do: the source already is that level
            continue
        if dst.resolve() == src.resolve():
            raise UsageError(f"{level}: output {dst} would overwrite the source")
        if dst.exists() and not force:
            raise UsageError(f"{dst} already exists (use --force to overwrite)")
        plan.append((level, dst))

    if out_dir is not None:
        make_folder(out_dir)
    results = []
    for level, dst in plan:
        if dst == src:
            results.append(_result(level, src, 0.0))
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftypes[level]
        params.nthread = threads or os.cpu_count() or 1
        params.allow_requantize = allow_requantize
        tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
        start = time.perf_counter()
        bar = tqdm(desc=f"{level:>7}", unit="tensor", total=len(src_info.tensors), disable=not progress, leave=True)
        try:
            # Ctrl-C during the call would run its handler inside the log callback, where ctypes drops the
            # KeyboardInterrupt (every level was written, exit 0): held until the call returns, then acted on;
            # the level it was on is not kept (its partial file is removed below) and no later level starts.
            with _LlamaLogCapture(bar) as log, held_signals():
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise QuantizeError(f"{src}: llama.cpp could not quantize to {level} (return code {rc}): {log.last_error()}")
            os.replace(tmp, dst)
        finally:
            bar.close()
            tmp.unlink(missing_ok=True)
        results.append(_result(level, dst, time.perf_counter() - start))
    return results


def format_table(results: Sequence[QuantResult]) -> list[tuple[str, str, str, str]]:
    """Rows (level, size MB, bits per weight, tensor types) for a report."""
    return [
        (r.level, f"{r.size_mb:.1f}", f"{r.bpw:.2f}", ", ".join(f"{k}×{v}" for k, v in r.tensor_types.items()))
        for r in results
    ]
