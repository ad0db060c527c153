"""Evaluating recommenders over many users: resumable runs, several recommenders at once, intervals.

``evaluate_recommenders`` is what ``genrec-edge evaluate`` runs::

    RecommenderSpec (llm / sasrec / pop) --_open_run--> Run (config + how to produce UserResults)
    ResultLog.run: results already in the JSONL log for the run's key are reused, the rest computed
        (evaluation.score_results for score matrices, llm_rankings for the LLM) and appended as they come
    -> metrics.per_user_metrics per recommender -> stats.compare: intervals, paired differences, slices

The protocol itself (split, seen titles, ties, metrics) is in ``evaluation``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .errors import FileAccessError, IngestError, UsageError
from .evaluation import (
    TitleSpace,
    UserResult,
    history_length_slices,
    result_from_titles,
    score_results,
    slice_order,
    target_popularity_slices,
)
from .jsonlog import json_line, lock_exclusive
from .prompts import Example


# ================================================================================= recommenders as runs
@dataclass(frozen=True)
class Run:
    """One recommender to evaluate: how it produces results, and the identity its logged results carry.

    ``config`` is everything its results depend on (model file hash, split, data, k, ...): two runs with
    the same config give the same per-user results, so a ``ResultLog`` may reuse them. ``top_k`` is
    ``None`` for a full-catalog ranker (exact ranks, full MRR) and k for a top-k recommender (MRR@k).
    """

    name: str
    config: dict
    produce: Callable[[Sequence[Example]], Iterator[list[UserResult]]] = field(repr=False, compare=False)
    top_k: int | None = None
    # What computed the results beyond the config, recorded in the log but not in the key: the llama.cpp build
    # of a local LLM run (a Ray run's workers may have others, so it has none). A resume by another build warns.
    origin: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return config_key(self.config)


def config_key(config: dict) -> str:
    """The key a run with ``config`` logs its results under (``Run.key``)."""
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_fingerprint(sequences: Iterable[tuple[int, Sequence[int]]]) -> str:
    """sha256 of every user's chronological item ids: the data a split's targets and training part come from."""
    digest = hashlib.sha256()
    for user, seq in sequences:
        digest.update(np.asarray([user, len(seq)], dtype=np.int64).tobytes())
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
    return digest.hexdigest()


def popularity_run(sequences, catalog: Catalog, split: str, base_config: dict, keep: int = 10) -> Run:
    """Popularity counted on the training part of ``split`` (``baselines.popularity``), scored from its counts."""
    from .baselines import popularity

    ranker = popularity(sequences, catalog, split=split)
    space = TitleSpace(catalog)
    return Run("popularity", {**base_config, "recommender": "popularity"},
               lambda examples: score_results(ranker.scores, examples, space, keep))


def sasrec_run(path: Path, catalog: Catalog, base_config: dict, keep: int = 10, threads: int | None = None) -> Run:
    """A SASRec saved by ``baseline sasrec --save``, scored in batches."""
    from .baselines import SASRecModel
    from .hashing import sha256_file

    model = SASRecModel.load(path, catalog)
    config = {**base_config, "recommender": "sasrec", "weights_sha256": sha256_file(Path(path) / model.WEIGHTS)}
    space = TitleSpace(catalog)

    def produce(examples):
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads or model.config.threads)
        try:
            yield from score_results(model.scores, examples, space, keep)
        finally:
            torch.set_num_threads(previous)

    return Run("SASRec", config, produce)


def llm_rankings(rec, examples: Sequence[Example], catalog: Catalog, k: int, prior: str | None = None,
                 prior_weight: float | None = None) -> Iterator[tuple[Example, list[str]]]:
    """The LLM's top-``k`` titles for each example, yielded as they are computed.

    The history is the example's titles; every title in it is excluded inside the search. A collaborative
    prior reads the example's item ids. ``rec.batch`` examples are searched together
    (``Recommender.rank_many``: the same results as one at a time, fewer llama_decode calls); a
    ``RecommenderPool`` searches ``rec.workers`` such groups at a time, yielded in the same order.
    """
    group = max(1, getattr(rec, "batch", 1))
    chunks = [examples[first : first + group] for first in range(0, len(examples), group)]

    def rank(chunk):
        requests = []
        for example in chunk:
            history = [catalog.title_of(item) for item in example.history]
            requests.append((history, set(history), list(example.history)))
        return chunk, rec.rank_many(requests, k, prior=prior, prior_weight=prior_weight)

    workers = getattr(rec, "workers", 1)
    if workers > 1:
        from .pool import ordered_map

        ranked = ordered_map(rank, chunks, workers)
    else:
        ranked = map(rank, chunks)
    for chunk, rankings in ranked:
        for example, ranking in zip(chunk, rankings, strict=True):
            yield example, list(ranking.titles)


def _llm_label(model_path: Path, prior_weight: float | None, used_prior: str) -> str:
    suffix = "" if used_prior == "none" else f" +{used_prior}" + (f" λ={prior_weight:g}" if prior_weight is not None else "")
    return "LLM " + model_path.stem + suffix


def _llm_config(model_path: Path, base_config: dict, k: int, prior: str | None, beam: int | None,
                prior_weight: float | None) -> dict:
    """An LLM run's config: the same wherever it runs (here or on a Ray cluster)."""
    from .cf import BUILD_VARIANT, SIDECAR_JSON, SIDECAR_WEIGHTS
    from .hashing import sha256_file
    from .recommend import _sidecar_kind

    # The collaborative prior's sidecar next to the model (cf.py) changes the results as much as the model.
    files = [model_path.parent / name for name in (SIDECAR_JSON, SIDECAR_WEIGHTS)]
    sidecar = {p.name: sha256_file(p) for p in files if p.is_file()}
    config = {**base_config, "recommender": "llm", "model_sha256": sha256_file(model_path), "prior": prior,
              "prior_sidecar": sidecar, "k": k, "beam": beam}
    if prior_weight is not None:
        config["prior_weight"] = prior_weight
    if prior == "pop" and _sidecar_kind(model_path.parent) != "pop":
        # Counted from the database (its counts are in data_sha256): how it is searched, which is not in any file.
        config["prior_counted"] = {"kind": "pop", "variant": BUILD_VARIANT}
    return config


