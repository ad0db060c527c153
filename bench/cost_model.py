"""Where a request's time goes on this CPU, and what OpenMP's waiting and the thread count do to it.

    .venv/bin/python -m bench.cost_model [--users 8] [--rounds 2] [--spin 3000] [--threads 2]

Each configuration runs in its own child process (libgomp reads its wait settings once, when llama.cpp
is loaded), on the default model (Q8_0), prior off, top-10, beam 20, the same users as
``bench.runtime_bench``:

- ``before`` — the runtime as it was before jump-forward and thread adaptation: forced title suffixes one
  step at a time, ``OMP_WAIT_POLICY=passive`` (threads sleep at every barrier of the compute graph),
  ``--threads`` fixed;
- ``passive`` — the same with jump-forward;
- ``spin N`` — ``GOMP_SPINCOUNT=N``: a thread spins N times at a barrier before it sleeps (libgomp's
  own variable; an explicit value wins over the passive policy), thread count fixed;
- ``1 thread`` — no barriers at all;
- ``adaptive`` — the shipped default (cpu_share.py): a short spin, and only the cores other programs
  leave free.

Every configuration runs **idle** and **beside a CPU hog** (one busy-looping process: what a laptop's
other work does to a 2-core machine), rounds alternating the order. Per child: one-request latency
(``Recommender.recommend``, ``Timings``) per user, and ``llama_decode`` calls of 2-63 tokens with
logits (the search's kind of call) fitted as ``ms = fixed + per_token · tokens``. The results must be
identical across configurations (they only change scheduling): the report counts them.

Output: ``bench/results/cost-model-<date>.{md,json,png}``. The CPU is shared: compare ratios of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp (FINDINGS.md)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

K, BEAM = 10, 20
CALL_SIZES = (2, 8, 20, 32, 63)
CALL_REPS = 5
HOG = "while True: pass"


def configs(spins: list[int], threads: int) -> list[dict]:
    """``env`` for the child's start; ``adapt``: the engine's thread count follows other programs' load;
    ``jump``: forced title suffixes decoded ahead (``False``: one step at a time, as before)."""
    fixed = {"GENREC_EDGE_ADAPT_THREADS": "0"}
    out = [
        {"name": "before", "threads": threads, "env": fixed, "adapt": False, "jump": False},
        {"name": "passive", "threads": threads, "env": fixed, "adapt": False, "jump": True},
    ]
    out += [{"name": f"spin {n}", "threads": threads, "env": {"GOMP_SPINCOUNT": str(n)}, "adapt": False, "jump": True}
            for n in spins]
    if threads > 1:
        out.append({"name": "1 thread", "threads": 1, "env": fixed, "adapt": False, "jump": True})
    out.append({"name": "adaptive", "threads": threads, "env": {}, "adapt": True, "jump": True})
    return out


# ------------------------------------------------------------------------------------------ child
def child(config: dict, users: list[int], out: Path) -> None:
    from genrec_edge.engine import EXACT_BATCH
    from genrec_edge.recommend import Recommender

    rec = Recommender.open(None, None, prior="none", beam=BEAM, threads=config["threads"], warn=lambda m: None,
                           jump_forward=config["jump"])
    if not config["adapt"]:
        rec.engine.governor = None  # a fixed thread count (GENREC_EDGE_ADAPT_THREADS=0 already has none)
    elif rec.engine.governor is None:
        raise SystemExit("the adaptive configuration needs Linux's /proc/stat")
    rec.recommend(user=users[0], k=K)  # warm-up: page the weights in
    requests = []
    for user in users:
        r = rec.recommend(user=user, k=K)
        t = r.timings
        requests.append({"user": user, "total_ms": t.total_ms, "prefill_ms": t.prefill_ms, "search_ms": t.search_ms,
                         "decode_calls": t.decode_steps, "decoded_tokens": t.decoded_tokens,
                         "titles": [i.title for i in r.items], "scores": [i.score for i in r.items]})
    # Decode calls like the search's: n beams forked from one prompt, one token each, logits for all.
    engine = rec.engine
    engine.reset()
    prompt = rec.prompt_ids(["Toy Story (1995)", "Heat (1995)", "Casino (1995)"] * 8)
    seq, free = rec.prompt_seq, [s for s in range(rec.prompt_seq + 1, engine.n_seq_max) if s != rec.graveyard_seq]
    engine.seq_copy(0, seq, -1, -1)
    engine.decode_sequence(prompt[len(rec.prefix):], seq, len(rec.prefix))
    calls: dict[int, list[float]] = {}
    for _ in range(CALL_REPS):
        for n in CALL_SIZES:
            n = min(n, EXACT_BATCH)
            # One token per beam; wider calls put consecutive positions in a beam, as a forced suffix does.
            owners = [free[i % len(free)] for i in range(n)]
            positions = [len(prompt) + i // len(free) for i in range(n)]
            for s in set(owners):
                engine.seq_copy(seq, s, -1, -1)
            t0 = time.perf_counter()
            engine.decode([prompt[-1]] * n, positions, owners, [True] * n)
            engine.all_logits(n)
            calls.setdefault(n, []).append((time.perf_counter() - t0) * 1000)
            for s in set(owners):
                engine.seq_clear(s)
    rec.close()
    out.write_text(json.dumps({"requests": requests, "calls": {str(n): v for n, v in calls.items() if v}}))


# ------------------------------------------------------------------------------------------ parent
def run_child(config: dict, users: list[int], hog: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | config["env"]
    hog_proc = subprocess.Popen([sys.executable, "-c", HOG]) if hog else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, "-m", "bench.cost_model", "--child", json.dumps(config), "--users-list",
                   ",".join(map(str, users)), "--child-out", str(out)]
            subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
            return json.loads(out.read_text())
    finally:
        if hog_proc is not None:
            hog_proc.kill()
            hog_proc.wait()


def fit(calls: dict[str, list[float]]) -> tuple[float, float]:
    """Least squares ``ms = fixed + per_token * n`` on the per-size medians."""
    n = np.array([int(k) for k in calls], dtype=float)
    ms = np.array([np.median(v) for v in calls.values()])
    per_token, fixed = np.polyfit(n, ms, 1)
    return float(fixed), float(per_token)


def same(a: dict, b: dict) -> bool:
    return a["titles"] == b["titles"] and all(abs(x - y) <= 1e-4 for x, y in zip(a["scores"], b["scores"], strict=True))


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per (config, condition): the users' latencies over all rounds (medians per user) and the fit."""
    table: dict = {}
    for name in names:
        for cond in ("idle", "hog"):
            mine = [r for r in runs if r["config"] == name and r["condition"] == cond]
            if not mine:
                continue
            per_user = {}
            for r in mine:
                for q in r["result"]["requests"]:
                    per_user.setdefault(q["user"], []).append(q)
            calls: dict[str, list[float]] = {}
            for r in mine:
                for n, v in r["result"]["calls"].items():
                    calls.setdefault(n, []).extend(v)
            fixed, per_token = fit(calls)
            table[(name, cond)] = {
                "total_ms": [float(np.median([q["total_ms"] for q in qs])) for qs in per_user.values()],
                "prefill_ms": [float(np.median([q["prefill_ms"] for q in qs])) for qs in per_user.values()],
                "search_ms": [float(np.median([q["search_ms"] for q in qs])) for qs in per_user.values()],
                "decode_calls": float(np.median([q["decode_calls"] for qs in per_user.values() for q in qs])),
                "decoded_tokens": float(np.median([q["decoded_tokens"] for qs in per_user.values() for q in qs])),
                "call_ms": {n: float(np.median(v)) for n, v in calls.items()},
                "fixed_ms": fixed, "per_token_ms": per_token,
            }
    return table


