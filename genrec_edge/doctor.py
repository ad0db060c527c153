"""``genrec-edge doctor``: is this database and this model fit to serve? One line per check.

Each check is a :class:`Check` (``ok``, ``warn`` or ``FAIL`` with a one-line detail). A FAIL carries the
exit code of the error class that the same problem raises elsewhere (``DatabaseError`` 3,
``CorruptModelError`` 7, ``CatalogMismatchError`` 8), so scripts can tell problems apart. Nothing here
writes: the database is opened read-only (no migration, no WAL checkpoint), the model's header is read
with the bounded validator and never handed to llama.cpp.

Database checks: it opens as a genrec-edge database, ``PRAGMA quick_check``, schema version, WAL journal
mode (and the WAL file's size), and that the stored catalog hash still matches the items.
Model checks: header validity, architecture, tokenizer present, catalog hash against the database's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import CatalogMismatchError, CorruptModelError, DatabaseError, GenrecError, UnsupportedCPUError

OK, WARN, FAIL = "ok", "warn", "FAIL"
LARGE_WAL_BYTES = 256 * 1024 * 1024  # a WAL this big means checkpoints are being starved by a reader


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "FAIL"
    detail: str
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def _fail(name: str, detail: str, error: type[GenrecError] | GenrecError = GenrecError) -> Check:
    return Check(name, FAIL, detail, error.exit_code)


def check_database(db_path: str | Path) -> tuple[list[Check], str | None]:
    """The database checks, and the catalog hash of its items (None if it could not be read)."""
    from .history import SCHEMA_VERSION, HistoryDB

    path = Path(db_path)
    checks: list[Check] = []
    try:
        db = HistoryDB.open(path, readonly=True)
    except GenrecError as exc:
        return [_fail("database", str(exc), exc)], None
    with db:
        try:
            users = len(db.users())
            items = db.count_items()
            interactions = db.count_interactions()
            checks.append(Check("database", OK, f"{path} ({items} items, {users} users, {interactions} interactions)"))

            problems = db.quick_check()
            if problems == "ok":
                checks.append(Check("integrity", OK, "PRAGMA quick_check: ok"))
            else:
                first = problems.splitlines()[0]
                checks.append(_fail("integrity", f"PRAGMA quick_check: {first} ({len(problems.splitlines())} problems)", DatabaseError))

            version = db.schema_version()
            if version == SCHEMA_VERSION:
                checks.append(Check("schema", OK, f"version {version}"))
            else:
                checks.append(_fail("schema", f"version {version}, this genrec-edge needs {SCHEMA_VERSION}", DatabaseError))

            mode = db.conn.execute("PRAGMA journal_mode").fetchone()[0]
            wal = Path(str(path) + "-wal")
            wal_size = wal.stat().st_size if wal.exists() else 0
            if mode != "wal":
                checks.append(Check("journal", WARN, f"journal_mode={mode}, expected wal (readers will block writers)"))
            elif wal_size > LARGE_WAL_BYTES:
                checks.append(Check("journal", WARN, f"wal, but the WAL file is {wal_size // 2**20} MiB (checkpoints starved by a long reader?)"))
            else:
                checks.append(Check("journal", OK, f"wal (WAL file {wal_size} bytes)"))

            catalog = db.catalog()
            dataset = db.dataset()
            if items == 0:
                checks.append(_fail("catalog", "no items: ingest a dataset (genrec-edge data ingest ...)", DatabaseError))
            elif dataset is None:
                checks.append(Check("catalog", WARN, f"{items} items but no dataset row (catalog {catalog.sha256[:12]})"))
            elif dataset.catalog_sha256 != catalog.sha256:
                checks.append(_fail(
                    "catalog",
                    f"stored catalog hash {str(dataset.catalog_sha256)[:12]} differs from the items' "
                    f"{catalog.sha256[:12]} (items changed outside genrec-edge?)",
                    DatabaseError,
                ))
            else:
                checks.append(Check("catalog", OK, f"{dataset.name}: sha256 {catalog.sha256[:12]}"))
            return checks, catalog.sha256
        except GenrecError as exc:
            checks.append(_fail("database", str(exc), exc))
            return checks, None


def check_model(model_path: str | Path, catalog_sha256: str | None) -> list[Check]:
    """The model checks; ``catalog_sha256`` is the database's (None: skip the match check)."""
    from gguf import Keys

    from .catalog import check_model_catalog
    from .convert import provenance_of, require_llama, validate_gguf_header

    path = Path(model_path)
    try:
        info = validate_gguf_header(path)
    except GenrecError as exc:
        return [_fail("model", str(exc), exc)]
    checks = [Check("model", OK, f"{path} (GGUF v{info.version}, {len(info.tensors)} tensors, {info.file_size} bytes)")]
    try:
        require_llama(info)
        checks.append(Check("architecture", OK, "llama"))
    except GenrecError as exc:
        checks.append(_fail("architecture", str(exc), exc))

    tokenizer = info.metadata.get(Keys.Tokenizer.MODEL)
    n_tokens = info.array_lengths.get(Keys.Tokenizer.LIST, 0)
    if isinstance(tokenizer, str) and n_tokens > 0:
        checks.append(Check("tokenizer", OK, f"{tokenizer}, {n_tokens} tokens"))
    else:
        missing = Keys.Tokenizer.MODEL if not isinstance(tokenizer, str) else Keys.Tokenizer.LIST
        checks.append(_fail("tokenizer", f"{path}: no tokenizer ({missing} missing)", CorruptModelError))

    if catalog_sha256 is None:
        checks.append(Check("catalog match", WARN, "skipped (no readable database)"))
        return checks
    try:
        provenance = provenance_of(info)
    except GenrecError as exc:
        checks.append(_fail("catalog match", str(exc), exc))
        return checks
    try:
        trained = check_model_catalog(provenance.get("catalog_sha256"), catalog_sha256)
    except CatalogMismatchError as exc:
        checks.append(_fail("catalog match", str(exc), exc))
        return checks
    if trained:
        checks.append(Check("catalog match", OK, f"model and database share catalog {catalog_sha256[:12]}"))
    else:
        checks.append(Check("catalog match", WARN, "model has no genrec.catalog_sha256 (a base model): served with a warning"))
    return checks


