"""Throughput of a batch job by how its CPUs are split: one process with every thread, or one per core.

    .venv/bin/python -m bench.process_split [--users 32] [--reps 3] [--layouts 1x2,2x1] [--model PATH] [--db PATH]
    .venv/bin/python -m bench.process_split --layouts before,1x2,2x1   # against the runtime before issue 14
    .venv/bin/python -m bench.process_split --layouts before@plain,1x2@amx,1x2@plain \
        --python plain=.venv/bin/python --python amx=/tmp/venv-amx/bin/python   # builds side by side too

A layout ``PxT`` is P worker processes, each with one ``Recommender`` (llama.cpp with up to T threads,
adapted to other programs' load as shipped: cpu_share.py) pulling users from one shared queue - what
``genrec-edge recommend --all-users`` does with one process, and ``--ray local`` with one single-thread
actor per CPU. The default compares ``1x<cpus>`` (the local batch job) with ``<cpus>x1``. The layout
``before`` is the runtime as issue 14 found it, for a before/after in one run: one process, ``<cpus>`` threads
fixed, OpenMP threads sleeping at every barrier, forced title suffixes one step at a time (``bench.cost_model``'s
``before``). ``LAYOUT@NAME`` runs that layout under another interpreter, ``--python NAME=PATH`` (a venv with
another llama.cpp build: its workers come from that venv alone). Every worker
loads its model and ranks one warm-up user first; the clock runs from the moment all are ready until the
last result is in. Layouts alternate their order rep by rep, on the same users (``bench.runtime_bench``'s),
top-10, beam 20, prior off. One-process layouts also report the median time of one user (a request's
latency, one after another). Results must be identical across layouts of one build (llama.cpp's row-by-row attention
kernel makes a token's logits independent of the thread count: docs/FINDINGS.md); the report says whether
they were.

Output: ``bench/results/process-split-<date>.{md,json,png}``; ``--render RUN.json`` redraws a saved run.
The CPU is shared: compare the ratios of one run, rep by rep.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp (FINDINGS.md); spawned workers too

import argparse  # noqa: E402
import queue as queue_mod  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

from bench.saved_run import add_run_arguments, render_saved, rep_axes, run_meta, save_figure, save_run  # noqa: E402

K, BEAM = 10, 20
READY_TIMEOUT_S = 900.0  # a worker that has not loaded its model by then is a failure, not a wait


class Layout(NamedTuple):
    procs: int
    threads: int
    before: bool = False  # the runtime before issue 14: fixed threads, passive barriers, no jump-forward
    build: str = ""  # the name of the interpreter (--python NAME=PATH) it runs under; "" = this one


def parse_layouts(text: str, cpus: int = 2) -> list[Layout]:
    """``"1x2,2x1"`` -> [(1, 2), (2, 1)]: (processes, threads each); ``before`` -> (1, cpus, before=True);
    ValueError for anything else."""
    layouts = []
    for part in text.split(","):
        part, _, build = part.strip().partition("@")
        if part == "before":
            layouts.append(Layout(1, cpus, True, build))
            continue
        procs, sep, threads = part.partition("x")
        if not sep or not procs.isdigit() or not threads.isdigit() or int(procs) < 1 or int(threads) < 1:
            raise ValueError(f"a layout is PROCESSESxTHREADS, both at least 1, or before, each optionally "
                             f"@NAME (got {part!r})")
        layouts.append(Layout(int(procs), int(threads), False, build))
    if len(layouts) < 2 or len(set(layouts)) != len(layouts):
        raise ValueError("give at least two different layouts, the reference first")
    return layouts


def _worker(model: str, db: str, threads: int, jump: bool, warm_user: int, barrier, todo, done) -> None:
    """One process: load, rank the warm-up user, wait for the others, then rank users until a None."""
    try:
        from genrec_edge.recommend import Recommender

        rec = Recommender.open(model, db, threads=threads, beam=BEAM, prior="none", warn=lambda m: None,
                               jump_forward=jump)
        rec.recommend(user=warm_user, k=K)
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as one line
        barrier.abort()
        done.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        barrier.wait()
        while (user := todo.get()) is not None:
            began = time.perf_counter()
            result = rec.recommend(user=user, k=K)
            done.put(("user", user, [r.title for r in result.items], [r.score for r in result.items],
                      time.perf_counter() - began))
    except BaseException as exc:  # noqa: BLE001
        done.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        rec.close()


def run_layout(model: Path, db: Path, users: list[int], procs: int, threads: int, before: bool = False,
               progress=None) -> dict:
    """Rank ``users`` with ``procs`` processes of ``threads`` threads: seconds and each user's top-k.
    ``before``: the runtime before issue 14 (threads fixed and sleeping at barriers, no jump-forward)."""
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("spawn")  # a fresh interpreter: no llama.cpp or OpenMP state inherited
    barrier, todo, done = ctx.Barrier(procs + 1), ctx.Queue(), ctx.Queue()
    for user in users:
        todo.put(user)
    for _ in range(procs):
        todo.put(None)
    workers = [ctx.Process(target=_worker, args=(str(model), str(db), threads, not before, users[0], barrier, todo,
                                                 done))
               for _ in range(procs)]
    # A spawned child starts from this environment: engine.py reads it when llama_cpp loads there.
    saved = os.environ.get("GENREC_EDGE_ADAPT_THREADS")
    if before:
        os.environ["GENREC_EDGE_ADAPT_THREADS"] = "0"
    try:
        for w in workers:
            w.start()
    finally:
        if saved is None:
            os.environ.pop("GENREC_EDGE_ADAPT_THREADS", None)
        else:
            os.environ["GENREC_EDGE_ADAPT_THREADS"] = saved
    try:
        try:
            barrier.wait(timeout=READY_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise RuntimeError(_first_error(done) or "a worker did not start") from None
        began = time.perf_counter()
        ranked: dict[int, dict] = {}
        took: dict[int, float] = {}  # each user's own ranking time, in its worker
        while len(ranked) < len(users):
            try:
                event = done.get(timeout=5.0)
            except queue_mod.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("every worker exited before all users were ranked") from None
                continue
            if event[0] == "error":
                raise RuntimeError(event[1])
            ranked[event[1]] = {"titles": event[2], "scores": event[3]}
            took[event[1]] = event[4]
            if progress:
                progress()
        seconds = time.perf_counter() - began
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    return {"seconds": seconds, "results": {str(u): ranked[u] for u in users}, "user_seconds": [took[u] for u in users]}


def run_layout_under(python: str, model: Path, db: Path, users: list[int], layout: Layout) -> dict:
    """:func:`run_layout` in a child of another interpreter (its venv's llama.cpp build): its JSON result."""
    import json
    import subprocess

    job = json.dumps({"model": str(model), "db": str(db), "users": users, "procs": layout.procs,
                      "threads": layout.threads, "before": layout.before})
    proc = subprocess.run([python, "-m", "bench.process_split", "--one-layout", job], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    return json.loads(lines[-1])


def _first_error(done) -> str | None:
    try:
        while True:
            event = done.get(timeout=1.0)
            if event[0] == "error":
                return event[1]
    except queue_mod.Empty:
        return None


def name(layout: Layout) -> str:
    base = "before" if layout.before else f"{layout.procs}x{layout.threads}"
    return f"{base}@{layout.build}" if layout.build else base


def is_before(lay: str) -> bool:
    return lay.partition("@")[0] == "before"


def build_of(lay: str) -> str:
    return lay.partition("@")[2]


def summarize(runs: list[dict], layouts: list[str]) -> dict:
    """Per layout: users/s by rep and its ratio to the first layout's in the same rep; identical results."""
    ref = layouts[0]
    first = runs[0][ref]["results"]
    users = len(first)
    out: dict = {"reference": ref, "layouts": {}}
    for lay in layouts:
        rates = [users / run[lay]["seconds"] for run in runs]
        ratios = [run[ref]["seconds"] / run[lay]["seconds"] for run in runs]  # of users/s, same users
        out["layouts"][lay] = {"users_per_s": rates, "ratio": ratios, "ratio_median": statistics.median(ratios),
                               "ratio_min": min(ratios), "ratio_max": max(ratios)}
        one_process = is_before(lay) or lay.startswith("1x")
        if one_process and all("user_seconds" in run[lay] for run in runs):
            p50 = [statistics.median(run[lay]["user_seconds"]) for run in runs]
            out["layouts"][lay]["p50_s"] = p50
            if "p50_s" in out["layouts"][ref]:  # a request's median time against the reference's, rep by rep
                ref_p50 = out["layouts"][ref]["p50_s"]
                out["layouts"][lay]["p50_ratio"] = [a / b for a, b in zip(p50, ref_p50, strict=True)]
    # The shipped runtime in any layout of one build: bitwise the same results. The old one adds the same
    # log-probabilities in another order (no jump-forward), and another build rounds differently: those are
    # held to the same titles and reported with their largest score difference.
    shipped = [lay for lay in layouts if not is_before(lay)]
    same_build = [lay for lay in shipped if build_of(lay) == build_of(shipped[0])]
    base = runs[0][shipped[0]]["results"]
    out["base"] = shipped[0]
    out["identical_users"] = sum(all(run[lay]["results"][u] == base[u] for run in runs for lay in same_build)
                                 for u in base)
    out["others"] = {}
    for lay in layouts:
        if lay in same_build:
            continue
        old = [run[lay]["results"][u] for run in runs for u in base]
        new = [base[u] for _ in runs for u in base]
        out["others"][lay] = {
            "same_titles": sum(all(run[lay]["results"][u]["titles"] == base[u]["titles"] for run in runs)
                               for u in base),
            "max_score_diff": max((abs(a - b) for o, n in zip(old, new, strict=True)
                                   for a, b in zip(o["scores"], n["scores"], strict=False)), default=0.0),
        }
    if "before" in out["others"]:  # the names of runs saved before builds could be compared
        out["before_same_titles"] = out["others"]["before"]["same_titles"]
        out["before_max_score_diff"] = out["others"]["before"]["max_score_diff"]
    out["users"] = users
    return out


def render(data: dict, stem: Path) -> None:
    """``stem``.md and ``stem``.png from a saved run's dict."""
    meta, summ = data["meta"], data["summary"]
    layouts = list(summ["layouts"])
    ref = summ["reference"]
    lines = [
        "# Throughput by process layout (`python -m bench.process_split`)", "",
        f"{meta['model']}, {meta['machine']} with {meta['cpus']} usable CPUs, llama-cpp-python {meta['llama_cpp']}, "
        f"{meta['date']}; {meta['users']} users, top-{K}, beam {BEAM}, prior off. `PxT` = P processes with up to "
        "T llama.cpp threads each (adaptive, as shipped), pulling users from one queue"
        + ("; `before` = the runtime before issue 14 (one process, threads fixed and sleeping at barriers, forced "
           "suffixes step by step)" if any(is_before(lay) for lay in layouts) else "")
        + ("; `@NAME` = under the interpreter " + ", ".join(f"{k} = `{v}`" for k, v in meta["pythons"].items())
           if meta.get("pythons") else "")
        + ". Shared, noisy CPU: compare within a rep.", "",
        "| rep | order | " + " | ".join(f"{lay} users/s" for lay in layouts) + " | "
        + " | ".join(f"{lay} / {ref}" for lay in layouts[1:]) + " |",
        "|---:|---|" + "---:|" * (2 * len(layouts) - 1),
    ]
    for i, order in enumerate(data["orders"]):
        lines.append(f"| {i + 1} | {' → '.join(order)} | "
                     + " | ".join(f"{summ['layouts'][lay]['users_per_s'][i]:.3f}" for lay in layouts) + " | "
                     + " | ".join(f"{summ['layouts'][lay]['ratio'][i]:.2f}×" for lay in layouts[1:]) + " |")
    lines.append("")
    for lay in layouts[1:]:
        s = summ["layouts"][lay]
        lines.append(f"{lay} / {ref}, paired by rep: median **{s['ratio_median']:.2f}×** (range {s['ratio_min']:.2f}–"
                     f"{s['ratio_max']:.2f}×, {len(s['ratio'])} reps).")
    for lay in layouts:
        s = summ["layouts"][lay]
        if "p50_s" in s:
            ratio = (f"; / {ref}, paired by rep: median **{statistics.median(s['p50_ratio']):.2f}×** "
                     f"({min(s['p50_ratio']):.2f}–{max(s['p50_ratio']):.2f}×)" if "p50_ratio" in s and lay != ref else "")
            lines.append(f"{lay}: one user's median time by rep "
                         + ", ".join(f"{v * 1000:.0f}" for v in s["p50_s"]) + f" ms{ratio}.")
    others = summ.get("others", {"before": {"same_titles": summ.get("before_same_titles"),
                                            "max_score_diff": summ.get("before_max_score_diff")}}
                      if "before" in layouts else {})
    lines.append(f"Identical top-{K} titles and scores in every layout{' but ' + ', '.join(others) if others else ''} "
                 f"and rep: **{summ['identical_users']}/{summ['users']}** users.")
    for lay, o in others.items():
        why = ("the same log-probabilities summed in another order" if lay == "before"
               else "another runtime or llama.cpp build: other kernels, other rounding")
        lines.append(f"`{lay}` against {summ.get('base', 'them')}, every rep: the same top-{K} titles for "
                     f"**{o['same_titles']}/{summ['users']}** users, scores within {o['max_score_diff']:.1e} ({why}).")
    lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    reps = list(range(1, len(data["orders"]) + 1))
    for lay, marker in zip(layouts, "osd^v", strict=False):
        ax.plot(reps, summ["layouts"][lay]["users_per_s"], marker + "-",
                label=lay if lay == "before" else f"{lay} (processes x threads)")
    ax.set_ylabel("users per second")
    rep_axes(ax, reps)
    ax.set_title(f"batch throughput by layout: {meta['cpus']} CPUs, {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    from genrec_edge.cpu_share import usable_cpus

    cpus = usable_cpus()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layouts", default=f"1x{cpus},{cpus}x1" if cpus > 1 else "1x1,2x1",
                        help="PROCESSESxTHREADS or before,... the first is the reference (default: 1x<cpus>,<cpus>x1)")
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                        help="an interpreter (another venv's llama.cpp build) for the layouts written LAYOUT@NAME")
    parser.add_argument("--one-layout", help=argparse.SUPPRESS)  # internal: run_layout_under's child
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.one_layout:
        import json

        job = json.loads(args.one_layout)
        print(json.dumps(run_layout(Path(job["model"]), Path(job["db"]), job["users"], job["procs"], job["threads"],
                                    job["before"])))
        return 0
    if args.render:
        return render_saved(parser, args.render, render)
    try:
        layouts = parse_layouts(args.layouts, cpus)
    except ValueError as exc:
        parser.error(f"--layouts: {exc}")
    pythons = dict(p.partition("=")[::2] for p in args.python)
    if any(not k or not v for k, v in pythons.items()):
        parser.error("--python: give NAME=PATH")
    unknown = sorted({lay.build for lay in layouts if lay.build and lay.build not in pythons})
    if unknown:
        parser.error(f"--layouts: no --python NAME=PATH for {', '.join(unknown)}")
    if args.users < 1 or args.reps < 1:
        parser.error("--users and --reps must be at least 1")

    from tqdm.auto import tqdm

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    model_path = args.model or default_model_path()
    db = args.db or default_db()
    users = bench_users(db, args.users)
    names = [name(lay) for lay in layouts]
    runs, orders = [], []
    with tqdm(total=args.reps * len(layouts) * len(users), desc="users ranked", unit="user") as bar:
        for rep in range(args.reps):
            order = layouts if rep % 2 == 0 else layouts[::-1]  # drift hits every layout alike
            run = {}
            for lay in order:
                try:
                    if lay.build:
                        run[name(lay)] = run_layout_under(pythons[lay.build], model_path, db, users, lay)
                        bar.update(len(users))
                    else:
                        run[name(lay)] = run_layout(model_path, db, users, lay.procs, lay.threads, lay.before,
                                                    progress=lambda: bar.update(1))
                except RuntimeError as exc:
                    raise SystemExit(f"error: layout {name(lay)}: {exc}") from None
            runs.append(run)
            orders.append([name(lay) for lay in order])
    data = {
        "meta": run_meta(model_path, users=len(users), reps=args.reps, **({"pythons": pythons} if pythons else {})),
        "orders": orders, "users": users,
        "seconds": [{lay: run[lay]["seconds"] for lay in names} for run in runs],
        "user_seconds": [{lay: run[lay]["user_seconds"] for lay in names} for run in runs],
        "summary": summarize(runs, names),
    }
    save_run(data, args.out, "process-split", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