def llm_run(rec, catalog: Catalog, base_config: dict, k: int, prior: str | None, beam: int | None,
            prior_weight: float | None = None, config: dict | None = None) -> Run:
    """The LLM behind ``rec`` (an open ``Recommender`` or ``RecommenderPool``) as a top-``k`` run, with ``prior``
    (None: its default). ``config``: its ``_llm_config`` if the caller has it already (else the model is hashed)."""
    from .engine import build_identity

    used = rec.default_prior if prior is None else prior
    label = _llm_label(rec.model_path, prior_weight, used)
    if config is None:
        config = _llm_config(rec.model_path, base_config, k, prior, beam, prior_weight)

    def produce(examples):
        for example, titles in llm_rankings(rec, examples, catalog, k, prior, prior_weight):
            yield [result_from_titles(example, titles, catalog, keep=k, k_max=k)]

    return Run(label, config, produce, top_k=k, origin=build_identity())  # a pool's workers: this venv's build


def ray_llm_run(model_path: Path | None, db_path: Path, catalog: Catalog, base_config: dict, k: int,
                prior: str | None, beam: int | None, prior_weight: float | None, batch: int, threads: int | None,
                address: str) -> Run:
    """The same run as :func:`llm_run`, its searches done by a Ray actor pool (``cluster.ray_rankings``):
    same config (so the same log entries), same results. The prior is resolved here, on the driver."""
    from .cluster import ray_rankings
    from .errors import GenrecError
    from .models import default_model_path
    from .recommend import default_beam, load_prior

    model_path = Path(model_path) if model_path is not None else default_model_path()
    loaded = load_prior(prior, prior_weight, model_path.parent, catalog, db_path)
    used = loaded.kind if loaded is not None else "none"
    label, config = _llm_label(model_path, prior_weight, used), _llm_config(model_path, base_config, k, prior,
                                                                           beam, prior_weight)
    width = beam if beam is not None else default_beam(k)

    def produce(examples):
        requests = [(i, list(ex.history)) for i, ex in enumerate(examples)]
        groups = [requests[g : g + batch] for g in range(0, len(requests), batch)]
        for chunk in ray_rankings(model_path, catalog, loaded, groups, len(groups), k=k, beam=width, batch=batch,
                                  threads=threads, address=None if address == "local" else address):
            out = []
            for key, value in chunk:
                if isinstance(value, str):
                    raise GenrecError(f"on a Ray worker: {value}")
                out.append(result_from_titles(examples[key], list(value[0]), catalog, keep=k, k_max=k))
            yield out

    return Run(label, config, produce, top_k=k)