def check_prior(model_path: str | Path, db: str | Path) -> list[Check]:
    """The collaborative prior next to the model, loaded as `recommend` and `serve` load it (they refuse to
    start on one that is unreadable or made for another catalog)."""
    from .cf import has_sidecar
    from .history import HistoryDB
    from .recommend import load_prior

    model_dir = Path(model_path).parent
    if not has_sidecar(model_dir):
        return [Check("prior", OK, "none next to the model: the LLM alone")]
    try:
        with HistoryDB.open(db, readonly=True) as history:
            catalog = history.catalog()
        loaded = load_prior(None, None, model_dir, catalog, Path(db))
    except GenrecError as exc:
        return [_fail("prior", str(exc), exc)]
    return [Check("prior", OK, f"{loaded.kind}, λ={loaded.weight:g}, variant {loaded.config.variant}")]


def check_runtime(result=None) -> list[Check]:
    """The llama.cpp build against this machine; ``result`` is a ``llama_probe.ProbeResult`` (default: run it)."""
    from . import llama_probe

    result = result if result is not None else llama_probe.probe()
    checks: list[Check] = []
    if result.system_info:
        checks.append(Check("llama.cpp", OK, result.system_info))
    flags = llama_probe.linux_cpu_flags()
    if flags is not None and result.features:
        missing = llama_probe.missing_cpu_features(result.features, flags)
        amx = [f for f in llama_probe.AMX_FEATURES if result.features.get(f)]
        if missing:
            checks.append(_fail(
                "cpu features",
                f"llama.cpp was built with {', '.join(missing)}, which this CPU/OS does not offer: "
                "rebuild it for this machine with `make install`",
                UnsupportedCPUError,
            ))
        elif amx and not llama_probe.amx_recorded():
            checks.append(Check("cpu features", WARN, (
                f"built with {', '.join(amx)}, but not by `make install` (a wheel from elsewhere?): VMs may "
                "advertise AMX and fault on it; `make install` builds AMX in only where it checked it runs"
            )))
        else:
            checks.append(Check("cpu features", OK, "every compiled instruction set is offered by this CPU"))
    if result.ok:
        checks.append(Check("batched decode", OK, result.detail))
    else:
        checks.append(_fail("batched decode", result.detail, UnsupportedCPUError))
        return checks
    import os

    from . import engine
    from .cpu_share import usable_cpus

    checks.append(check_threads(engine.ADAPT_THREADS, engine.OPENMP_SPIN, os.environ.get("OMP_WAIT_POLICY"),
                                engine.default_threads(), usable_cpus(), openmp=result.features.get("OPENMP")))
    return checks