def paired(table: dict, a: str, b: str, cond: str) -> str | None:
    """Per-user p50 ratio ``a / b`` (same users, same condition): median [min, max], and how many are < 1."""
    if (a, cond) not in table or (b, cond) not in table:
        return None
    r = np.array(table[(a, cond)]["total_ms"]) / np.array(table[(b, cond)]["total_ms"])
    return (f"| {a} / {b} | {cond} | {np.median(r):.2f}× | {r.min():.2f}–{r.max():.2f}× | "
            f"{int((r < 1).sum())}/{len(r)} |")


def render(table: dict, names: list[str], n_users: int, rounds: int, when: str, mismatches: int,
           compared: int) -> str:
    base = {cond: table[("passive", cond)] for cond in ("idle", "hog")}
    before = {cond: table[("before", cond)] for cond in ("idle", "hog")}
    lines = [
        "# Where a request's time goes, and the OpenMP wait policy (`python -m bench.cost_model`)",
        "",
        f"Default model (Q8_0), prior off, top-{K}, beam {BEAM}, {n_users} users × {rounds} rounds "
        f"(per-user medians), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{when}. Each configuration in its own process; \"hog\" = one busy-looping "
        "process beside it. Shared, noisy CPU: compare ratios within a condition.",
        "",
        "## One request",
        "",
        "| configuration | condition | p50 ms | p95 ms | prefill p50 | search p50 | p50 vs before | p50 vs passive |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cond in ("idle", "hog"):
        for name in names:
            row = table.get((name, cond))
            if row is None:
                continue
            p50 = float(np.median(row["total_ms"]))
            lines.append(
                f"| {name} | {cond} | {p50:.0f} | {np.percentile(row['total_ms'], 95):.0f} | "
                f"{np.median(row['prefill_ms']):.0f} | {np.median(row['search_ms']):.0f} | "
                f"**{p50 / np.median(before[cond]['total_ms']):.2f}×** | "
                f"{p50 / np.median(base[cond]['total_ms']):.2f}× |")
    lines += [
        "",
        f"Identical top-{K} (titles, scores to 1e-4) against passive, same user: {compared - mismatches}/{compared} "
        "request pairs.",
        "",
        "Paired, user by user (each user's p50 in one setting over its p50 in the other, same condition):",
        "",
        "| ratio | condition | median | range over users | users faster |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [row for cond in ("idle", "hog")
              for row in (paired(table, "adaptive", "before", cond), paired(table, "adaptive", "passive", cond),
                          paired(table, "passive", "before", cond)) if row]
    lines += [
        "",
        "## One llama_decode call with logits, n beams one token each: ms = fixed + per-token · n",
        "",
        "| configuration | condition | fixed ms | per-token ms | " + " | ".join(f"{n} tok ms" for n in CALL_SIZES) + " |",
        "|---|---|---:|---:|" + "---:|" * len(CALL_SIZES),
    ]
    for cond in ("idle", "hog"):
        for name in names:
            row = table.get((name, cond))
            if row is None:
                continue
            sizes = " | ".join(f"{row['call_ms'].get(str(n), float('nan')):.0f}" for n in CALL_SIZES)
            lines.append(f"| {name} | {cond} | {row['fixed_ms']:.1f} | {row['per_token_ms']:.2f} | {sizes} |")
    idle = base["idle"]
    calls, tokens = idle["decode_calls"], idle["decoded_tokens"]
    fixed_share = calls * idle["fixed_ms"] / np.median(idle["search_ms"])
    lines += [
        "",
        f"A request (passive, idle) makes {calls:.0f} search calls for {tokens:.0f} tokens: the fixed part is "
        f"≈ {calls * idle['fixed_ms']:.0f} ms = {fixed_share:.0%} of its search; the rest is per token.",
    ]
    return "\n".join(lines) + "\n"


def plot(table: dict, names: list[str], path: Path, when: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_r) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        row = table.get((name, "idle"))
        if row is None:
            continue
        ns = sorted(int(n) for n in row["call_ms"])
        ax_c.plot(ns, [row["call_ms"][str(n)] for n in ns], "o-", label=name)
    ax_c.set_xlabel("tokens in one llama_decode call (logits for all)")
    ax_c.set_ylabel("ms per call (median), idle")
    ax_c.set_ylim(bottom=0)
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=8)
    width = 0.8 / 2
    xs = np.arange(len(names))
    for j, cond in enumerate(("idle", "hog")):
        values = [float(np.median(table[(n, cond)]["total_ms"])) if (n, cond) in table else np.nan for n in names]
        ax_r.bar(xs + (j - 0.5) * width, values, width, label=cond)
    ax_r.set_xticks(xs, names, fontsize=8)
    ax_r.set_ylabel("one request p50 ms")
    ax_r.grid(alpha=0.3, axis="y")
    ax_r.legend(fontsize=8)
    fig.suptitle(f"genrec-edge: decode cost and OpenMP wait policy, {os.cpu_count()} CPUs, {when[:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spin", default="3000", help="GOMP_SPINCOUNT values to compare (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--render", type=Path, help="redraw the tables and plot of a saved run (its .json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--users-list", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child), [int(u) for u in args.users_list.split(",")], args.child_out)
        return 0
    if args.render:
        if not args.render.is_file():
            parser.error(f"--render: no such saved run: {args.render}")
        return report(args.render.with_suffix(""))
    try:
        spins = [int(s) for s in args.spin.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--spin takes comma-separated whole numbers (got {args.spin!r})")

    from tqdm.auto import tqdm

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    default_model_path()  # build the default model now, not inside the first timed child
    args.users_sample = bench_users(default_db(), args.users)
    cfgs = configs(spins, args.threads)
    plan = []
    for rnd in range(args.rounds):
        order = cfgs if rnd % 2 == 0 else cfgs[::-1]
        for cond in (("idle", "hog") if rnd % 2 == 0 else ("hog", "idle")):
            plan += [(rnd, cond, c) for c in order]
    runs = []
    for rnd, cond, cfg in tqdm(plan, desc="configurations × conditions × rounds", unit="run"):
        runs.append({"round": rnd, "condition": cond, "config": cfg["name"],
                     "result": run_child(cfg, args.users_sample, hog=cond == "hog")})
    from bench.saved_run import fresh_stem

    args.out.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(args.out, f"cost-model-{time.strftime('%Y-%m-%d')}")
    stem.with_suffix(".json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "users": args.users_sample, "configs": cfgs, "runs": runs},
        indent=1), encoding="utf-8")
    return report(stem)


def report(stem: Path) -> int:
    """Tables and plot of the run saved in ``<stem>.json`` (``--render`` redraws them from that file)."""
    data = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    runs, names = data["runs"], [c["name"] for c in data["configs"]]
    table = summarize(runs, names)
    # Same requests in every configuration: compare each run's results to the passive run of its round.
    mismatches = compared = 0
    for r in runs:
        ref = next(x for x in runs if x["round"] == r["round"] and x["condition"] == r["condition"]
                   and x["config"] == "passive")
        if r is ref:
            continue
        for a, b in zip(r["result"]["requests"], ref["result"]["requests"], strict=True):
            compared += 1
            mismatches += not same(a, b)
    when = data.get("date") or stem.name.removeprefix("cost-model-")
    rounds = 1 + max(r["round"] for r in runs)
    text = render(table, names, len(data["users"]), rounds, when, mismatches, compared)
    print(text)
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    plot(table, names, stem.with_suffix(".png"), when)
    print(f"wrote {stem}.{{md,png}} from {stem}.json")
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
