"""Batch recommendation: the top-k for many users, written as JSON lines, resumable.

``recommend_users(db, out, users=None, ...)`` is what ``genrec-edge recommend --all-users`` runs::

    users (all with a history, or a list) -> groups of `batch` consecutive users (plan_groups), minus the
    groups already in `out` -> Recommender.recommend_many, one group per search (with `workers=N`, N groups
    at a time in N spawned processes: pool.RecommenderPool; with `ray=`, cluster.ray_results: an actor
    pool on a Ray cluster, each actor one Recommender fed groups of histories)
    -> one JSON line per user, appended and flushed as each group finishes; `out` + ".parquet" at the end

The file (``OUT_FORMAT``): line 1 ``{"format": ..., "version": 2, "config": {...}}``, where ``config`` is
everything the results depend on (the model file's sha256 and its prior sidecar's, the prior, k, the beam,
the database's catalog hash and a checksum of its interactions); then per user
``{"user": 42, "items": [{"rank": 1, "title": ..., "item_ids": [...], "score": ..., "lm_score": ...}, ...]}``
or ``{"user": 42, "items": [], "error": "..."}`` for a user nothing can be recommended to (every title
seen). Running the same command again skips the users already written; a last line cut short by a crash is
dropped (that user is computed again); a file written with another config, or damaged elsewhere, is refused
and left as it is. One process writes a file at a time (an exclusive lock).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EmptyHistoryError, FileAccessError, IngestError, NotFoundError, UsageError
from .history import INT64_MAX, INT64_MIN
from .jsonlog import json_line, lock_exclusive

OUT_FORMAT = "genrec-edge-recommendations"
OUT_VERSION = 2  # 2: the prior as resolved (kind, λ, content hash), not as named
# Requests searched together (same results at any batch). 1: on 2 CPU cores sharing decodes gains nothing
# (bench/results/scale-*: 4.0 s a user at batch 4, 3.8 s alone); more cores or a GPU may.
DEFAULT_BATCH = 1


@dataclass(frozen=True)
class BatchReport:
    """What one ``recommend_users`` call did: users asked for, found already written, computed now."""

    out: Path
    users: int
    resumed: int
    written: int
    errors: int  # users written with an "error" instead of items (every title seen)
    seconds: float
    parquet: Path | None = None
    processes: int = 1  # ranking here: the worker processes (``workers``, ``auto`` resolved); on Ray: 0


# ------------------------------------------------------------------------------------------------ users
_ID = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class UserFilters:
    """One user's own ``exclude`` / ``only`` item ids in a batch run, on top of the run's (``combine_filters``)."""

    exclude: tuple[int, ...] = ()
    only: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value) -> UserFilters:
        """From a UserFilters or a mapping with ``exclude`` and/or ``only`` (lists of item ids)."""
        from .recommend import _item_ids

        if isinstance(value, UserFilters):
            value = {"exclude": value.exclude, "only": value.only}
        if not isinstance(value, Mapping) or set(value) - {"exclude", "only"}:
            raise UsageError(f"a user's filters are {{\"exclude\": [ids], \"only\": [ids]}}, not {value!r}")
        exclude, only = value.get("exclude"), value.get("only")
        return cls(() if exclude is None else _item_ids(exclude, "exclude"),
                   None if only is None else _item_ids(only, "only"))


def combine_filters(exclude: Sequence[int], only: Sequence[int] | None,
                    mine: UserFilters | None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """A user's filters in a run: the run's ``exclude`` and the user's; from what both ``only`` lists allow."""
    if mine is None:
        return tuple(exclude), None if only is None else tuple(only)
    joined = tuple(sorted(set(exclude) | set(mine.exclude)))
    if only is None or mine.only is None:
        allowed = only if mine.only is None else mine.only
        return joined, None if allowed is None else tuple(allowed)
    return joined, tuple(sorted(set(only) & set(mine.only)))