LONG_SPIN = 10_000  # GOMP_SPINCOUNT from which fixed-count threads collapse beside other work (FINDINGS.md)


def check_threads(adapt: bool, spin: int | None, wait_policy: str | None, threads: int, cpus: int,
                  openmp: bool | None = True) -> Check:
    """How llama.cpp's threads run (engine.py, cpu_share.py): a warning where they spin long at a fixed count.

    ``openmp``: whether llama.cpp was built with OpenMP (its system info's ``OPENMP = 1``; None: unknown).
    Without it ggml runs its own thread pool, which neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT reaches.
    """
    how = (f"up to {threads} of {cpus} CPUs, fewer while other programs keep cores busy" if adapt
           else f"{threads} of {cpus} CPUs, fixed")
    if openmp is False:
        return Check("threads", OK, f"{how}; llama.cpp was built without OpenMP, so OMP_WAIT_POLICY/GOMP_SPINCOUNT "
                                    "do not apply (ggml's own thread pool)")
    if not adapt and ((wait_policy or "").strip().lower() in ("active", "true") or (spin or 0) >= LONG_SPIN):
        return Check("threads", WARN, (
            f"{threads} fixed threads spin-wait ({'OMP_WAIT_POLICY=active' if not spin else f'GOMP_SPINCOUNT={spin}'}): "
            "beside another busy program a request was 2.8x slower (docs/FINDINGS.md); unset it, or let the "
            "count adapt (GENREC_EDGE_ADAPT_THREADS unset, Linux)"))
    waiting = f"spin {spin} times at a barrier, then sleep" if spin else "sleep at a barrier"
    return Check("threads", OK, f"{how}; llama.cpp's threads {waiting}")


def run_checks(db: str | Path | None, model: str | Path | None, runtime: bool = False,
               no_model: str = "skipped (no --model)") -> list[Check]:
    """Every check for the given database and/or model (None skips that side, saying ``no_model`` for the
    model); ``runtime`` adds :func:`check_runtime` first (the CLI always does)."""
    checks: list[Check] = check_runtime() if runtime else []
    catalog_sha = None
    if db is not None:
        db_checks, catalog_sha = check_database(db)
        checks.extend(db_checks)
    else:
        checks.append(Check("database", WARN, "skipped (no --db)"))
    if model is not None:
        model_checks = check_model(model, catalog_sha if db is not None else None)
        checks.extend(model_checks)
        if catalog_sha is not None and all(c.status != FAIL for c in model_checks):  # a broken model has none
            checks.extend(check_prior(model, db))
    else:
        checks.append(Check("model", WARN, no_model))
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 if no check failed, else the first failure's exit code."""
    for check in checks:
        if not check.ok:
            return check.exit_code or 1
    return 0


def report_json(checks: list[Check]) -> str:
    payload: dict[str, Any] = {"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}
    return json.dumps(payload, ensure_ascii=False, indent=2)
