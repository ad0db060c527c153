"""Batch recommendation on a Ray cluster (``pip install 'genrec-edge[cluster]'``; never needed on a laptop).

``ray_results(...)`` is what ``genrec-edge recommend --all-users --ray ADDRESS`` runs (the generic part,
``ray_rankings``, ranks any groups of item histories: the users of a batch job, or evaluation examples)::

    driver: SQLite -> per group of `batch` users (batch.plan_groups), their item ids oldest first
            -> Arrow blocks in the object store -> a Ray Dataset, one row per group
            -> map_batches(RankActor, ActorPoolStrategy(size=actors), num_cpus=threads)
    actor:  one Recommender (the GGUF + the catalog trie; no history database) ranks each group in one
            search: Recommender.rank_many([(titles, seen titles, item ids), ...], k)
    driver: <- (user, titles, scores, lm scores) rows -> batch.record lines, as they arrive

A request is what ``Recommender.recommend(user=...)`` reads from the database (the last titles, every
seen title, the item ids the prior reads) and a group is the local run's group, so an actor's result for
a user is the local run's, to the bit.
Each actor needs: genrec-edge installed, the model file (a path every node can read, e.g. shared
storage, or ``ship_model=True`` to send its bytes through the object store), and the catalog and the
collaborative prior, which the driver resolves and sends through the object store (no sidecar needed
on the workers). See docs/CLUSTER.md.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import UsageError

MAX_GROUPS_PER_BLOCK = 64  # rows (groups of users) per Arrow block the driver puts in the object store
GROUPS_PER_CALL = 4  # groups per actor call: results come back at least this often


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'genrec-edge[cluster]' (or 'ray[data]')") from None
    return ray


class RankActor:
    """One Recommender on a Ray worker, built from the catalog rows and the model the driver sent."""

    def __init__(self, model, catalog_ref, prior_ref, k: int, beam: int, batch: int, threads: int | None,
                 exclude: Sequence[int] = (), only: Sequence[int] | None = None):
        import ray

        from .history import HistoryDB
        from .recommend import Recommender

        self.workdir = Path(tempfile.mkdtemp(prefix="genrec-edge-actor-"))
        weakref.finalize(self, shutil.rmtree, self.workdir, True)  # the shipped model and the catalog db
        if isinstance(model, ray.ObjectRef):  # shipped through the object store
            path = self.workdir / "model.gguf"
            path.write_bytes(ray.get(model))
            model = path
        pairs = ray.get(catalog_ref)
        # Recommender.open reads its catalog from a database: a catalog-only one, local to this actor.
        db_path = self.workdir / "catalog.db"
        with HistoryDB.open(db_path, create=True) as db, db.conn:
            db.conn.executemany("INSERT INTO items(id, title) VALUES (?, ?)", pairs)
        prior = ray.get(prior_ref)
        self.rec = Recommender.open(model, db_path, threads=threads, beam=beam, batch=batch,
                                    prior=prior if prior is not None else "none", warn=lambda message: None)
        self.k = k
        self.titles_by_id = dict(pairs)
        self.exclude, self.only = tuple(exclude), None if only is None else tuple(only)

    def __call__(self, table):
        import pyarrow as pa

        from .batch import UserFilters, combine_filters, rank_group

        out = {"key": [], "titles": [], "scores": [], "lm_scores": [], "error": []}
        columns = [table.column(name).to_pylist() for name in ("keys", "items", "exclude", "only")]
        for keys, histories, excludes, onlys in zip(*columns, strict=True):
            requests = []
            for items, exclude, only in zip(histories, excludes, onlys, strict=True):
                titles = [self.titles_by_id[i] for i in items]
                own = UserFilters(tuple(exclude), tuple(only)) if only is not None else (
                    UserFilters(tuple(exclude)) if exclude else None)
                requests.append((titles, set(titles), items, *combine_filters(self.exclude, self.only, own)))
            for key, result in zip(keys, rank_group(self._rank, requests), strict=True):
                ok = isinstance(result, tuple)
                out["key"].append(key)
                for name, values in zip(("titles", "scores", "lm_scores"), result if ok else ([], [], []),
                                        strict=True):
                    out[name].append(values)
                out["error"].append(None if ok else result)
        return pa.table(out, schema=_result_schema())

    def _rank(self, requests):
        # The filters, as Recommender.recommend applies them (a user they leave nothing for: its UsageError).
        requests = [(titles, self.rec.filtered_seen(seen, exclude, only), items)
                    for titles, seen, items, exclude, only in requests]
        return [(list(r.titles), list(r.scores), list(r.lm_scores)) for r in self.rec.rank_many(requests, self.k)]


def _result_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.int64()), ("titles", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
                      ("lm_scores", pa.list_(pa.float64())), ("error", pa.string())])


def ray_results(
    model_path: Path,
    db_path: Path,
    groups: Sequence[Sequence[int]],
    catalog,
    *,
    k: int,
    beam: int,
    batch: int,
    threads: int | None,
    prior: str | None,
    prior_weight: float | None,
    address: str | None = None,
    actors: int | None = None,
    ship_model: bool = False,
    exclude: Sequence[int] = (),
    only: Sequence[int] | None = None,
    user_filters=None,
) -> Iterator[list[dict]]:
    """``batch.record`` lines for ``groups`` of users (``batch.plan_groups``), ranked by actors on Ray.

    The driver's part of the batch job (which checked the model against the catalog): loads the prior the
    model would be served with, reads each group's histories from the database and hands them to
    :func:`ray_rankings`. Lines come in the order the actors finish, several groups at a time.
    ``exclude`` / ``only``: item ids, as ``batch.recommend_users`` takes them (for every user);
    ``user_filters``: user -> ``batch.UserFilters``, that user's own.
    """
    from .batch import group_records, history_items
    from .history import HistoryDB
    from .recommend import load_prior

    # The prior Recommender.open would load for this model and database, resolved here: the actors
    # have neither the database (a popularity prior is counted from it) nor, maybe, the sidecar.
    loaded_prior = load_prior(prior, prior_weight, model_path.parent, catalog, db_path)

    def histories():
        with HistoryDB.open(db_path, readonly=True) as db:
            own = user_filters or {}
            for group in groups:
                yield [(user, items, own.get(user)) for user, items in history_items(db, group)]

    for ranked in ray_rankings(model_path, catalog, loaded_prior, histories(), len(groups), k=k, beam=beam,
                               batch=batch, threads=threads, address=address, actors=actors, ship_model=ship_model,
                               exclude=exclude, only=only):
        yield group_records([key for key, _ in ranked], [result for _, result in ranked], catalog)


def ray_rankings(
    model_path: Path,
    catalog,
    prior,
    groups: Iterable[Sequence[tuple[int, Sequence[int]]]],
    n_groups: int,
    *,
    k: int,
    beam: int,
    batch: int,
    threads: int | None,
    address: str | None = None,
    actors: int | None = None,
    ship_model: bool = False,
    exclude: Sequence[int] = (),
    only: Sequence[int] | None = None,
) -> Iterator[list[tuple[int, tuple | str]]]:
    """Rank groups of ``(key, item ids oldest first)`` requests on a Ray actor pool, a group per search (a
    request may also be ``(key, items, batch.UserFilters or None)``: its own filters, on top of the run's).

    Each request is ranked as ``Recommender.rank_titles(titles, set(titles), k, history_items=items)``
    would rank it, in its group's slot (``Recommender.rank_many``); yields ``(key, (titles, scores,
    lm_scores))`` or ``(key, error message)`` per request, a few groups at a time, in the order they finish.
    ``prior``: a loaded ``CFPrior`` or None. ``address``: None connects to the cluster ``ray.init()`` finds
    (RAY_ADDRESS, a local ``ray start``) or starts a local one; else that address (``auto``,
    ``ray://host:10001``); if Ray is already initialised in this process, its cluster is used as it is.
    ``actors``: default, the cluster's CPUs / ``threads`` (default 1). ``exclude`` / ``only``: item ids no
    request is recommended / every request is recommended from (``Recommender.filtered_seen``).
    """
    import pyarrow as pa

    ray = _import_ray()
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")
    if actors is not None and actors < 1:
        raise UsageError(f"--actors must be >= 1 (got {actors})")
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0]
            if "Could not find any running Ray instance" in reason:  # Ray's own advice names its own flags
                reason = ("no running Ray instance found: start one (`ray start --head`), set RAY_ADDRESS, give "
                          "--ray ADDRESS, or --ray local for one on this machine")
            raise UsageError(f"cannot connect to the Ray cluster at {address or 'the default address'}: "
                             f"{reason}") from None
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors become ours, one line
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller draws one bar with an ETA
        threads = threads or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = actors or max(1, cpus // threads)
        if pool * threads > cpus:
            raise UsageError(f"{pool} actors x {threads} threads need {pool * threads} CPUs; the cluster has {cpus}")

        catalog_ref = ray.put(list(zip(catalog.item_ids, catalog.titles, strict=True)))
        prior_ref = ray.put(prior)
        model = ray.put(model_path.read_bytes()) if ship_model else str(model_path)
        blocks = []
        per_block = max(1, min(MAX_GROUPS_PER_BLOCK, n_groups // (4 * pool)))  # every actor gets blocks
        rows: dict[str, list] = {name: [] for name in _request_schema().names}
        for group in groups:
            own = [request[2] if len(request) > 2 else None for request in group]
            rows["keys"].append([request[0] for request in group])
            rows["items"].append([list(request[1]) for request in group])
            rows["exclude"].append([list(f.exclude) if f else [] for f in own])
            rows["only"].append([list(f.only) if f and f.only is not None else None for f in own])
            if len(rows["keys"]) >= per_block:
                blocks.append(ray.put(pa.table(rows, schema=_request_schema())))
                rows = {name: [] for name in _request_schema().names}
        if rows["keys"]:
            blocks.append(ray.put(pa.table(rows, schema=_request_schema())))
        if not blocks:
            return
        dataset = ray.data.from_arrow_refs(blocks).map_batches(
            RankActor,
            fn_constructor_kwargs={"model": model, "catalog_ref": catalog_ref, "prior_ref": prior_ref, "k": k,
                                   "beam": beam, "batch": batch, "threads": threads, "exclude": tuple(exclude),
                                   "only": None if only is None else tuple(only)},
            batch_size=GROUPS_PER_CALL,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=threads,
        )
        try:
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                columns = [table.column(name).to_pylist() for name in ("key", "titles", "scores", "lm_scores", "error")]
                yield [(key, error if error is not None else (titles, scores, lm_scores))
                       for key, titles, scores, lm_scores, error in zip(*columns, strict=True)]
        except Exception as exc:  # a Ray error wraps the worker's traceback: one line, with our exit code
            raise _worker_error(exc) from None
    finally:
        if started_here:
            ray.shutdown()


def _request_schema():
    import pyarrow as pa

    return pa.schema([("keys", pa.list_(pa.int64())), ("items", pa.list_(pa.list_(pa.int64()))),
                      ("exclude", pa.list_(pa.list_(pa.int64()))), ("only", pa.list_(pa.list_(pa.int64())))])


def _worker_error(exc: Exception):
    """Our own error a worker raised (same class, its message), else the exception's last line."""
    from . import errors

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    name, _, message = last.partition(": ")
    kind = getattr(errors, name.rsplit(".", 1)[-1], None) if name.startswith("genrec_edge.errors.") else None
    if isinstance(kind, type) and issubclass(kind, errors.GenrecError):
        return kind(f"on a Ray worker: {message}")
    return errors.GenrecError(f"the Ray job failed: {last}")
