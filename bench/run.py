"""``make bench``: quantization levels compared on speed, memory and recommendation quality, with peers.

One run, every number side by side on the same machine, model, users and threads::

    F16 GGUF --quantize (cached by the F16's sha256)--> one file per level
    per level, in a child process (bench.measure): load, pp/tg tokens/s (llama-bench convention),
        recommend latency and top-k per user, first constrained step's distribution, peak RSS
    peers: popularity and SASRec (trained now, best epoch on validation), scored on the user sample and
        on every test user; transformers' constrained beam search on the same F16 (a few users)
    -> evaluation.evaluate (the project's protocol) per level and peer; agreement with F16; 95% bootstrap
       intervals on every quality cell and paired differences of each level from F16 (genrec_edge.stats)
    -> bench/results/<date>-<dataset>.md / .csv / .json / .png (and the table on stdout)

Columns and the protocol: bench/README.md. Example::

    python -m bench.run --levels F16,Q8_0,Q4_K_M --users 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before anything imports llama_cpp (FINDINGS.md)

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from genrec_edge.errors import BenchError, FileAccessError, GenrecError, NotFoundError, UsageError  # noqa: E402
from genrec_edge.quantize import LEVELS  # noqa: E402
from genrec_edge.recommend import MAX_THREADS  # noqa: E402
from genrec_edge.signals import held_signals  # noqa: E402
from genrec_edge.stats import SMALL_SAMPLE, SMALL_SAMPLE_NOTE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO / "bench" / "results"
DEFAULT_LEVELS = LEVELS  # every level, F16 (the reference) first
REFERENCE = "F16"
KS = (1, 5, 10)


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run depends on; the CLI flags have the same names."""

    levels: tuple[str, ...] = DEFAULT_LEVELS
    users: int = 10  # seeded sample of test users (ignored with full)
    full: bool = False  # every test user
    seed: int = 0
    threads: int | None = None  # default: engine.default_threads()
    model_f16: Path | None = None  # default: default_model.build_f16()
    db: Path | None = None  # default: paths.default_db(), built if missing
    out_dir: Path = DEFAULT_OUT_DIR
    work_dir: Path | None = None  # quantized files; default: <cache>/bench/<F16 sha256[:16]>
    skip_peers: bool = False
    hf_users: int = 2  # transformers' beam search: the first hf_users users of the sample
    k: int = 10
    beam: int | None = None  # default: the recommender's default_beam(k)
    pp: int = 512
    tg: int = 128
    reps: int = 2
    sasrec_epochs: int = 200
    sasrec_seconds: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("users", "k", "pp", "tg", "reps", "sasrec_epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.hf_users < 0:
            problems.append(f"--hf-users must be >= 0 (got {self.hf_users})")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:  # 100,000 segfaulted a child
            problems.append(f"--threads must be 1..{MAX_THREADS}, llama.cpp's limit (got {self.threads})")
        if self.beam is not None and self.beam < 1:
            problems.append(f"--beam must be >= 1 (got {self.beam})")
        if not (math.isfinite(self.sasrec_seconds) and self.sasrec_seconds > 0):  # NaN, inf: SASRec refused them
            problems.append(f"--sasrec-seconds must be a finite number > 0 (got {self.sasrec_seconds})")
        if self.k < 5:
            problems.append(f"--k must be >= 5: the tables report HR@5 and NDCG@5 (got {self.k})")
        if not self.levels:
            problems.append("no levels given")
        if problems:
            raise UsageError("; ".join(problems))


# =========================================================================================== inputs
def resolve_db(db: Path | None) -> Path:
    from genrec_edge import paths

    if db is not None:
        if not Path(db).is_file():
            raise NotFoundError(f"database not found: {db}")
        return Path(db)
    path = paths.default_db()
    if not path.is_file():
        from genrec_edge.ingest import build_default_db

        print(f"Building the default database (once): {path}", file=sys.stderr)
        build_default_db(path)
    return path


def file_info(path: Path) -> dict:
    """Size, effective bits per weight (GGUFHeaderInfo.bits_per_weight, as quantize reports) and types."""
    from genrec_edge.convert.header import require_llama, validate_gguf_header

    info = require_llama(validate_gguf_header(path))
    return {
        "path": str(path),
        "size_bytes": info.file_size,
        "n_params": info.n_params,
        "bpw": info.bits_per_weight,
        "tensor_types": info.tensor_type_counts(),
    }


def parse_levels(levels: str | Sequence[str]) -> tuple[str, ...]:
    """Validated level names with F16 (the reference every agreement column compares to) first."""
    from genrec_edge.quantize import parse_levels as parse

    names = parse(levels)
    return tuple([REFERENCE] + [n for n in names if n != REFERENCE])


def prepare_levels(src: Path, levels: Sequence[str], work_dir: Path, threads: int, progress: bool) -> dict[str, Path]:
    """Level -> GGUF path; quantizes only the levels whose file is not in ``work_dir`` yet.

    ``work_dir`` is keyed by the F16's sha256, so a cached file always comes from this very F16
    (quantize writes atomically: a file that exists is complete).
    """
    from genrec_edge.quantize import output_path, quantize

    work_dir.mkdir(parents=True, exist_ok=True)
    paths, missing = {}, []
    for level in levels:
        dst = output_path(src, level, work_dir)
        if dst.is_file():
            paths[level] = dst
        else:
            missing.append(level)
    if missing:
        for result in quantize(src, missing, out_dir=work_dir, threads=threads, progress=progress):
            paths[result.level] = result.path  # F16 of an F16 source is the source itself
    return {level: paths[level] for level in levels}


@dataclass(frozen=True)
class Inputs:
    db: Path
    dataset: str
    catalog: object = field(repr=False)
    sequences: list = field(repr=False)
    test: tuple = field(repr=False)  # every test example (one per user)
    sample: tuple = field(repr=False)  # the measured users' examples, by user id


def load_inputs(db_path: Path, users: int, full: bool, seed: int) -> Inputs:
    from genrec_edge.history import HistoryDB
    from genrec_edge.prompts import leave_one_out

    with HistoryDB.open(db_path, readonly=True) as db:
        dataset = db.dataset()
        catalog = db.catalog()
        sequences = list(db.sequences())
    if len(catalog) == 0:
        raise NotFoundError(f"the database has no items: {db_path}")
    test = tuple(sorted(leave_one_out(sequences, train=False).test, key=lambda e: e.user))
    if not test:
        raise UsageError(f"{db_path}: no user has the 2 interactions a test example needs")
    if full or users >= len(test):
        sample = test
    else:
        sample = tuple(sorted(random.Random(seed).sample(test, users), key=lambda e: e.user))
    name = dataset.name if dataset is not None else db_path.stem
    return Inputs(db_path, name, catalog, sequences, test, sample)


# =========================================================================================== children
def _child_env() -> dict:
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "passive"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_child(label: str, args: list[str], out: Path, on_event) -> dict:
    """Run ``python -m bench.measure args``; feed its progress events to ``on_event``; return its JSON.

    Adds the child's CPU seconds (user + system, from RUSAGE_CHILDREN) and wall seconds: CPU / wall
    well under the thread count means the machine was busy and the timings are inflated.
    """
    from bench.measure import EVENT_PREFIX

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.measure", *args, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env=_child_env(),
        )
        try:
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    on_event(json.loads(line[len(EVENT_PREFIX) :]))
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0 or not out.is_file():
            err.seek(0)
            lines = [x.strip() for x in err.read().splitlines() if x.strip()]
            errors = [x for x in lines if x.startswith("error:") or "Error" in x]
            last = (errors or lines or ["no output"])[-1]
            raise BenchError(f"{label}: measurement failed (exit code {rc}): {last}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - started
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


class Progress:
    """rich progress on stderr: one bar for the whole run, counted in recommendations (every level's users, then
    transformers'), and one for the users of the current child; each with its elapsed time and an ETA."""

    def __init__(self, enabled: bool, n_users: int, console=None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
            speed_estimate_period=24 * 3600,  # the ETA from every user so far, not the last 30 s (a few users)
        )
        self.jobs = self.bar.add_task("bench (users × levels)", total=n_users, note="")
        self.users = self.bar.add_task("users", total=None, note="", visible=False)
        self._done = 0  # the current child's users already counted in the whole run's bar

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def start(self, label: str) -> None:
        self.bar.update(self.jobs, note=label)
        self.bar.reset(self.users, total=None, visible=True, description=f"  {label}", note="starting")
        self._done = 0

    def event(self, event: dict) -> None:
        if event["event"] == "phase":
            self.bar.update(self.users, note=event["name"])
        elif event["event"] == "users":
            self.bar.update(self.users, total=event["total"], completed=event["done"], note="recommend")
            self.bar.advance(self.jobs, event["done"] - self._done)
            self._done = event["done"]

    def done(self) -> None:
        self.bar.update(self.users, visible=False)


# =========================================================================================== metrics
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def first_step_kl(ref_npz: Path, level_npz: Path) -> list[float]:
    """Per user KL(P_F16 || P_level) of the first constrained step.

    P is the softmax, renormalised over the trie root's children that still lead to an unseen title,
    of the full-vocabulary log-probs after the prompt: the distribution the search's first step ranks.
    """
    import numpy as np

    ref, lev = np.load(ref_npz), np.load(level_npz)
    if not (np.array_equal(ref["tokens"], lev["tokens"]) and np.array_equal(ref["mask"], lev["mask"])):
        raise BenchError("first-step rows of two levels cover different tokens (different tries?)")
    out = []
    for p_row, q_row, mask in zip(ref["logp"], lev["logp"], ref["mask"], strict=True):
        p = p_row[mask].astype(np.float64)
        q = q_row[mask].astype(np.float64)
        p -= np.logaddexp.reduce(p)
        q -= np.logaddexp.reduce(q)
        out.append(max(0.0, float(np.sum(np.exp(p) * (p - q)))))
    return out


def first_step_top1(ref_npz: Path, level_npz: Path) -> float:
    """Share of users whose most likely first title token is the same as F16's."""
    import numpy as np

    ref, lev = np.load(ref_npz), np.load(level_npz)
    masked = lambda a: np.where(ref["mask"], a["logp"], -np.inf)  # noqa: E731
    return float(np.mean(np.argmax(masked(ref), axis=1) == np.argmax(masked(lev), axis=1)))


def title_rank_fn(examples, rankings: Sequence[Sequence[str]], catalog):
    """evaluation's rank_fn (example -> item ids) from per-example title lists."""
    from genrec_edge.evaluation import from_rankings

    items = [[catalog.title_to_items[t][0] for t in titles] for titles in rankings]
    return from_rankings(examples, items)


def score_ks(k: int) -> tuple[int, ...]:
    return tuple(sorted(set(KS) | {k}))


def score(examples, rankings, catalog, k: int):
    from genrec_edge.evaluation import evaluate

    return evaluate(title_rank_fn(examples, rankings, catalog), examples, catalog, ks=score_ks(k), k_max=k,
                    progress=False)


def quality_names(k: int) -> tuple[str, ...]:
    return ("HR@5", f"HR@{k}", "NDCG@5", f"NDCG@{k}", f"MRR@{k}")


def quality_columns(result, k: int, seed: int = 0) -> dict:
    """HR/NDCG/MRR means (``evaluation``'s) with their 95% bootstrap intervals as ``<name>_lo`` / ``_hi``."""
    from genrec_edge.stats import mean_intervals

    names = quality_names(k)
    means = {"HR@5": result.hr[5], f"HR@{k}": result.hr[k], "NDCG@5": result.ndcg[5],
             f"NDCG@{k}": result.ndcg[k], f"MRR@{k}": result.mrr}
    intervals = mean_intervals(result.per_user(names), seed=seed)
    out = {}
    for name in names:
        out.update({name: means[name], f"{name}_lo": intervals[name].low, f"{name}_hi": intervals[name].high})
    return out


def difference_names(k: int) -> tuple[str, ...]:
    return (f"HR@{k}", f"NDCG@{k}", f"MRR@{k}")


def difference_columns(result, reference, k: int, seed: int = 0) -> dict:
    """``Δ<metric>``: mean per-user difference from ``reference`` on the same users, with its paired interval."""
    from genrec_edge.stats import paired_differences

    if result.users != reference.users:
        raise BenchError("a level and F16 were scored on different users")
    names = difference_names(k)
    diffs = paired_differences(result.per_user(names), reference.per_user(names), seed=seed)
    out = {}
    for name in names:
        d = diffs[name]
        out.update({f"Δ{name}": d.mean, f"Δ{name}_lo": d.low, f"Δ{name}_hi": d.high})
    return out


# =========================================================================================== the run
def resolve_model(model_f16: Path | None, catalog, db_path: Path, progress: bool) -> tuple[Path, dict]:
    """The F16 GGUF and its ``genrec.*`` provenance; refuses a model trained for another catalog."""
    from genrec_edge.catalog import check_model_catalog
    from genrec_edge.convert.header import read_provenance

    if model_f16 is not None:
        model_f16 = Path(model_f16)
        if not model_f16.is_file():
            raise NotFoundError(f"model file not found: {model_f16}")
    else:
        from genrec_edge.default_model import build_f16

        model_f16 = build_f16(progress=progress)
    provenance = read_provenance(model_f16)
    check_model_catalog(provenance.get("catalog_sha256"), catalog.sha256, model_f16.name, str(db_path))
    return model_f16, provenance


def measure_all(config: BenchConfig, inputs: Inputs, level_paths: dict[str, Path], threads: int, tmp: Path,
                phases: dict) -> tuple[dict[str, dict], dict | None]:
    """One bench.measure child per level, then the transformers child; their JSON results."""
    catalog, sample = inputs.catalog, inputs.sample
    hf_count = 0 if config.skip_peers else min(config.hf_users, len(sample))
    examples = [{"user": e.user, "history": [catalog.title_of(i) for i in e.history]} for e in sample]
    examples_file, hf_file = tmp / "examples.json", tmp / "hf-examples.json"
    examples_file.write_text(json.dumps(examples), encoding="utf-8")
    hf_file.write_text(json.dumps(examples[:hf_count]), encoding="utf-8")
    common = ["--db", str(inputs.db), "--threads", str(threads), "--k", str(config.k), "--seed", str(config.seed)]
    if config.beam is not None:
        common += ["--beam", str(config.beam)]
    measured: dict[str, dict] = {}
    hf = None
    with Progress(config.progress, len(level_paths) * len(examples) + hf_count) as progress:
        t0 = time.perf_counter()
        for level, path in level_paths.items():
            progress.start(level)
            out = tmp / f"{level}.json"
            args = ["--mode", "llama", "--model", str(path), "--examples", str(examples_file), *common,
                    "--pp", str(config.pp), "--tg", str(config.tg), "--reps", str(config.reps)]
            measured[level] = run_child(level, args, out, progress.event)
            measured[level]["npz"] = out.with_suffix(".npz")
            progress.done()
        phases["levels"] = time.perf_counter() - t0
        if hf_count:
            t0 = time.perf_counter()
            progress.start("transformers (F16)")
            args = ["--mode", "hf", "--model", str(level_paths[REFERENCE]), "--examples", str(hf_file), *common]
            hf = run_child("transformers", args, tmp / "hf.json", progress.event)
            progress.done()
            phases["transformers"] = time.perf_counter() - t0
    return measured, hf


def level_rows(levels, measured: dict, results: dict, level_paths: dict, threads: int, k: int,
               seed: int = 0) -> list[dict]:
    """One row per level: file, llama-bench, latency, quality, agreement with F16 (adds details to measured)."""
    from genrec_edge.evaluation import topk_overlap, topk_rank_correlation

    ref, ref_npz = results[REFERENCE], measured[REFERENCE]["npz"]
    rows = []
    for level in levels:
        m, r = measured[level], results[level]
        m["file"] = info = file_info(level_paths[level])
        m["kl_per_user"] = kl = first_step_kl(ref_npz, m["npz"])
        m["first_top1_agreement"] = first_step_top1(ref_npz, m["npz"])
        rows.append(
            {
                "name": level,
                "kind": "level",
                "users": r.n_users,
                "size_mb": info["size_bytes"] / 2**20,
                "bpw": info["bpw"],
                "load_s": m["load_ms"] / 1000,
                "peak_rss_mb": m["peak_rss_mb"],
                "threads": threads,
                "pp_ts": m["pp"]["mean"],
                "pp_sd": m["pp"]["sd"],
                "tg_ts": m["tg"]["mean"],
                "tg_sd": m["tg"]["sd"],
                "p50_ms": percentile(m["latency_ms"], 50),
                "p95_ms": percentile(m["latency_ms"], 95),
                **quality_columns(r, k, seed),
                **difference_columns(r, ref, k, seed),
                f"overlap@{k}": topk_overlap(r, ref, k),
                f"rho@{k}": topk_rank_correlation(r, ref, k),
                "kl_first": sum(kl) / len(kl),
            }
        )
    return rows


def hf_side_by_side(hf: dict, f16: dict, sample, catalog, threads: int, k: int) -> list[dict]:
    """llama.cpp F16 and transformers on the transformers users: latency, quality, agreement with ours."""
    from genrec_edge.evaluation import topk_overlap, topk_rank_correlation

    users = set(hf["users"])
    sub = tuple(e for e in sample if e.user in users)
    by_user = dict(zip(f16["users"], zip(f16["rankings"], f16["latency_ms"], strict=True), strict=True))
    ours = score(sub, [by_user[e.user][0] for e in sub], catalog, k)
    theirs = score(sub, hf["rankings"], catalog, k)
    hf["eval"] = theirs.to_dict()
    rows = []
    for name, res, latency, extra in (
        ("llama.cpp F16 (ours)", ours, [by_user[e.user][1] for e in sub], {"peak_rss_mb": f16["peak_rss_mb"]}),
        ("transformers F16 beam", theirs, hf["latency_ms"],
         {"peak_rss_mb": hf["peak_rss_mb"], "load_s": hf["load_ms"] / 1000}),
    ):
        rows.append(
            {
                "name": name,
                "kind": "hf-subset",
                "users": res.n_users,
                "threads": threads,
                "p50_ms": percentile(latency, 50),
                "p95_ms": percentile(latency, 95),
                **quality_columns(res, k),
                f"overlap@{k}": topk_overlap(res, ours, k),
                f"rho@{k}": topk_rank_correlation(res, ours, k),
                **extra,
            }
        )
    return rows


def run_bench(config: BenchConfig) -> dict:
    """Run everything; write the results files; return the report (what the JSON file holds)."""
    from genrec_edge.engine import default_threads

    started = time.perf_counter()
    phases: dict[str, float] = {}
    load_start = os.getloadavg()
    levels = parse_levels(config.levels)
    threads = config.threads or default_threads()
    db_path = resolve_db(config.db)
    inputs = load_inputs(db_path, config.users, config.full, config.seed)

    t0 = time.perf_counter()
    model_f16, provenance = resolve_model(config.model_f16, inputs.catalog, db_path, config.progress)
    from genrec_edge.hashing import sha256_file

    f16_sha = sha256_file(model_f16)
    if config.work_dir is not None:
        work_dir = Path(config.work_dir)
    else:
        from genrec_edge import paths

        work_dir = paths.cache_dir() / "bench" / f16_sha[:16]
    for option, folder in (("--out-dir", Path(config.out_dir)), ("--work-dir", work_dir)):
        require_writable_dir(option, folder)  # now, not after minutes of measuring
    level_paths = prepare_levels(model_f16, levels, work_dir, threads, config.progress)
    phases["model + quantize"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="genrec-bench-") as tmp:
        measured, hf = measure_all(config, inputs, level_paths, threads, Path(tmp), phases)
        results = {level: score(inputs.sample, measured[level]["rankings"], inputs.catalog, config.k)
                   for level in levels}
        rows = level_rows(levels, measured, results, level_paths, threads, config.k, config.seed)
    peers, peer_details = [], {}
    if not config.skip_peers:
        t0 = time.perf_counter()
        peers, peer_details = score_peers(inputs, config.k, threads, config)
        phases["popularity + SASRec"] = time.perf_counter() - t0
    side_by_side = []
    if hf is not None:
        side_by_side = hf_side_by_side(hf, measured[REFERENCE], inputs.sample, inputs.catalog, threads, config.k)

    phases["total"] = time.perf_counter() - started
    meta = run_meta(config, inputs, model_f16, f16_sha, provenance, work_dir, threads, levels, measured,
                    hf, load_start, phases)
    report = {
        "meta": meta,
        "rows": rows,
        "peers": peers,
        "hf_side_by_side": side_by_side,
        "levels": {
            level: {**{key: v for key, v in measured[level].items() if key != "npz"}, "eval": results[level].to_dict()}
            for level in levels
        },
        "transformers": hf,
        "baselines": peer_details,
    }
    write_outputs(report, Path(config.out_dir), config.progress)
    return report


def require_writable_dir(option: str, folder: Path) -> None:
    """Make ``folder`` and write a file in it; FileAccessError (one line) if either fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        from genrec_edge.cli import file_access_message

        raise FileAccessError(f"{option}: {file_access_message(exc)}") from None


def score_peers(inputs: Inputs, k: int, threads: int, config: BenchConfig) -> tuple[list[dict], dict]:
    """Popularity and SASRec (trained here, best validation epoch), on the sample and on all test users."""
    from genrec_edge.baselines import popularity, train_sasrec
    from genrec_edge.evaluation import evaluate_scores

    catalog = inputs.catalog
    pop = popularity(inputs.sequences, catalog, split="test")
    sasrec = train_sasrec(
        inputs.sequences,
        catalog,
        epochs=config.sasrec_epochs,
        max_seconds=config.sasrec_seconds,
        eval_every=2,  # a short, time-capped run: validate often so the best epoch is not missed
        threads=threads,
        seed=config.seed,
        progress=config.progress,
    )
    rows, details = [], {"sasrec": {"config": asdict(sasrec.config), "report": asdict(sasrec.report)}}
    for name, score_fn in (("popularity", pop.scores), ("SASRec", sasrec.scores)):
        for scope, examples in (("sample", inputs.sample), ("all", inputs.test)):
            res = evaluate_scores(score_fn, examples, catalog, ks=score_ks(k), k_max=k, progress=False)
            rows.append({"name": f"{name} ({scope})", "kind": "peer", "users": res.n_users,
                         **quality_columns(res, k, config.seed)})
            details[f"{name} ({scope})"] = res.to_dict(per_user=scope == "sample")
    return rows, details


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_meta(config, inputs, model_f16, f16_sha, provenance, work_dir, threads, levels, measured, hf, load_start,
             phases) -> dict:
    ref = measured[REFERENCE]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": inputs.dataset,
        "db": str(inputs.db),
        "catalog": {"items": len(inputs.catalog), "titles": len(inputs.catalog.unique_titles),
                    "sha256": inputs.catalog.sha256},
        "model_f16": str(model_f16),
        "model_f16_sha256": f16_sha,
        "model_kind": "fine-tuned (genrec provenance)" if provenance.get("catalog_sha256") else "zero-shot base",
        "provenance": provenance,
        "n_params": file_info(model_f16)["n_params"],
        "levels": list(levels),
        "work_dir": str(work_dir),
        "cached": "quantized GGUFs only (work_dir, keyed by the F16 sha256); SASRec is trained in every run",
        "threads": threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("genrec-edge", "llama-cpp-python", "numpy", "gguf", "torch", "transformers")},
        },
        "git": git_commit(),
        "sample": {
            "seed": config.seed,
            "users": len(inputs.sample),
            "full": config.full or len(inputs.sample) == len(inputs.test),
            "test_users": len(inputs.test),
            "user_ids": [e.user for e in inputs.sample],
            "hf_users": [] if hf is None else hf["users"],
        },
        "k": config.k,
        "beam": ref["beam"],
        "prior": "none",  # every level (and the transformers peer) ranks with the language model alone
        "llama_bench": {"pp": config.pp, "tg": config.tg, "reps": config.reps, "warmup": "pp64 + tg8"},
        "phases_s": phases,
        "child_cpu_per_wall": {
            level: (m["cpu_s"] / m["wall_s"] if m["wall_s"] else None) for level, m in measured.items()
        },
    }


# =========================================================================================== output
def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def level_columns(k: int, pp: int, tg: int) -> list[tuple[str, str, object]]:
    """(header, key, formatter) for the levels table."""
    return [
        ("model", "name", str),
        ("size MiB", "size_mb", lambda v: _fmt(v, 1)),
        ("bpw", "bpw", lambda v: _fmt(v, 2)),
        ("threads", "threads", _fmt),
        ("load s", "load_s", lambda v: _fmt(v, 2)),
        ("peak RSS MiB", "peak_rss_mb", lambda v: _fmt(v, 0)),
        (f"pp{pp} t/s", ("pp_ts", "pp_sd"), None),
        (f"tg{tg} t/s", ("tg_ts", "tg_sd"), None),
        ("rec p50 ms", "p50_ms", lambda v: _fmt(v, 0)),
        ("rec p95 ms", "p95_ms", lambda v: _fmt(v, 0)),
        ("HR@5", "HR@5", lambda v: _fmt(v, 3)),
        (f"HR@{k}", f"HR@{k}", lambda v: _fmt(v, 3)),
        ("NDCG@5", "NDCG@5", lambda v: _fmt(v, 3)),
        (f"NDCG@{k}", f"NDCG@{k}", lambda v: _fmt(v, 3)),
        (f"MRR@{k}", f"MRR@{k}", lambda v: _fmt(v, 3)),
        (f"overlap@{k} vs F16", f"overlap@{k}", lambda v: _fmt(v, 3)),
        (f"ρ@{k} vs F16", f"rho@{k}", lambda v: _fmt(v, 3)),
        ("KL₁ vs F16", "kl_first", lambda v: _fmt(v, 4)),
    ]


def _cell(row: dict, key, fmt) -> str:
    if isinstance(key, tuple):
        mean, sd = row.get(key[0]), row.get(key[1])
        return "—" if mean is None else f"{mean:.2f} ± {sd:.2f}"
    if row.get(key) is None:
        return "—"
    low, high = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if low is None or high is None:
        return fmt(row[key])
    return f"{fmt(row[key])} [{fmt(low)}, {fmt(high)}]"  # the value's 95% interval


def _signed(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.3f}".replace("-", "−")


def difference_table(rows: list[dict], k: int) -> str:
    """Each level minus F16 on the same users: mean difference [95% paired interval], * if it excludes 0."""
    names = difference_names(k)
    lines = ["| level | " + " | ".join(f"Δ{n} vs F16" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = []
        for n in names:
            mean, low, high = row.get(f"Δ{n}"), row.get(f"Δ{n}_lo"), row.get(f"Δ{n}_hi")
            real = low is not None and high is not None and (low > 0 or high < 0)
            cells.append(f"{_signed(mean)} [{_signed(low)}, {_signed(high)}]" + (" *" if real else ""))
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return "—"
    return f"{a / b:.2f}×"


def render_markdown(report: dict) -> str:
    meta, rows, k = report["meta"], report["rows"], report["meta"]["k"]
    lb = meta["llama_bench"]
    cols = level_columns(k, lb["pp"], lb["tg"])
    sample = meta["sample"]
    prov = "zero-shot base (no genrec provenance)" if meta["model_kind"] == "zero-shot base" else json.dumps(
        {key: v for key, v in meta["provenance"].items() if key != "prompt_template"}, ensure_ascii=False)
    out = [
        f"# genrec-edge bench — {meta['dataset']}, {meta['date']}",
        "",
        f"- model: `{meta['model_f16']}` (sha256 {meta['model_f16_sha256'][:16]}…, {meta['n_params'] / 1e6:.1f} M "
        f"parameters): {prov}",
        f"- dataset: {meta['dataset']} (`{meta['db']}`), catalog {meta['catalog']['items']} items / "
        f"{meta['catalog']['titles']} titles",
        f"- users: {sample['users']} of {sample['test_users']} test users"
        + (" (all)" if sample["full"] else f" (seeded sample, seed {sample['seed']})")
        + f"; leave-one-out test split, top-{k}, full-catalog ranking, seen titles excluded",
        f"- machine: {meta['cpu']}, {meta['cpu_count']} CPUs, {meta['threads']} threads, load average "
        f"{meta['loadavg_start'][0]:.1f} → {meta['loadavg_end'][0]:.1f}; OMP_WAIT_POLICY={meta['omp_wait_policy']}",
        "- versions: " + ", ".join(f"{n} {v}" for n, v in meta["versions"].items() if v) + f"; git {meta['git']}",
        f"- llama-bench tests: pp{lb['pp']} / tg{lb['tg']}, mean ± sd of {lb['reps']} repetitions after a warm-up; "
        f"beam width {meta['beam']}",
        "- collaborative prior: none at every level (the language model alone, so the columns compare "
        "quantization; a `cf-prior.json` beside the F16 is not used: `python -m bench.quality` scores it)",
        "",
        "## Quantization levels",
        "",
        f"Quality cells: the mean over the {sample['users']} users and its 95% bootstrap interval over users "
        "(genrec_edge.stats)."
        + (" **Noise at this size**: " + SMALL_SAMPLE_NOTE.format(users=sample["users"])
           + " (`--users 610`): these columns show the pipeline works, not which level ranks better."
           if sample["users"] < SMALL_SAMPLE else ""),
        "",
        markdown_table(rows, cols),
        "",
        "## Quality vs F16, paired on the same users",
        "",
        "Each level's per-user difference from F16, averaged, with the 95% paired-bootstrap interval (users "
        "resampled, both levels together); * marks an interval that excludes 0: a real drop or gain, not noise.",
        "",
        difference_table(rows, k),
    ]
    ref = next((r for r in rows if r["name"] == REFERENCE), None)
    by_name = {r["name"]: r for r in report["peers"]}
    pop, sas = by_name.get("popularity (sample)"), by_name.get("SASRec (sample)")
    ratio_rows = []
    for r in rows:
        ratio_rows.append(
            f"| {r['name']} | {_ratio(r['size_mb'], ref['size_mb'])} | {_ratio(r['peak_rss_mb'], ref['peak_rss_mb'])} "
            f"| {_ratio(r['pp_ts'], ref['pp_ts'])} | {_ratio(r['tg_ts'], ref['tg_ts'])} | {_ratio(r['p50_ms'], ref['p50_ms'])} "
            f"| {_ratio(r[f'HR@{k}'], ref[f'HR@{k}'])} | {_ratio(r[f'HR@{k}'], pop[f'HR@{k}']) if pop else '—'} "
            f"| {_ratio(r[f'HR@{k}'], sas[f'HR@{k}']) if sas else '—'} |"
        )
    out += [
        "",
        "## Ratios, side by side (same run)",
        "",
        f"| model | size / F16 | RSS / F16 | pp / F16 | tg / F16 | p50 / F16 | HR@{k} / F16 | HR@{k} / popularity "
        f"| HR@{k} / SASRec |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *ratio_rows,
    ]
    if report["peers"]:
        qcols = [("recommender", "name", str), ("users", "users", _fmt)] + [c for c in cols if c[1] in (
            "HR@5", f"HR@{k}", "NDCG@5", f"NDCG@{k}", f"MRR@{k}")]
        sasrec = report["baselines"]["sasrec"]["report"]
        out += [
            "",
            "## Baselines (quality only; popularity and SASRec rank the full catalog, truncated to the top "
            f"{k})",
            "",
            markdown_table([{**r, "name": f"llama.cpp {r['name']} (sample)"} for r in rows if r["name"] == REFERENCE]
                           + report["peers"], qcols),
            "",
            f"SASRec trained in this run: best epoch {sasrec['best_epoch']} of {sasrec['epochs_run']} "
            f"(valid HR@10 {sasrec['best_valid_hr10']:.4f}), {sasrec['seconds']:.0f} s, stopped by "
            f"{sasrec['stopped_by']}.",
        ]
    if report["hf_side_by_side"]:
        hcols = [("recommender", "name", str), ("users", "users", _fmt)] + [c for c in cols if c[1] in (
            "load_s", "peak_rss_mb", "p50_ms", "p95_ms", f"HR@{k}", f"NDCG@{k}", f"MRR@{k}", f"overlap@{k}", f"rho@{k}")]
        hf_rows = report["hf_side_by_side"]
        out += [
            "",
            f"## transformers' constrained beam search vs ours, same F16 model, first {hf_rows[0]['users']} users",
            "",
            "Same prompt ids, same catalog trie and seen-title mask, same beam width, summed log-probs "
            "(`prefix_allowed_tokens_fn`, `length_penalty=0`); agreement columns compare with llama.cpp F16. "
            f"Latency: transformers / llama.cpp = {_ratio(hf_rows[1]['p50_ms'], hf_rows[0]['p50_ms'])} (p50).",
            "",
            markdown_table(hf_rows, hcols).replace(" vs F16", " vs ours"),
        ]
    out += [
        "",
        "Phases (s): " + ", ".join(f"{n} {v:.0f}" for n, v in meta["phases_s"].items())
        + ". Child CPU/wall (≈ threads when the machine is quiet): "
        + ", ".join(f"{n} {v:.2f}" for n, v in meta["child_cpu_per_wall"].items() if v is not None)
        + ". Columns: bench/README.md.",
        "",
    ]
    return "\n".join(out)


CSV_FIELDS = ["name", "kind", "users", "size_mb", "bpw", "threads", "load_s", "peak_rss_mb", "pp_ts", "pp_sd",
              "tg_ts", "tg_sd", "p50_ms", "p95_ms"]


def csv_context(meta: dict) -> dict:
    versions = meta["versions"]
    return {
        "date": meta["date"],
        "dataset": meta["dataset"],
        "model_f16": meta["model_f16"],
        "model_sha256": meta["model_f16_sha256"],
        "model_kind": meta["model_kind"],
        "sample_seed": meta["sample"]["seed"],
        "sample_users": meta["sample"]["users"],
        "test_users": meta["sample"]["test_users"],
        "k": meta["k"],
        "beam": meta["beam"],
        "cpu": meta["cpu"],
        "versions": ";".join(f"{n}={v}" for n, v in versions.items() if v),
    }


def write_outputs(report: dict, out_dir: Path, progress: bool = True) -> dict[str, Path]:
    k = report["meta"]["k"]
    out_dir.mkdir(parents=True, exist_ok=True)
    from bench.saved_run import fresh_stem

    stem = fresh_stem(out_dir, f"{report['meta']['date'][:10]}-{report['meta']['dataset']}").name
    files = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json", "png")}
    report["meta"]["files"] = {ext: str(p) for ext, p in files.items()}
    # Written under hidden partial names, renamed together once all four are complete: Ctrl-C (or a full disk)
    # while they were written left a run of md/csv/json without its png, or a truncated file, as a result.
    partial = {ext: out_dir / f".{stem}.partial.{ext}" for ext in files}
    try:
        text = _write_files(report, partial, k)
        with held_signals():  # all four renamed, or none
            for ext, path in partial.items():
                path.replace(files[ext])
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    print(text)
    if progress:
        print(f"results: {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    return files


def _write_files(report: dict, files: dict[str, Path], k: int) -> str:
    """The markdown, CSV, JSON and PNG of ``report`` at ``files``' paths; returns the markdown."""
    from bench.plot import plot

    text = render_markdown(report)
    files["md"].write_text(text, encoding="utf-8")
    quality = [f"{n}{suffix}" for n in quality_names(k) for suffix in ("", "_lo", "_hi")]
    deltas = [f"Δ{n}{suffix}" for n in difference_names(k) for suffix in ("", "_lo", "_hi")]
    fields = CSV_FIELDS + quality + deltas + [f"overlap@{k}", f"rho@{k}", "kl_first"]
    context = csv_context(report["meta"])  # every row carries the run's context: the CSV stands alone
    with open(files["csv"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields + list(context), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in report["rows"] + report["peers"] + report["hf_side_by_side"]:
            writer.writerow({**row, **context})
    files["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    plot(report, files["png"])
    return text


# =========================================================================================== CLI
class _DefaultsShown(argparse.HelpFormatter):
    """Each option's default after its help, where it has one the help does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0 or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def parse_args(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", formatter_class=_DefaultsShown,
        description="Compare quantization levels on speed, memory and recommendation quality, with baselines.",
        epilog="Example: python -m bench.run --levels F16,Q8_0,Q4_K_M --users 10",
    )
    parser.add_argument("--levels", default=",".join(DEFAULT_LEVELS), help="comma-separated (F16 always runs)")
    parser.add_argument("--users", type=int, default=BenchConfig.users,
                        help="seeded sample of test users (more than there are: every one)")
    parser.add_argument("--full", action="store_true", help="every test user (hours)")
    parser.add_argument("--seed", type=int, default=BenchConfig.seed, help="seed of the user sample")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every CPU)")
    parser.add_argument("--model-f16", type=Path, default=None, help="default: the default model as F16")
    parser.add_argument("--db", type=Path, default=None, help="default: the default database (built if missing)")
    parser.add_argument("--out-dir", type=Path, default=BenchConfig.out_dir,
                        help="where the md/csv/json/png go (an earlier run's files are kept: NAME-2, ...)")
    parser.add_argument("--work-dir", type=Path, default=None, help="quantized files (default: cache, by sha256)")
    parser.add_argument("--skip-peers", action="store_true", help="no popularity / SASRec / transformers")
    parser.add_argument("--hf-users", type=int, default=BenchConfig.hf_users, help="users for transformers' beam search")
    parser.add_argument("--k", type=int, default=BenchConfig.k, help="recommendations per user (10 at least: HR@10)")
    parser.add_argument("--beam", type=int, default=None, help="beam width (default: max(10, 2k))")
    parser.add_argument("--pp", type=int, default=BenchConfig.pp, help="prompt tokens of the pp test")
    parser.add_argument("--tg", type=int, default=BenchConfig.tg, help="generated tokens of the tg test")
    parser.add_argument("--reps", type=int, default=BenchConfig.reps, help="repetitions of each speed test")
    parser.add_argument("--sasrec-epochs", type=int, default=BenchConfig.sasrec_epochs, help="SASRec peer: most epochs")
    parser.add_argument("--sasrec-seconds", type=float, default=BenchConfig.sasrec_seconds,
                        help="SASRec peer: stop after the first validation past this")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    return BenchConfig(
        levels=tuple(x.strip() for x in args.levels.split(",") if x.strip()),
        **{key: v for key, v in vars(args).items() if key != "levels"},
    )


def main(argv=None) -> int:
    from genrec_edge.cli import Stopped, _stop_signals

    try:
        with _stop_signals():  # SIGTERM too stops the child and removes the temporary files (it killed only us)
            run_bench(parse_args(argv))
    except GenrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Stopped) as exc:
        terminated = isinstance(exc, Stopped) and exc.signum == signal.SIGTERM
        print(f"error: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except OSError as exc:  # a file the run could not read or write: one line naming it, not a traceback
        from genrec_edge.cli import file_access_message

        print(f"error: {file_access_message(exc)}", file=sys.stderr)
        return FileAccessError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
