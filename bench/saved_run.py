"""A bench run of record: saved as ``<name>-<date>.json`` beside the report and plot its ``render`` draws.

``--render RUN.json`` redraws a saved run without measuring again (same files, same bytes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

Render = Callable[[dict, Path], None]  # (the run's dict, stem) -> writes stem.md and stem.png


def render_saved(parser: argparse.ArgumentParser, path: Path, render: Render) -> int:
    """``--render``: redraw the run saved in ``path``; a missing file is one usage line (exit 2)."""
    if not path.is_file():
        parser.error(f"--render: no such saved run: {path}")
    render(json.loads(path.read_text()), path.with_suffix(""))
    return 0


def save_run(data: dict, out_dir: Path, name: str, render: Render) -> Path:
    """Write ``out_dir/<name>-<date>.json`` (date from ``data["meta"]["date"]``), render it, print the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{data['meta']['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    render(data, stem)
    print(stem.with_suffix(".md").read_text())
    return stem
