"""llama.cpp builds side by side: pp/tg tokens/s and recommend latency, one interpreter per build.

Why: ``make install`` compiles llama.cpp for the machine it runs on (``LLAMA_CPU=native``: -march=native
minus AMX) or for any x86-64-v3 (``LLAMA_CPU=portable``). This measures what each costs on *this* CPU,
interleaving the builds rep by rep so that load from other jobs hits both alike.

    python -m bench.cpu_builds --python native=.venv/bin/python --python portable=/tmp/venv-portable/bin/python \\
        --model ~/.local/share/genrec-edge/models/default-*/model-Q8_0.gguf --reps 5

Each build runs as a child ``<python> -m bench.cpu_builds --child ...``. The other venv needs its own
llama-cpp-python wheel and this checkout installed without extras (``<venv>/bin/pip install -e .``: pip keeps
the llama-cpp-python already there; the package maps ``convert/`` to ``genrec_edge.convert``, so a bare
PYTHONPATH is not enough). Prints a markdown table of medians and the spread over reps.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def child(args) -> None:
    from bench.measure import llama_bench
    from genrec_edge.engine import llama_cpp  # through engine.py: its OpenMP settings precede the load
    from genrec_edge.recommend import Recommender

    result = llama_bench(Path(args.model), args.threads, args.n_prompt, args.n_gen, reps=1, seed=0)
    latencies = []
    with Recommender.open(args.model, args.db, threads=args.threads, prior="none", warn=lambda m: None) as rec:
        rec.recommend(user=args.users[0], k=10)  # warm-up
        for user in args.users:
            latencies.append(rec.recommend(user=user, k=10, prior="none").timings.total_ms)
    print(json.dumps({
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "pp": result["pp"]["mean"], "tg": result["tg"]["mean"], "recommend_ms": statistics.median(latencies),
    }))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[], help="name=/path/to/python (repeat)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--db", default=None, help="history database (default: the one `init` builds)")
    parser.add_argument("--users", type=int, nargs="+", default=[42, 1, 7])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-prompt", type=int, default=256)
    parser.add_argument("--n-gen", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.db is None:
        from genrec_edge.paths import default_db

        args.db = str(default_db())
    if args.child:
        child(args)
        return 0
    builds = dict(spec.split("=", 1) for spec in args.python)
    if len(builds) < 1:
        parser.error("give at least one --python name=/path/to/python")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for rep in range(args.reps):
        for name, python in builds.items():
            cmd = [python, "-m", "bench.cpu_builds", "--child", "--model", args.model, "--db", args.db,
                   "--threads", str(args.threads), "--n-prompt", str(args.n_prompt), "--n-gen", str(args.n_gen),
                   "--users", *map(str, args.users)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"rep {rep + 1}/{args.reps} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)

    def cell(values, fmt):
        med = statistics.median(values)
        return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    first = next(iter(builds))
    print(f"| build | pp{args.n_prompt} tok/s | tg{args.n_gen} tok/s | recommend p50 ms | ratio vs {first} (rec) | compiled |")
    print("|---|---:|---:|---:|---:|---|")
    base = statistics.median(r["recommend_ms"] for r in runs[first])
    for name, results in runs.items():
        rec_ms = [r["recommend_ms"] for r in results]
        info = results[0]["system_info"].replace("CPU : ", "").replace(" = 1", "").replace(" |", ",").strip(", ")
        print(f"| {name} | {cell([r['pp'] for r in results], '{:.0f}')} | {cell([r['tg'] for r in results], '{:.1f}')} | "
              f"{cell(rec_ms, '{:.0f}')} | {statistics.median(rec_ms) / base:.2f}× | {info} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