# ============================================================================= evaluating several at once
PROTOCOL = "chronological-leave-one-out/v1"
PRIORS = ("sasrec", "pop", "none")
SLICINGS = ("popularity", "history")
STORED_TITLES = 10  # top titles kept per user for a full-catalog ranker


@dataclass(frozen=True)
class RecommenderSpec:
    """A recommender to evaluate: ``kind`` is ``"llm"`` (``path`` a GGUF, None: the default model; ``prior``
    None: the model's own default), ``"sasrec"`` (``path`` a directory saved by ``baseline sasrec --save``)
    or ``"pop"``."""

    kind: str
    path: Path | None = None
    prior: str | None = None
    prior_weight: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("llm", "sasrec", "pop"):
            raise UsageError(f"unknown recommender kind {self.kind!r}")
        if self.kind == "sasrec" and self.path is None:
            raise UsageError("a SASRec needs the directory it was saved to")
        if self.prior is not None and (self.kind != "llm" or self.prior not in PRIORS):
            raise UsageError(f"--prior is one of {', '.join(PRIORS)} and applies to --model only")


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_recommenders`` measured: per-run identity and the ``stats.compare`` summary."""

    split: str
    seed: int
    users: tuple[int, ...]
    metrics: tuple[str, ...]
    runs: dict  # name -> {"config", "key", "top_k", "resumed"}
    summary: dict  # stats.compare(...)
    results_file: Path | None
    seconds: float

    def to_dict(self) -> dict:
        from .stats import CONFIDENCE, N_RESAMPLES, choose_method, to_jsonable

        return {
            "split": self.split,
            "protocol": PROTOCOL,
            "n_users": len(self.users),
            "seed": self.seed,
            "metrics": list(self.metrics),
            "interval": {"confidence": CONFIDENCE, "method": f"bootstrap ({choose_method(len(self.users))})",
                         "resamples": N_RESAMPLES, "paired": True},
            "results_file": str(self.results_file) if self.results_file else None,
            "seconds": self.seconds,
            "recommenders": {
                name: {**run, "metrics": to_jsonable(self.summary["recommenders"][name])}
                for name, run in self.runs.items()
            },
            "differences": to_jsonable(self.summary["differences"]),
            "slices": to_jsonable(self.summary["slices"]),
            "users": list(self.users),
        }


def sample_examples(examples: Sequence[Example], users: int | None, seed: int) -> list[Example]:
    """All examples by user id, or a seeded sample of ``users`` of them (the bench samples the same way)."""
    import random

    ordered = sorted(examples, key=lambda ex: ex.user)
    if users is None or users >= len(ordered):
        return ordered
    if users < 1:
        raise UsageError(f"--users must be >= 1 or 'all' (got {users})")
    return sorted(random.Random(seed).sample(ordered, users), key=lambda ex: ex.user)


def evaluate_recommenders(
    specs: Sequence[RecommenderSpec],
    db: Path | None = None,
    split: str = "test",
    users: int | None = None,
    seed: int = 0,
    k: int = 10,
    out: Path | None = None,
    by: Sequence[str] = (),
    threads: int | None = None,
    beam: int | None = None,
    progress: bool = True,
    warn=None,
    batch: int = 1,
    ray: str | None = None,
    workers: int | str = 1,
) -> Evaluation:
    """Score every recommender in ``specs`` on the same users, with intervals and paired differences.

    Per-user results stream to ``out`` (a ``ResultLog``; None: no file) and are reused from it. When any
    recommender is top-``k`` (the LLM), every recommender's MRR is MRR@k, so that all compare alike.
    ``by`` names slicings (``SLICINGS``) to report the metrics within. ``batch``: LLM requests searched
    together (the results do not depend on it). ``ray``: a Ray address (``local`` for a local instance)
    to run the LLM's searches on an actor pool, same results. ``workers`` > 1: the LLM's searches in that
    many spawned processes here (``pool.RecommenderPool``), same results; ``"auto"`` (the CLI's default): one
    single-thread process per core, within memory and the users ``out`` does not hold yet
    (``pool.auto_workers``; none left: the model is not even opened). Call it under
    ``if __name__ == "__main__":`` in a script when it may start processes.
    """
    from . import paths
    from .baselines import split_examples
    from .history import HistoryDB
    from .metrics import REPORTED, per_user_metrics
    from .stats import compare

    started = time.perf_counter()
    if not specs:
        raise UsageError("nothing to evaluate: give --pop, --sasrec DIR or --model GGUF")
    if k < 1:
        raise UsageError(f"--k must be >= 1 (got {k})")
    from .pool import AUTO, parse_workers

    workers = parse_workers(workers)
    if workers != AUTO and workers > 1 and ray is not None:
        raise UsageError("--workers is for runs here; on Ray the cluster's CPUs say how many actors")
    unknown = [b for b in by if b not in SLICINGS]
    if unknown:
        raise UsageError(f"unknown --by {unknown[0]!r}; use {' or '.join(SLICINGS)}")
    db_path = Path(db) if db is not None else paths.default_db()
    with HistoryDB.open(db_path, readonly=True) as history:
        sequences, catalog = list(history.sequences()), history.catalog()
    examples = sample_examples(split_examples(sequences, split), users, seed)
    if not examples:
        raise UsageError(f"no user has a {split} example in {db_path}")
    base = {"protocol": PROTOCOL, "split": split, "data_sha256": data_fingerprint(sequences),
            "catalog_sha256": catalog.sha256}
    log = ResultLog(out) if out is not None else None

    results: dict[str, list[UserResult]] = {}
    runs: dict[str, dict] = {}
    order = {"llm": 0, "sasrec": 1, "pop": 2}  # differences read "LLM - SASRec", "SASRec - popularity"
    for spec in sorted(specs, key=lambda sp: order[sp.kind]):
        with _open_run(spec, db_path, sequences, catalog, split, base, k, threads, beam, warn, batch, ray,
                       workers, log, examples) as run:
            name, copy = run.name, 1
            while name in results:  # the same name again: "SASRec #2", "SASRec #3"
                copy += 1
                name = f"{run.name} #{copy}"
            got, resumed = (log.run(run, examples, progress, warn=warn) if log
                            else (run_unlogged(run, examples, progress), 0))
        results[name] = got
        runs[name] = {"config": run.config, "key": run.key, "top_k": run.top_k, "resumed": resumed}

    cutoffs = [r["top_k"] for r in runs.values() if r["top_k"] is not None]
    cutoff = min(cutoffs) if cutoffs else None
    names = tuple(m if m != "MRR" or cutoff is None else f"MRR@{cutoff}" for m in REPORTED)
    per_user = {
        name: per_user_metrics([r.rank if r.rank is None or cutoff is None or r.rank <= cutoff else None
                                for r in got], names)
        for name, got in results.items()
    }
    slices = {}
    if "popularity" in by:
        slices["popularity"] = target_popularity_slices(sequences, catalog, split, examples)
    if "history" in by:
        slices["history"] = history_length_slices(examples)
    summary = compare(per_user, slices, seed=seed)
    summary["slices"] = {
        slicing: {label: summary["slices"][slicing][label] for label in slice_order(labels)}
        for slicing, labels in slices.items()
    }
    return Evaluation(split, seed, tuple(ex.user for ex in examples), names, runs, summary, log.path if log else None,
                      time.perf_counter() - started)


@contextmanager
def _open_run(spec: RecommenderSpec, db_path: Path, sequences, catalog: Catalog, split: str, base: dict, k: int,
              threads: int | None, beam: int | None, warn, batch: int = 1, ray: str | None = None,
              workers: int | str = 1, log: ResultLog | None = None, examples: Sequence[Example] = ()):
    if spec.kind == "pop":
        yield popularity_run(sequences, catalog, split, base, keep=STORED_TITLES)
    elif spec.kind == "sasrec":
        yield sasrec_run(Path(spec.path), catalog, base, keep=STORED_TITLES, threads=threads)
    elif ray is not None:
        yield ray_llm_run(spec.path, db_path, catalog, base, k, spec.prior, beam, spec.prior_weight, batch, threads, ray)
    else:
        from .models import built_default_model
        from .pool import RecommenderPool, resolve_workers
        from .recommend import Recommender

        # Processes for the users the log does not hold yet; none left: nothing opened at all.
        model_path = Path(spec.path) if spec.path is not None else built_default_model()
        config, todo = None, len(examples)
        if model_path is not None and model_path.is_file():
            config = _llm_config(model_path, base, k, spec.prior, beam, spec.prior_weight)
            todo = log.pending(config_key(config), examples) if log is not None else todo
        if config is not None and todo == 0:
            yield _logged_llm_run(model_path, db_path, catalog, config, k, spec.prior, spec.prior_weight)
            return
        groups = -(-todo // max(1, batch))
        workers, threads = resolve_workers(workers, model_path, groups, threads)
        options = {"threads": threads, "beam": beam, "warn": warn, "batch": batch}
        opened = (RecommenderPool.open(spec.path, db_path, workers=workers, **options) if workers > 1
                  else Recommender.open(spec.path, db_path, **options))
        with opened as rec:
            yield llm_run(rec, catalog, base, k, spec.prior, beam, spec.prior_weight,
                          config=config if config is not None and rec.model_path == model_path else None)


def _logged_llm_run(model_path: Path, db_path: Path, catalog: Catalog, config: dict, k: int, prior: str | None,
                    prior_weight: float | None) -> Run:
    """:func:`llm_run` for a run whose every result is logged already, without opening the model: its prior
    resolved (and refused) by ``load_prior`` as ``Recommender.open`` and :func:`ray_llm_run` do, and named as
    the opened model would name it."""
    from .engine import build_identity
    from .recommend import load_prior

    loaded = load_prior(prior, prior_weight, model_path.parent, catalog, db_path)
    used = loaded.kind if loaded is not None else "none"

    def produce(examples):
        raise RuntimeError(f"{len(examples)} users were to come from the log")

    return Run(_llm_label(model_path, prior_weight, used), config, produce, top_k=k, origin=build_identity())


# ======================================================================================= the results log
LOG_FORMAT = "genrec-edge-eval-results"
LOG_VERSION = 1


class ResultLog:
    """Per-user results as JSON lines, appended and flushed as they are computed; a run resumes from it.

    Line 1 names the format; then ``{"run": KEY, "name": ..., "config": {...}}`` once per run, and
    ``{"run": KEY, "user": ..., "target": ..., "rank": ..., "top": [...], ...}`` per user. A run's KEY
    hashes its config, so results are only ever reused for the same recommender, split, data and settings.
    A last line cut short by a crash is dropped (that user is computed again); any other malformed line is
    an error naming the file and line, and the file is left as it is. One process appends at a time (an
    exclusive lock; a second one is refused).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.origins: dict[str, str | None] = {}  # run key -> its run line's origin (filled by reading)

    def read(self) -> dict[str, dict[int, UserResult]]:
        """Every logged result, by run key then user."""
        if not self.path.exists():
            return {}
        if not self.path.is_file():
            raise FileAccessError(f"cannot use {self.path}: it is not a file (a folder is there)")
        return self._parse(self.path.read_bytes())

    def run(self, run: Run, examples: Sequence[Example], progress: bool = True,
            warn: Callable[[str], None] | None = None) -> tuple[list[UserResult], int]:
        """Every example's result for ``run``: logged ones reused, the others computed and appended.

        Returns the results in ``examples`` order and how many came from the log. ``warn`` (default: a line
        on stderr) hears of logged results that another llama.cpp build computed (``Run.origin``).
        """
        if self.path.exists() and not self.path.is_file():
            raise FileAccessError(f"cannot use {self.path}: it is not a file (a folder is there)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            lock_exclusive(fh, self.path, "another evaluation")
            fh.seek(0)
            data = fh.read()
            everything = self._parse(data)
            keep = data.rfind(b"\n") + 1
            if keep < len(data):  # a line cut short by a crash
                fh.truncate(keep)
            if keep == 0:
                fh.write(_HEADER)
            if run.key not in everything:
                line = {"run": run.key, "name": run.name, "config": run.config}
                fh.write(json_line({**line, "origin": run.origin} if run.origin else line))
            elif everything[run.key] and run.origin and self.origins.get(run.key) not in (None, run.origin):
                from .recommend import stderr_warning

                (warn or stderr_warning)(
                    f"{self.path}: {run.name}'s logged results came from another llama.cpp build "
                    f"({self.origins[run.key]}), this run's is {run.origin}; builds round differently, so a "
                    "mix of both is reused: give another --out for this build's results alone")
            fh.flush()

            def append(chunk: list[UserResult]) -> None:
                fh.write(b"".join(json_line({"run": run.key, **r.to_dict()}) for r in chunk))
                fh.flush()

            return _run_with(run, examples, everything.get(run.key, {}), append, progress)

    def pending(self, key: str, examples: Sequence[Example]) -> int:
        """How many of ``examples`` have no result logged for the run ``key`` (all of them without a file)."""
        logged = self.read().get(key, {})
        return sum(ex.user not in logged for ex in examples)

    def _parse(self, data: bytes) -> dict[str, dict[int, UserResult]]:
        out: dict[str, dict[int, UserResult]] = {}
        complete = data.split(b"\n")[:-1]  # after the last newline: nothing, or a line cut short
        if not complete:
            if data and not _HEADER.startswith(data):
                raise UsageError(f"{self.path} is not a genrec-edge results log; choose another --out")
            return out
        for number, raw in enumerate(complete, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if number == 1:
                    raise UsageError(f"{self.path} is not a genrec-edge results log; choose another --out") from None
                raise IngestError(f"{self.path}:{number}: not a JSON line") from None
            if number == 1:
                if not isinstance(record, dict) or record.get("format") != LOG_FORMAT:
                    raise UsageError(f"{self.path} is not a genrec-edge results log; choose another --out")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("run"), str):
                raise IngestError(f"{self.path}:{number}: a line without a run key")
            if "config" in record:
                out.setdefault(record["run"], {})
                self.origins.setdefault(record["run"], record.get("origin"))
                continue
            try:
                result = UserResult.from_dict(record)
            except (KeyError, TypeError, ValueError) as exc:
                raise IngestError(f"{self.path}:{number}: malformed result ({exc})") from None
            out.setdefault(record["run"], {})[result.user] = result
        return out


_HEADER = (json.dumps({"format": LOG_FORMAT, "version": LOG_VERSION}) + "\n").encode("utf-8")


def run_unlogged(run: Run, examples: Sequence[Example], progress: bool = True) -> list[UserResult]:
    """``ResultLog.run`` without a file."""
    return _run_with(run, examples, {}, None, progress)[0]


def _run_with(run: Run, examples, logged: dict[int, UserResult], append, progress: bool) -> tuple[list[UserResult], int]:
    from tqdm.auto import tqdm

    users = [ex.user for ex in examples]
    if len(set(users)) != len(users):
        raise UsageError("a run takes one example per user; got a user twice")
    todo = [ex for ex in examples if ex.user not in logged]
    found = {ex.user: logged[ex.user] for ex in examples if ex.user in logged}
    if todo:
        with tqdm(total=len(todo), desc=run.name[:30], unit="user", disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            for chunk in run.produce(todo):
                found.update((r.user, r) for r in chunk)
                if append is not None:
                    append(chunk)
                bar.update(len(chunk))
    missing = [u for u in users if u not in found]
    if missing:
        raise RuntimeError(f"{run.name} gave no result for user {missing[0]}")
    return [found[u] for u in users], len(examples) - len(todo)
