"""`genrec-edge serve --workers N`: concurrent /recommend throughput and lone-request latency, side by side.

    .venv/bin/python -m bench.serve_workers [--workers 0,1,2] [--users 32] [--clients 4] [--lone 8] [--reps 3]

``--workers 0`` searches in the HTTP process itself (the service before search processes); N ≥ 1 in N
spawned processes (genrec_edge/pool.py).

For each rep, and each worker count in turn (the order alternating rep by rep), a real ``genrec-edge
serve`` process is started on a free port with the default model and database (its shipped prior, the
adaptive thread count, beam 20, no result cache), and asked over HTTP, one new connection per request:

1. ``--lone`` users one after another (a desktop app's case): the latency each request sees;
2. ``--users`` users by ``--clients`` clients at once, each taking the next user when its answer is in
   (a busy service): users/s from the first request to the last answer, and the mean latency.

Each server first answers ``--clients`` warm-up requests at once (every worker has searched once). The
answers must agree across worker counts and reps (top-10 titles, scores within 1e-4); the report says
whether they did. Output: ``bench/results/serve-workers-<date>.{md,json,png}``; ``--render RUN.json``
redraws a saved run. The CPU is shared: compare the ratios of one rep.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue as queue_mod
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.saved_run import add_run_arguments, render_saved, rep_axes, run_meta, save_figure, save_run

K, BEAM = 10, 20
START_TIMEOUT_S = 300.0


def parse_workers(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ValueError unless at least two different whole numbers."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"a worker count is a whole number, 0 or more (got {part!r})")
        counts.append(int(part))
    if len(counts) < 2 or len(set(counts)) != len(counts):
        raise ValueError("give at least two different worker counts, the reference first")
    return counts


def start_server(model: Path, db: Path, workers: int, cache: int = 0,
                 beam: int | None = BEAM) -> tuple[subprocess.Popen, int]:
    """A ``genrec-edge serve`` on a free port, once it listens: (process, port). ``cache=0``: every request
    searches (what this bench measures). ``beam=None``: serve's default (max(10, 2k) per request)."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--quiet", "--model", str(model), "--db",
         str(db), *(["--beam", str(beam)] if beam is not None else []), "--workers", str(workers), "--cache", str(cache)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    timer = threading.Timer(START_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if line.startswith("serving on http://127.0.0.1:"):
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
                return proc, int(line.split("http://127.0.0.1:", 1)[1].split(" ", 1)[0])
    finally:
        timer.cancel()
    proc.wait()
    raise RuntimeError(f"the server did not start: {lines[-1] if lines else 'no output'}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post_recommend(port: int, user: int) -> tuple[float, dict]:
    """One POST /recommend on a new connection: (seconds, the whole JSON answer)."""
    body = json.dumps({"user": user, "k": K})
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/recommend", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"user {user}: HTTP {response.status}: {payload.get('error')}")
    return time.perf_counter() - began, payload


def ask(port: int, user: int) -> tuple[float, dict]:
    """One POST /recommend: (seconds, its top-k titles and scores)."""
    seconds, payload = post_recommend(port, user)
    return seconds, {"titles": [r["title"] for r in payload["items"]], "scores": [r["score"] for r in payload["items"]]}


def concurrent(port: int, users: list[int], clients: int, progress=None) -> dict:
    """``clients`` threads, each asking for the next user until none is left."""
    todo: queue_mod.Queue = queue_mod.Queue()
    for user in users:
        todo.put(user)
    latencies: list[float] = []
    answers: dict[str, dict] = {}
    errors: list[str] = []

    def client() -> None:
        while True:
            try:
                user = todo.get_nowait()
            except queue_mod.Empty:
                return
            try:
                seconds, answer = ask(port, user)
            except Exception as exc:  # noqa: BLE001 - reported below as one line
                errors.append(str(exc))
                return
            latencies.append(seconds)
            answers[str(user)] = answer
            if progress:
                progress()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(errors[0])
    return {"seconds": seconds, "latencies": latencies, "answers": answers}


def run_layout(model: Path, db: Path, workers: int, users: list[int], lone: list[int], clients: int,
               progress=None) -> dict:
    proc, port = start_server(model, db, workers)
    try:
        concurrent(port, [users[0]] * clients, clients)  # warm-up: every worker searches once
        lone_s, lone_answers = [], {}
        for user in lone:
            seconds, answer = ask(port, user)
            lone_s.append(seconds)
            lone_answers[str(user)] = answer
            if progress:
                progress()
        busy = concurrent(port, users, clients, progress)
    finally:
        stop_server(proc)
    return {"lone_s": lone_s, "lone_answers": lone_answers, **busy}


def _agree(a: dict, b: dict) -> bool:
    return a["titles"] == b["titles"] and all(abs(x - y) <= 1e-4 for x, y in zip(a["scores"], b["scores"], strict=True))


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per worker count: users/s, lone p50 and busy mean latency by rep, and ratios to the reference's in the
    same rep; how many users got the same answer everywhere."""
    ref = names[0]
    out: dict = {"reference": ref, "layouts": {}}
    for lay in names:
        rates = [len(run[lay]["answers"]) / run[lay]["seconds"] for run in runs]
        lone_p50 = [statistics.median(run[lay]["lone_s"]) for run in runs]
        busy_mean = [statistics.fmean(run[lay]["latencies"]) for run in runs]
        thr = [run[ref]["seconds"] / run[lay]["seconds"] for run in runs]  # of users/s, same users
        lone = [statistics.median(run[lay]["lone_s"]) / statistics.median(run[ref]["lone_s"]) for run in runs]
        out["layouts"][lay] = {
            "users_per_s": rates, "lone_p50_s": lone_p50, "busy_mean_s": busy_mean,
            "throughput_ratio": thr, "throughput_ratio_median": statistics.median(thr),
            "throughput_ratio_min": min(thr), "throughput_ratio_max": max(thr),
            "lone_ratio": lone, "lone_ratio_median": statistics.median(lone),
        }
    first = runs[0][ref]
    keys = [("answers", u) for u in first["answers"]] + [("lone_answers", u) for u in first["lone_answers"]]
    out["agreeing"] = sum(all(_agree(run[lay][part][u], first[part][u]) for run in runs for lay in names)
                          for part, u in keys)
    out["asked"] = len(keys)
    return out


def render(data: dict, stem: Path) -> None:
    """``stem``.md and ``stem``.png from a saved run's dict."""
    meta, summ = data["meta"], data["summary"]
    names = list(summ["layouts"])
    ref = summ["reference"]
    lay_s = summ["layouts"]
    lines = [
        "# `genrec-edge serve --workers N` (`python -m bench.serve_workers`)", "",
        f"{meta['model']}, {meta['machine']} with {meta['cpus']} usable CPUs, llama-cpp-python {meta['llama_cpp']}, "
        f"{meta['date']}. Top-{K}, beam {BEAM}, the model's shipped prior, adaptive threads, one new HTTP connection "
        f"per request. Lone: {meta['lone']} users one after another. Busy: {meta['users']} users by "
        f"{meta['clients']} clients at once. Workers 0: the search runs in the HTTP process; N: in N search "
        "processes (`serve --workers N`). Shared, noisy CPU: compare within a rep.", "",
        "| rep | order | " + " | ".join(f"workers {n}: busy users/s" for n in names) + " | "
        + " | ".join(f"workers {n}: lone p50 s" for n in names) + " | "
        + " | ".join(f"{n} / {ref} users/s" for n in names[1:]) + " |",
        "|---:|---|" + "---:|" * (3 * len(names) - 1),
    ]
    for i, order in enumerate(data["orders"]):
        lines.append(
            f"| {i + 1} | {' → '.join(order)} | "
            + " | ".join(f"{lay_s[n]['users_per_s'][i]:.3f}" for n in names) + " | "
            + " | ".join(f"{lay_s[n]['lone_p50_s'][i]:.2f}" for n in names) + " | "
            + " | ".join(f"{lay_s[n]['throughput_ratio'][i]:.2f}×" for n in names[1:]) + " |")
    lines.append("")
    for n in names[1:]:
        s = lay_s[n]
        lines.append(
            f"- workers {n} / workers {ref}, paired by rep: busy users/s **{s['throughput_ratio_median']:.2f}×** "
            f"(range {s['throughput_ratio_min']:.2f}–{s['throughput_ratio_max']:.2f}×, {len(s['throughput_ratio'])} "
            f"reps); lone-request p50 {s['lone_ratio_median']:.2f}× (median of the reps' ratios); mean latency "
            f"under load {statistics.median(s['busy_mean_s']):.2f} s vs {statistics.median(lay_s[ref]['busy_mean_s']):.2f} s.")
    lines += [f"- Same top-{K} titles (scores within 1e-4) for every worker count and rep: **{summ['agreeing']}/"
              f"{summ['asked']}** requests.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    reps = list(range(1, len(data["orders"]) + 1))
    for n, marker in zip(names, "osd^v", strict=False):
        left.plot(reps, lay_s[n]["users_per_s"], marker + "-", label=f"--workers {n}")
        right.plot(reps, lay_s[n]["lone_p50_s"], marker + "-", label=f"--workers {n}")
    left.set_title(f"busy: users/s ({meta['clients']} clients)", fontsize=10)
    right.set_title("lone request: p50 seconds", fontsize=10)
    for ax in (left, right):
        rep_axes(ax, reps)
    fig.suptitle(f"serve --workers: {meta['cpus']} CPUs, {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    from genrec_edge.cpu_share import usable_cpus

    cpus = usable_cpus()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=f"0,1,{max(2, cpus)}",
                        help="counts to compare, the reference first (0: search in the HTTP process)")
    parser.add_argument("--users", type=int, default=32, help="users asked by the concurrent clients")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--lone", type=int, default=8, help="users asked one after another")
    parser.add_argument("--reps", type=int, default=3)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    try:
        counts = parse_workers(args.workers)
    except ValueError as exc:
        parser.error(f"--workers: {exc}")
    if min(args.users, args.clients, args.lone, args.reps) < 1:
        parser.error("--users, --clients, --lone and --reps must be at least 1")

    from tqdm.auto import tqdm

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    model_path = args.model or default_model_path()
    db = args.db or default_db()
    sample = bench_users(db, args.users + args.lone)
    lone, users = sample[: args.lone], sample[args.lone :] or sample[: args.users]
    names = [str(n) for n in counts]
    runs, orders = [], []
    with tqdm(total=args.reps * len(counts) * (len(users) + len(lone)), desc="requests", unit="req") as bar:
        for rep in range(args.reps):
            order = counts if rep % 2 == 0 else counts[::-1]  # drift hits every count alike
            run = {}
            for n in order:
                try:
                    run[str(n)] = run_layout(model_path, db, n, users, lone, args.clients, lambda: bar.update(1))
                except RuntimeError as exc:
                    raise SystemExit(f"error: --workers {n}: {exc}") from None
            runs.append(run)
            orders.append([str(n) for n in order])
    data = {
        "meta": run_meta(model_path, users=len(users), lone=len(lone), clients=args.clients, reps=args.reps),
        "orders": orders, "users": users, "lone_users": lone,
        "runs": runs,
        "summary": summarize(runs, names),
    }
    save_run(data, args.out, "serve-workers", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
