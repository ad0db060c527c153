"""The bench's figure: HR@k vs file size and recommend latency vs file size, one point per level.

Baselines are horizontal lines: popularity and SASRec (same user sample) on the quality panel; on the
latency panel, transformers' beam search on the same F16 (its own user subset, stated in the legend).
"""

from __future__ import annotations

from pathlib import Path


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    meta, rows = report["meta"], report["rows"]
    k = meta["k"]
    sizes = [r["size_mb"] for r in rows]
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((ax_q, f"HR@{k}", f"HR@{k} (test, {meta['sample']['users']} users)"),
              (ax_t, "p50_ms", f"recommend top-{k} latency p50 (ms, log scale, {meta['threads']} threads)"))
    for ax, key, label in panels:
        values = [r[key] for r in rows]
        ax.plot(sizes, values, "o", color="tab:blue")
        # Levels crowd around 85-110 MiB: stagger the labels so they stay readable.
        for i, (row, x, y) in enumerate(zip(rows, sizes, values, strict=True)):
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4 + 9 * (i % 3)), fontsize=8)
        if key == "p50_ms":
            lows = [r["p50_ms"] for r in rows]
            highs = [r["p95_ms"] for r in rows]
            ax.vlines(sizes, lows, highs, color="tab:blue", alpha=0.35, label="p50–p95")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    styles = iter(("tab:orange", "tab:green", "tab:red", "tab:purple"))
    for peer in report["peers"]:
        if peer["name"].endswith("(sample)"):
            ax_q.axhline(peer[f"HR@{k}"], linestyle="--", color=next(styles), label=peer["name"])
    for row in report["hf_side_by_side"]:
        if row["name"].startswith("transformers"):
            ax_t.axhline(row["p50_ms"], linestyle="--", color="tab:red",
                         label=f"{row['name']} ({row['users']} users)")
    ax_q.set_ylim(bottom=0)
    ax_t.set_yscale("log")  # transformers is an order of magnitude slower: ratios read as distances
    for ax in (ax_q, ax_t):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"genrec-edge bench: {meta['dataset']}, {meta['model_kind']}, {meta['date'][:10]}")
    versions = meta["versions"]
    fig.text(
        0.01, 0.01,
        f"{Path(meta['model_f16']).name} sha256 {meta['model_f16_sha256'][:12]} · {meta['sample']['users']} of "
        f"{meta['sample']['test_users']} test users, seed {meta['sample']['seed']} · {meta['cpu']}, "
        f"{meta['threads']} threads · llama-cpp-python {versions.get('llama-cpp-python')}, "
        f"transformers {versions.get('transformers')}",
        fontsize=7, color="0.4",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
