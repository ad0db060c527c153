"""``genrec-edge convert`` and ``genrec-edge quantize``: thin layers over genrec_edge.convert / .quantize."""

from __future__ import annotations

from pathlib import Path

import typer

from ..quantize import DEFAULT_LEVELS  # stdlib only at import time: --help stays fast
from . import table_console


def convert(
    hf_dir: Path = typer.Argument(..., help="HF LLaMA directory (config.json, *.safetensors, tokenizer)."),
    out: Path = typer.Option(..., "--out", help="GGUF file to write, e.g. model-F16.gguf."),
    outtype: str = typer.Option("f16", "--outtype", help="Weight type: f32, f16 or bf16 (norms stay F32)."),
    pre: str = typer.Option(None, "--pre", help="Force the BPE pre-tokenizer name (gpt-2, smollm, llama-bpe)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Convert a HF LLaMA directory to a GGUF file for llama.cpp.

    Writes llama.* metadata, the tokenizer (BPE or SentencePiece) and genrec.* provenance (from
    genrec_provenance.json in HF_DIR, if present).

    Example: genrec-edge convert runs/merged --out models/model-F16.gguf --outtype f16
    """
    from genrec_edge.convert import convert as convert_model
    from genrec_edge.convert import validate_gguf_header

    path = convert_model(hf_dir, out, outtype=outtype, pre=pre, force=force, progress=True)
    info = validate_gguf_header(path)
    typer.echo(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(info.tensors)} tensors, "
        f"{info.n_params / 1e6:.2f} M parameters)"
    )


def quantize(
    src: Path = typer.Argument(..., help="An F16 or F32 GGUF, e.g. model-F16.gguf."),
    levels: str = typer.Option(",".join(DEFAULT_LEVELS), "--levels", help="Comma-separated llama.cpp levels."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Where to write model-<LEVEL>.gguf (default: next to SRC)."),
    threads: int = typer.Option(None, "--threads", min=1, help="Quantizer threads (default: all cores)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize", help="Accept an already-quantized source (loses quality)."
    ),
) -> None:
    """Quantize a GGUF with llama.cpp to one file per level, and report what each level really became.

    Prints size, bits per weight and tensor counts per ggml type: llama.cpp falls back from K-quants for
    tensors whose rows are not multiples of 256 (SmolLM2's 576), which the level name alone hides.

    Example: genrec-edge quantize models/model-F16.gguf --levels Q8_0,Q4_K_M
    """
    from rich.table import Table

    from genrec_edge.quantize import format_table
    from genrec_edge.quantize import quantize as quantize_model

    results = quantize_model(
        src, levels, out_dir=out_dir, threads=threads, force=force, allow_requantize=allow_requantize
    )
    table = Table(title=f"Quantized {src.name}")
    for column in ("level", "size MB", "bits/weight", "tensor types"):
        table.add_column(column)
    for row in format_table(results):
        table.add_row(*row)
    table_console().print(table)
    for r in results:
        typer.echo(f"{r.level}\t{r.path}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("quantize")(quantize)
