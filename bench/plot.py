"""The bench's figure: HR@k (with its 95% interval) vs file size and recommend latency vs file size, one point
per level; on fewer than stats.SMALL_SAMPLE users the quality panel says it is noise.

Baselines are horizontal lines: popularity and SASRec (same user sample) on the quality panel; on the
latency panel, transformers' beam search on the same F16 (its own user subset, stated in the legend).
"""

from __future__ import annotations

from pathlib import Path


def plot(report: dict, path: Path) -> Path:
    fig = figure(report)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure(report: dict):
    """The bench's figure (matplotlib, not saved): HR@k with its 95% interval, latency p50-p95, vs file size."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    from genrec_edge.stats import SMALL_SAMPLE

    meta, rows = report["meta"], report["rows"]
    k = meta["k"]
    sizes = [r["size_mb"] for r in rows]
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((ax_q, f"HR@{k}", f"HR@{k} (test, {meta['sample']['users']} users)"),
              (ax_t, "p50_ms", f"recommend top-{k} latency p50 (ms, log scale, {meta['threads']} threads)"))
    for ax, key, label in panels:
        values = [r[key] for r in rows]
        ax.plot(sizes, values, "o", color="tab:blue")
        if key != "p50_ms" and all(r.get(f"{key}_lo") is not None for r in rows):
            # The quality points alone read as a ranking of the levels; on a small sample they are noise.
            low = [v - r[f"{key}_lo"] for r, v in zip(rows, values, strict=True)]
            high = [r[f"{key}_hi"] - v for r, v in zip(rows, values, strict=True)]
            ax.errorbar(sizes, values, yerr=[low, high], fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3,
                        label="95% interval (bootstrap over users)")
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
    users = meta["sample"]["users"]
    if users < SMALL_SAMPLE:
        ax_q.set_title(f"{users} users: noise, not a ranking of the levels (see the paired differences; "
                       f"{SMALL_SAMPLE}+ users)", fontsize=8, color="tab:red")
    for ax in (ax_q, ax_t):
        ax.margins(x=0.12)  # the rightmost level's label stays inside the panel
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
    # Levels crowd around 85-140 MiB: each name goes where it overlaps no other name and no point (the layout
    # is final now, so what is measured is what is drawn).
    names = [r["name"] for r in rows]
    for ax, key, _ in panels:
        label_points(fig, ax, names, sizes, [r[key] for r in rows])
    return fig


# Where a point's name may go, in points from the point, tried in this order.
_LABEL_SPOTS = ((4, 4, "left"), (4, -12, "left"), (-4, 4, "right"), (-4, -12, "right"), (4, 16, "left"),
                (-4, 16, "right"), (4, -24, "left"), (-4, -24, "right"), (4, 28, "left"), (-4, 28, "right"))
_POINT_RADIUS_PX = 4  # a marker's half-size in pixels, kept clear of names


def label_points(fig, ax, names, xs, ys) -> list:
    """Annotate each point with its name at the first of ``_LABEL_SPOTS`` whose box overlaps no name placed
    before it, no other point and leaves the axes alone (the first spot if none does); returns the texts."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = [ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True)]
    marks = [Bbox.from_extents(cx - _POINT_RADIUS_PX, cy - _POINT_RADIUS_PX, cx + _POINT_RADIUS_PX,
                               cy + _POINT_RADIUS_PX) for cx, cy in centres]
    def put(i, dx, dy, ha):
        text = ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=ha)
        return text, text.get_window_extent(renderer)

    taken, texts = [], []
    for i in sorted(range(len(names)), key=lambda j: (xs[j], ys[j])):
        for spot in _LABEL_SPOTS:
            text, box = put(i, *spot)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in taken + marks[:i] + marks[i + 1:]):
                break
            text.remove()
        else:
            text, box = put(i, *_LABEL_SPOTS[0])
        taken.append(box)
        texts.append(text)
    return texts