def read_users_file(path: str | Path) -> tuple[list[int], dict[int, UserFilters]]:
    """User ids in file order (duplicates dropped), and the filters of those given with some.

    A line is a user id, or a JSON object ``{"user": 42, "exclude": [ids], "only": [ids]}`` (the filters
    optional: items not to recommend to that user / to recommend from). Blank lines and ``#`` comments are
    skipped. A user listed twice must have the same filters both times.
    """
    users: dict[int, None] = {}
    filters: dict[int, UserFilters] = {}
    for path_, number, value in _id_lines(path, "user"):
        own = None
        if value.startswith("{"):
            user, own = _user_line(path_, number, value)
        else:
            user = _parse_id(path_, number, value, "user")
        if user in users:
            if filters.get(user) != own:
                raise IngestError(f"{path_}:{number}: user {user} is listed before with other filters")
            continue
        users[user] = None
        if own is not None:
            filters[user] = own
    if not users:
        raise UsageError(f"the users file {path} lists no user")
    return list(users), filters


def _user_line(path: Path, number: int, text: str) -> tuple[int, UserFilters | None]:
    where = f"{path}:{number}"
    def no_repeats(pairs):
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:  # json.loads would keep the last one, and drop the first without a word
            raise IngestError(f"{where}: {repeated!r} is given twice")
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as exc:
        raise IngestError(f"{where}: not a user id or a JSON object: {exc.msg}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, lists nested thousands deep
        raise IngestError(f"{where}: not a user id or a JSON object of ids") from None
    if not isinstance(data, dict) or "user" not in data or set(data) - {"user", "exclude", "only"}:
        raise IngestError(f'{where}: a user line is an id or {{"user": ID, "exclude": [IDS], "only": [IDS]}}')
    user = data["user"]
    if isinstance(user, bool) or not isinstance(user, int) or not INT64_MIN <= user <= INT64_MAX:
        raise IngestError(f"{where}: not a user id: {user!r}")
    for name in ("exclude", "only"):
        ids = data.get(name)
        if ids is None:
            continue
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise IngestError(f"{where}: {name} is a list of item ids, not {ids!r}")
        if any(not INT64_MIN <= i <= INT64_MAX for i in ids):
            raise IngestError(f"{where}: an item id in {name} is out of range (SQLite integers are 64-bit)")
    own = UserFilters.of({name: data[name] for name in ("exclude", "only") if data.get(name) is not None})
    return user, None if own == UserFilters() else own


def read_items_file(path: str | Path, *, allow_empty: bool = False) -> dict[int, int]:
    """Item ids (``--exclude-file``, ``--only-file``), one per line (blank lines and ``#`` comments skipped),
    in file order, each mapped to the number of the first line it is on."""
    ids: dict[int, int] = {}
    for path_, number, value in _id_lines(path, "item"):
        ids.setdefault(_parse_id(path_, number, value, "item"), number)
    if not ids and not allow_empty:
        raise UsageError(f"the items file {path} lists no item")
    return ids


def _id_lines(path: str | Path, kind: str) -> Iterator[tuple[Path, int, str]]:
    """``(path, line number, text)`` of each line with something on it, its ``#`` comment cut off."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel, Notepad) is not part of the first id
    except OSError as exc:
        raise FileAccessError(f"cannot read the {kind}s file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read the {kind}s file {path}: {exc}") from None
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): a form feed is no new line
        value = line.split("#", 1)[0].strip()
        if value:
            yield path, number, value


def _parse_id(path: Path, number: int, value: str, kind: str) -> int:
    if not _ID.fullmatch(value):  # int() also takes "4_2" and other scripts' digits
        raise IngestError(f"{path}:{number}: not {'an' if kind == 'item' else 'a'} {kind} id: {value!r}")
    try:
        value_id = int(value)
    except ValueError:  # past Python's 4300-digit limit for int(str)
        value_id = INT64_MAX + 1
    if not INT64_MIN <= value_id <= INT64_MAX:
        shown = value if len(value) <= 24 else f"{value[:20]}... ({len(value)} digits)"
        raise IngestError(f"{path}:{number}: {kind} id {shown} is out of range (SQLite integers are 64-bit)")
    return value_id


def users_with_history(db) -> list[int]:
    """Every user with at least one interaction, by id (an index probe per user, not a table scan)."""
    with db._errors():
        return [r[0] for r in db.conn.execute(
            "SELECT id FROM users u WHERE EXISTS (SELECT 1 FROM interactions i WHERE i.user_id = u.id) ORDER BY id"
        )]


def check_users(db, users: Sequence[int], source: str | None = None) -> None:
    """Every user exists and has a history; else one error naming the first that does not."""
    where = f" (in {source})" if source else ""
    with db._errors():
        for user in users:
            if db.conn.execute("SELECT 1 FROM users WHERE id = ?", (user,)).fetchone() is None:
                raise NotFoundError(f"unknown user {user}{where}")
            if db.conn.execute("SELECT 1 FROM interactions WHERE user_id = ? LIMIT 1", (user,)).fetchone() is None:
                raise EmptyHistoryError(f"user {user}{where} has no history to recommend from")


def data_checksum(db) -> dict:
    """Counts and sums over every interaction: changes when a history changes (one pass, in SQLite).

    ``total`` (a float) rather than ``sum``, which raises on int64 overflow (millisecond timestamps).
    """
    with db._errors():
        n, *sums = db.conn.execute(
            "SELECT count(*), total(user_id), total(item_id), total(timestamp), total(rating) FROM interactions"
        ).fetchone()
    return {"interactions": n, "sums": [float(x) for x in sums]}


def history_items(db, users: Iterable[int]) -> Iterator[tuple[int, list[int]]]:
    """``(user, item ids oldest first)`` per user: what a request without the database carries."""
    with db._errors():
        for user in users:
            rows = db.conn.execute(
                "SELECT item_id FROM interactions WHERE user_id = ? ORDER BY timestamp, item_id", (user,)
            ).fetchall()
            yield user, [r[0] for r in rows]


# ------------------------------------------------------------------------------------------------ records
def record(user: int, titles: Sequence[str], scores: Sequence[float], lm_scores: Sequence[float], catalog,
           error: str | None = None) -> dict:
    """One output line: the ranked titles with every item id of each (duplicate titles are one result)."""
    if error is not None:
        return {"user": int(user), "items": [], "error": error}
    return {"user": int(user), "items": [
        {"rank": rank, "title": title, "item_ids": list(catalog.title_to_items[title]), "score": float(score),
         "lm_score": float(lm)}
        for rank, (title, score, lm) in enumerate(zip(titles, scores, lm_scores, strict=True), start=1)
    ]}


# ------------------------------------------------------------------------------------------------ the file
class OutFile:
    """The output JSONL: its header, the users it holds, appends. Use as a context manager (holds a lock)."""

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = config
        self.fh = None
        self.done: set[int] = set()

    def __enter__(self) -> OutFile:
        if self.path.exists() and not self.path.is_file():
            raise FileAccessError(f"--out {self.path} is not a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a+b")  # noqa: SIM115 - closed in __exit__
        except OSError as exc:
            raise FileAccessError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            lock_exclusive(self.fh, self.path)
            self.fh.seek(0)
            keep = self._read()
            self.fh.truncate(keep)  # a line cut short by a crash: that user is computed again
            if keep == 0:
                self.fh.write(json_line({"format": OUT_FORMAT, "version": OUT_VERSION, "config": self.config}))
                self.fh.flush()
        except BaseException:
            self.fh.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def append(self, records: Sequence[dict]) -> None:
        """Append and flush (one write: a crash cuts at most the last line)."""
        self.fh.write(b"".join(json_line(r) for r in records))
        self.fh.flush()
        self.done.update(r["user"] for r in records)

    def _read(self) -> int:
        """Check the header and collect the users, a line at a time; the length of the complete lines."""
        foreign = f"{self.path} is not a genrec-edge recommendations file; choose another --out"
        header = self.fh.readline()
        if not header.endswith(b"\n"):  # empty, or a header cut short before any user was written
            prefix = b'{"format": "' + OUT_FORMAT.encode() + b'"'
            if not (prefix.startswith(header) or header.startswith(prefix)):
                raise UsageError(foreign)
            return 0
        try:
            data = json.loads(header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(foreign) from None
        if not isinstance(data, dict) or data.get("format") != OUT_FORMAT:
            raise UsageError(foreign)
        if data.get("version") != OUT_VERSION or data.get("config") != self.config:
            if not self.fh.read(1):  # a header and no user (a run that failed before its first): start over
                return 0
            old = data.get("config") if isinstance(data.get("config"), dict) else {}
            differ = sorted(key for key in set(old) | set(self.config) if old.get(key) != self.config.get(key))
            raise UsageError(
                f"{self.path} was written with another model, database or settings "
                f"({', '.join(differ) or 'version'} differ): choose another --out, or delete it to start over"
            )
        keep = len(header)
        for number, raw in enumerate(self.fh, start=2):
            if not raw.endswith(b"\n"):
                break  # the last line, cut short
            try:
                line = json.loads(raw.decode("utf-8"))
                user = line["user"]
                if not isinstance(user, int) or not isinstance(line["items"], list):
                    raise TypeError
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise IngestError(f"{self.path}:{number}: not a recommendations line (the file is left as it is)") from None
            self.done.add(user)
            keep += len(raw)
        return keep


def read_records(path: str | Path) -> dict[int, dict]:
    """The user lines of a recommendations file, by user (for tests and downstream readers)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if number and line.endswith("\n"):
                data = json.loads(line)
                out[data["user"]] = data
    return out


def write_parquet(jsonl: Path, dest: Path, chunk: int = 50_000) -> Path:
    """One row per recommendation (user, rank, title, item_ids, score, lm_score), written atomically."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("--parquet needs pyarrow: pip install pyarrow") from None
    schema = pa.schema([("user", pa.int64()), ("rank", pa.int32()), ("title", pa.string()),
                        ("item_ids", pa.list_(pa.int64())), ("score", pa.float64()), ("lm_score", pa.float64())])
    tmp = dest.with_name(f".{dest.name}.partial")
    columns: dict[str, list] = {name: [] for name in schema.names}

    def flush(writer) -> None:
        writer.write_table(pa.table(columns, schema=schema))
        for values in columns.values():
            values.clear()

    try:
        with pq.ParquetWriter(tmp, schema) as writer, open(jsonl, encoding="utf-8") as fh:
            next(fh, None)  # the header
            for line in fh:
                data = json.loads(line)
                for item in data["items"]:
                    columns["user"].append(data["user"])
                    for name in ("rank", "title", "item_ids", "score", "lm_score"):
                        columns[name].append(item[name])
                if len(columns["user"]) >= chunk:
                    flush(writer)
            flush(writer)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------------------------------ the job
def batch_config(model_path: Path, db, catalog, k: int, beam: int, prior, exclude: Sequence[int] = (),
                 only: Sequence[int] | None = None, user_filters: Mapping[int, UserFilters] | None = None) -> dict:
    """What a file's results depend on; a resumed file must have been written with the same.

    ``prior`` is the loaded prior (``recommend.load_prior``; None: none), recorded as what it resolves to
    (kind, λ, and a hash of its settings and weights), not as the words that named it: restating the
    default (``--prior sasrec``, its tuned λ) resumes, and a ``--prior DIR`` whose files changed in between
    does not. ``exclude`` / ``only`` (sorted item ids) are recorded only when given, so a file written before
    they existed still resumes; users' own filters as a hash of them all (``user_filters_sha256``).
    """
    from .hashing import sha256_file

    config = {"model": model_path.name, "model_sha256": sha256_file(model_path), "prior": prior_fingerprint(prior),
              "k": k, "beam": beam, "catalog_sha256": catalog.sha256, "data": data_checksum(db)}
    if exclude:
        config["exclude"] = list(exclude)
    if only is not None:
        config["only"] = list(only)
    if user_filters:
        import hashlib

        listed = [[user, list(f.exclude), None if f.only is None else list(f.only)]
                  for user, f in sorted(user_filters.items())]
        config["user_filters_sha256"] = hashlib.sha256(json.dumps(listed).encode()).hexdigest()
    return config


def check_filters(catalog, exclude: Sequence[int], only: Sequence[int] | None,
                  user_filters: Mapping[int, UserFilters], users_source: str | None = None) -> None:
    """Every ``exclude`` / ``only`` id, the run's and each user's, is in the catalog, and the run's leave some
    title to recommend (filters act on titles, as results do); else one error, before any user is ranked."""
    from .recommend import check_item_ids

    titles_by_id = dict(zip(catalog.item_ids, catalog.titles, strict=True))
    check_item_ids(titles_by_id, exclude, only, "the catalog")
    for user, mine in user_filters.items():
        try:
            check_item_ids(titles_by_id, mine.exclude, mine.only, "the catalog")
        except NotFoundError as exc:
            where = f" in {users_source}" if users_source else ""
            raise NotFoundError(f"{exc} (user {user}'s filters{where})") from None
    if not exclude and only is None:
        return
    allowed = {titles_by_id[i] for i in only} if only is not None else set(titles_by_id.values())
    if not allowed - {titles_by_id[i] for i in exclude}:
        raise UsageError("exclude and only leave no item to recommend, for any user")


def prior_fingerprint(prior) -> dict:
    """``{"kind", "weight", "sha256"}`` of a loaded prior (its whole config, λ included, and its arrays)."""
    import hashlib
    from dataclasses import asdict

    import numpy as np

    if prior is None:
        return {"kind": "none"}
    digest = hashlib.sha256(json.dumps(asdict(prior.config), sort_keys=True, default=str).encode("utf-8"))
    arrays = dict(prior.weights or {})
    if prior.title_log_counts is not None:
        arrays["title_log_counts"] = prior.title_log_counts
    for name in sorted(arrays):
        digest.update(name.encode("utf-8") + b"\0" + np.ascontiguousarray(arrays[name]).tobytes())
    return {"kind": prior.kind, "weight": prior.weight, "sha256": digest.hexdigest()}


def recommend_users(
    db: str | Path | None,
    out: str | Path,
    users: Sequence[int] | None = None,
    *,
    users_source: str | None = None,
    model: str | Path | None = None,
    k: int = 10,
    beam: int | None = None,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    prior: str | None = None,
    prior_weight: float | None = None,
    parquet: bool = False,
    ray: str | bool | None = None,
    actors: int | None = None,
    ship_model: bool = False,
    workers: int | str = 1,
    exclude: Iterable[int] | None = (),
    only: Iterable[int] | None = None,
    user_filters: Mapping[int, UserFilters | Mapping] | None = None,
    progress: bool = True,
    warn=None,
) -> BatchReport:
    """Top-``k`` for ``users`` (None: every user with a history) appended to ``out`` as JSON lines.

    Example: ``recommend_users("ml.db", "recs.jsonl", model="model-Q8_0.gguf")``. Users already
    in ``out`` are skipped (a resume); ``batch`` requests share each llama_decode (the results are the
    single-request ones). ``ray``: None/False
    runs here; True or an address runs on a Ray cluster (``cluster.ray_results``: ``actors`` actors of
    ``threads`` CPUs each), with results identical to the local run's.
    ``workers`` > 1 ranks in that many spawned processes here, each with its own model (the lines and
    their order are those of ``workers=1``; on 2 cores 2 processes rank ~1.28x the users/s of one:
    bench/results/process-split-2026-12-01.md); ``"auto"`` (the CLI's default) picks one single-thread
    process per core, within memory and the users to rank (``pool.auto_workers``). Call it under
    ``if __name__ == "__main__":`` in a script when it may start processes.
    ``parquet`` also writes ``out`` with the suffix ``.parquet`` when every user is done.
    ``exclude`` / ``only``: item ids no user is recommended / the ids every user is recommended from (as
    ``Recommender.recommend`` takes them; e.g. what is out of / in stock); a user they leave nothing for gets
    an error line. ``user_filters``: user -> that user's own (``UserFilters`` or ``{"exclude": [...], "only":
    [...]}``), on top of those (``combine_filters``; a users file's JSON lines). The header records them all: a
    resumed run must give the same.
    """
    from . import paths
    from .catalog import check_model_catalog
    from .history import HistoryDB
    from .models import default_model_path, require_model_file
    from .pool import AUTO, parse_workers, resolve_workers
    from .recommend import (
        MAX_SEQUENCES,
        _item_ids,
        _user_id,
        check_default_model_catalog,
        default_beam,
        load_prior,
        model_provenance,
        stderr_warning,
    )

    started = time.perf_counter()
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"--k must be >= 1 (got {k})")
    if batch < 1:
        raise UsageError(f"--batch must be >= 1 (got {batch})")
    workers = parse_workers(workers)
    if workers != AUTO and workers > 1 and ray not in (None, False):
        raise UsageError("--workers is for runs here; on Ray, --actors says how many")
    width = beam if beam is not None else default_beam(k)
    if not 1 <= width <= MAX_SEQUENCES - 3:
        raise UsageError(f"--beam must be between 1 and {MAX_SEQUENCES - 3} (got {width})")
    batch = max(1, min(batch, (MAX_SEQUENCES - 2) // (width + 1)))  # llama.cpp's sequence limit
    exclude = () if exclude is None else _item_ids(exclude, "exclude")
    only = None if only is None else _item_ids(only, "only")
    if only == ():
        raise UsageError("only lists no item: there would be nothing to recommend")
    if user_filters is not None and not isinstance(user_filters, Mapping):
        raise UsageError(f"user_filters maps user ids to their filters, not {user_filters!r}")
    own = {_user_id(user): UserFilters.of(value) for user, value in (user_filters or {}).items()}
    own = {user: mine for user, mine in own.items() if mine != UserFilters()}  # none: as a users file drops them
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UsageError("--parquet needs pyarrow: pip install pyarrow") from None
    out = Path(out)
    if parquet and out.with_suffix(".parquet").is_dir():  # found after every user was ranked, before
        raise FileAccessError(f"cannot use {out.with_suffix('.parquet')}: a folder is there, where --parquet "
                              "writes its copy")
    db_path = Path(db) if db is not None else paths.default_db()
    with HistoryDB.open(db_path, readonly=True) as history:
        if users is None:
            wanted = users_with_history(history)
            if not wanted:
                raise UsageError(f"no user in {db_path} has a history")
        else:
            wanted = list(dict.fromkeys(int(u) for u in users))
            if not wanted:
                raise UsageError("no users to recommend for")
            check_users(history, wanted, users_source)
        strays = sorted(set(own) - set(wanted))
        if strays:
            raise UsageError(f"filters given for user {strays[0]}, who is not among the users to recommend for")
        catalog = history.catalog()
        check_filters(catalog, exclude, only, own, users_source)
        if model is None:
            check_default_model_catalog(db_path)  # before building the default model
        model_path = Path(model) if model is not None else default_model_path()
        require_model_file(model_path)
        # Recommender.open's checks, before the output file is touched: a corrupt or foreign GGUF, a model
        # trained for another catalog. It warns about a model without a catalog hash itself; Ray's do not.
        trained_for = model_provenance(model_path).get("catalog_sha256")
        checked = check_model_catalog(trained_for, catalog.sha256, model_path.name, str(db_path))
        if not checked and ray not in (None, False):
            (warn or stderr_warning)(f"{model_path.name} has no genrec.catalog_sha256 (a zero-shot base model?): "
                                      "serving it for this catalog without a training check")
        # The prior, resolved once: the header records it, and the searches use it (a popularity prior is
        # counted from the whole database: not again in Recommender.open or in each worker).
        loaded = load_prior(prior, prior_weight, model_path.parent, catalog, db_path)
        config = batch_config(model_path, history, catalog, k, width, loaded, exclude, only, own)
        prior, prior_weight = (loaded if loaded is not None else "none"), None

    with OutFile(out, config) as sink:
        groups = plan_groups(wanted, sink.done, batch)
        todo = sum(1 for group in groups for user in group if user not in sink.done)
        resumed = len(wanted) - todo
        errors = 0
        local = ray is None or ray is False
        processes, threads = resolve_workers(workers, model_path, len(groups), threads) if local else (0, threads)
        if groups:
            bar = _bar(todo, resumed, progress)
            try:
                if local:
                    results = _local_results(model_path, db_path, groups, k, width, batch, threads, prior,
                                             prior_weight, catalog, warn, processes, exclude, only, own)
                else:
                    from .cluster import ray_results

                    results = ray_results(model_path, db_path, groups, catalog, k=k, beam=width, batch=batch,
                                          threads=threads, prior=prior, prior_weight=prior_weight,
                                          address=None if ray is True else ray, actors=actors,
                                          ship_model=ship_model, exclude=exclude, only=only, user_filters=own)
                for records in results:
                    new = [r for r in records if r["user"] not in sink.done]
                    sink.append(new)
                    errors += sum(1 for r in new if "error" in r)
                    bar.update(len(new))
            finally:
                bar.close()
    parquet_path = write_parquet(out, out.with_suffix(".parquet")) if parquet else None
    return BatchReport(out, len(wanted), resumed, todo, errors, time.perf_counter() - started, parquet_path,
                       processes if groups else 0)


def plan_groups(users: Sequence[int], done: set[int], batch: int) -> list[list[int]]:
    """The groups of ``batch`` consecutive users (of every user asked for) that hold a user not yet done.

    A user's result does not depend on its group (engine.py keeps every llama_decode on llama.cpp's
    row-by-row attention kernel), so any grouping would do; fixing groups by the users' order, with a
    resumed group ranked whole and only its missing users written, makes a resumed file byte-identical to
    an uninterrupted run's, and a Ray run rank the very groups a local run ranks.
    """
    groups = [list(users[first : first + batch]) for first in range(0, len(users), batch)]
    return [group for group in groups if any(user not in done for user in group)]


def _bar(total: int, resumed: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="recommend", unit="user", disable=not progress, dynamic_ncols=True,
                postfix={"resumed": resumed} if resumed else None)


def _local_results(model_path, db_path, groups, k, beam, batch, threads, prior, prior_weight, catalog,
                   warn, workers: int = 1, exclude: Sequence[int] = (), only: Sequence[int] | None = None,
                   user_filters: Mapping[int, UserFilters] | None = None) -> Iterator[list[dict]]:
    """The records of each group of users, through ``recommend_many`` (one search per group) of a
    ``Recommender`` or, with ``workers`` > 1 (``pool.resolve_workers``'s: no more than groups), of a
    ``RecommenderPool`` searching that many groups at a time; either way in the groups' order, so a resumed
    file is byte-identical."""
    from .pool import RecommenderPool, ordered_map
    from .recommend import Recommender, Request

    options = {"threads": threads, "beam": beam, "warn": warn, "prior": prior, "prior_weight": prior_weight,
               "batch": batch}
    own = user_filters or {}
    opened = (RecommenderPool.open(model_path, db_path, workers=workers, **options) if workers > 1
              else Recommender.open(model_path, db_path, **options))
    with opened as rec:
        def rank(requests):
            return [([r.title for r in res.items], [r.score for r in res.items], [r.lm_score for r in res.items])
                    for res in rec.recommend_many(requests, k=k)]

        def records(group):
            requests = []
            for user in group:
                user_exclude, user_only = combine_filters(exclude, only, own.get(user))
                requests.append(Request(user=user, exclude=user_exclude, only=user_only))
            return group_records(group, rank_group(rank, requests), catalog)

        yield from (ordered_map(records, groups, workers) if workers > 1 else map(records, groups))


def group_records(users: Sequence[int], results: Sequence, catalog) -> list[dict]:
    """Output lines of ``rank_group``'s results (a result or an error message per user)."""
    return [record(user, *result, catalog) if isinstance(result, tuple)
            else record(user, [], [], [], catalog, error=result)
            for user, result in zip(users, results, strict=True)]


def rank_group(rank, requests: Sequence) -> list[tuple[list[str], list[float], list[float]] | str]:
    """``rank(requests)`` -> ``(titles, scores, lm_scores)`` per request, all searched at once.

    A request the recommender refuses (its user has seen every title: a UsageError before any search)
    fails its whole group; the group is then ranked one request at a time, and that request gets the
    error's message instead of a result.
    """
    try:
        return list(rank(list(requests)))
    except UsageError as exc:
        if len(requests) == 1:
            return [str(exc)]
        return [result for request in requests for result in rank_group(rank, [request])]
