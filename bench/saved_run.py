"""A bench run of record: saved as ``<name>-<date>.json`` beside the report and plot its ``render`` draws.

``--render RUN.json`` redraws a saved run without measuring again (same files, same bytes).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

Render = Callable[[dict, Path], None]  # (the run's dict, stem) -> writes stem.md and stem.png


def run_meta(model_path: Path, **extra) -> dict:
    """What a run of record's ``meta`` starts with - the model (file and folder), the machine, the CPUs this
    process may use, llama-cpp-python's version, the date and minute - then ``extra``, the bench's own."""
    from genrec_edge import engine
    from genrec_edge.cpu_share import usable_cpus

    return {"model": f"{model_path.name} ({model_path.parent.name})", "machine": platform.machine(),
            "cpus": usable_cpus(), "llama_cpp": engine.llama_cpp.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), **extra}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every bench with a run of record takes: --model, --db, --out, --render."""
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the default model, Q8_0)")
    parser.add_argument("--db", type=Path, default=None, help="default: the database `genrec-edge init` builds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--render", type=Path, help="redraw the table and plot of a saved run (its .json)")


def rep_axes(ax, reps: list[int]) -> None:
    """An axis of one value per rep, as the benches that alternate their order rep by rep draw it."""
    ax.set_xlabel("rep")
    ax.set_xticks(reps)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, stem: Path) -> None:
    """``stem``.png, as every bench draws it, and the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def render_saved(parser: argparse.ArgumentParser, path: Path, render: Render) -> int:
    """``--render``: redraw the run saved in ``path``; a missing file is one usage line (exit 2)."""
    if not path.is_file():
        parser.error(f"--render: no such saved run: {path}")
    render(json.loads(path.read_text()), path.with_suffix(""))
    return 0


SUFFIXES = (".json", ".md", ".png", ".csv")


def fresh_stem(out_dir: Path, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``, ... : the first whose files do not exist yet. A run of
    record is never overwritten by a later one (a 1-user rerun replaced the files the README cites)."""
    stem = out_dir / name
    for n in range(2, 10_000):
        if not any(stem.with_name(stem.name + suffix).exists() for suffix in SUFFIXES):
            return stem
        stem = out_dir / f"{name}-{n}"
    raise FileExistsError(f"{out_dir / name}: too many runs of this name")


def save_run(data: dict, out_dir: Path, name: str, render: Render) -> Path:
    """Write ``out_dir/<name>-<date>.json`` (date from ``data["meta"]["date"]``; ``-2``... if that run's files
    exist), render it, print the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(out_dir, f"{name}-{data['meta']['date'][:10]}")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    render(data, stem)
    print(stem.with_suffix(".md").read_text())
    return stem
