"""The history database: one SQLite file with items, users and their interactions.

Schema (created and upgraded by the versioned migrations ``m001_…`` below, recorded by
``sqlite_utils.Migrations`` in ``_sqlite_migrations``; opening an up-to-date file only reads that table, with
sqlite3: importing sqlite_utils also imports pandas where it is installed, ~0.45 s of every command)::

    datasets(name TEXT PK, source TEXT, catalog_sha256 TEXT, ingested_at TEXT)
    items(id INTEGER PK, title TEXT NOT NULL, year INTEGER, genres TEXT, extra TEXT)   -- genres "|"-joined
    users(id INTEGER PK)
    interactions(user_id, item_id, timestamp INTEGER, rating REAL,
                 PRIMARY KEY (user_id, timestamp, item_id)) WITHOUT ROWID

The interactions primary key *is* the "history of user U in time order" index: a user's rows are
contiguous in the table's b-tree, so reading one history is a range scan however large the table is
(ML-25M). ``idx_interactions_item`` serves per-item lookups. Chronological order everywhere is
``timestamp``, then ``item_id``.

The file runs in WAL mode (readers never block the writer) with a busy timeout; every sqlite3 error is
turned into a one-line :class:`~genrec_edge.errors.DatabaseError`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import operator
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import Catalog, catalog_sha256, title_spellings
from .errors import DatabaseError, DatabaseUnavailableError, FileAccessError, NotFoundError, UsageError

if TYPE_CHECKING:
    import sqlite_utils

DEFAULT_BUSY_TIMEOUT = 5.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # SQLite INTEGER: every id and timestamp the file holds
MIGRATION_SET = "genrec_edge"
MIGRATIONS_TABLE = "_sqlite_migrations"  # sqlite_utils.Migrations.migrations_table


def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE datasets (name TEXT PRIMARY KEY, source TEXT, catalog_sha256 TEXT, ingested_at TEXT)"
    )
    db.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT NOT NULL, year INTEGER, genres TEXT, extra TEXT)"
    )
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    db.execute(
        "CREATE TABLE interactions ("
        " user_id INTEGER NOT NULL REFERENCES users(id),"
        " item_id INTEGER NOT NULL REFERENCES items(id),"
        " timestamp INTEGER NOT NULL,"
        " rating REAL,"
        " PRIMARY KEY (user_id, timestamp, item_id)"
        ") WITHOUT ROWID"
    )
    db.execute("CREATE INDEX idx_interactions_item ON interactions(item_id)")


def m002_items_title_index(db: sqlite_utils.Database) -> None:
    # `history add --title` and item_by_title look titles up exactly; ML-25M has 62k items.
    db.execute("CREATE INDEX idx_items_title ON items(title)")


MIGRATIONS = (m001_initial, m002_items_title_index)  # in order; a migration's name is its function's
SCHEMA_VERSION = len(MIGRATIONS)


def migrations() -> sqlite_utils.Migrations:
    """The migration set as ``sqlite_utils.Migrations`` (imported here: only a create or an upgrade needs it)."""
    import sqlite_utils

    out = sqlite_utils.Migrations(MIGRATION_SET)
    for fn in MIGRATIONS:
        out()(fn)
    return out


def _applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """What ``sqlite_utils.Migrations.applied`` reads (names of this set, in the order applied), with sqlite3."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MIGRATIONS_TABLE,)).fetchone() is None:
        return []
    rows = conn.execute(f"SELECT name FROM [{MIGRATIONS_TABLE}] WHERE migration_set = ? ORDER BY rowid", (MIGRATION_SET,))
    return [name for (name,) in rows]


# HistoryDB.rating_range's scans, by resolved file: (the datasets rows' ingest stamps, the range).
_RATING_RANGES: dict[str, tuple[tuple, tuple[float, float] | None]] = {}


@dataclass(frozen=True)
class Item:
    id: int
    title: str
    year: int | None
    genres: tuple[str, ...]


@dataclass(frozen=True)
class Interaction:
    item_id: int
    title: str
    year: int | None
    genres: tuple[str, ...]
    timestamp: int
    rating: float | None


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    catalog_sha256: str
    ingested_at: str


def split_genres(genres: str | None) -> tuple[str, ...]:
    if not genres or genres == "(no genres listed)":
        return ()
    return tuple(g for g in genres.split("|") if g)


def _item_from_row(row: tuple) -> Item:
    item_id, title, year, genres = row
    return Item(item_id, title, year, split_genres(genres))


def _interaction_from_row(row: tuple) -> Interaction:
    item_id, title, year, genres, timestamp, rating = row
    return Interaction(item_id, title, year, split_genres(genres), timestamp, rating)


def _casefold(value: str | None) -> str | None:
    return None if value is None else value.casefold()


MAX_SEARCH_CHARS = 2000  # a title's length over HTTP; SQLite's LIKE allows patterns of at most 50,000 bytes


def _utf8_safe(text: str) -> str:
    """``text`` with any lone surrogate escaped: sqlite3 cannot encode it (a raw UnicodeEncodeError)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _whole_number(value) -> int | None:
    """``value`` as a Python int if it is a whole number (numpy integers too, which sqlite3 cannot bind); None
    for a bool, a float, a string."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return None
    try:
        return operator.index(value)
    except TypeError:  # a numpy array has __index__, and refuses it unless 0-d
        return None


def _as_int64(value) -> int | None:
    """:func:`_whole_number`, if it fits SQLite's INTEGER; None otherwise."""
    number = _whole_number(value)
    return number if number is not None and INT64_MIN <= number <= INT64_MAX else None


def _check_int64(value, what: str) -> int:
    """A value to store: a whole number that fits SQLite's INTEGER (else sqlite3 raises mid-transaction)."""
    number = _as_int64(value)
    if number is None:
        kind = "not a whole number" if _whole_number(value) is None else "out of range (SQLite integers are 64-bit)"
        raise UsageError(f"{what} {value!r} is {kind}")
    return number


def _translate(exc: sqlite3.Error, path: Path, busy_timeout: float) -> DatabaseError:
    """One sqlite3 error as the DatabaseError a user can act on."""
    message = str(exc)
    if "locked" in message or "busy" in message:
        return DatabaseUnavailableError(f"database is locked by another writer (waited {busy_timeout:g} s): {path}")
    if "readonly" in message or "read-only" in message:
        return DatabaseUnavailableError(f"database is read-only: {path}")
    if "not a database" in message:
        return DatabaseError(f"not a SQLite database: {path}")
    if "malformed" in message or "corrupt" in message:
        return DatabaseError(f"database is corrupt ({message}): {path}")
    if "unable to open" in message:
        return DatabaseError(f"cannot open database ({message}): {path}")
    return DatabaseError(f"database error ({message}): {path}")


def _is_read_only_file(path: Path) -> bool:
    # Root passes os.access for any file, so honour the permission bits too: a file nobody may write
    # was made read-only on purpose.
    mode = path.stat().st_mode
    return not os.access(path, os.W_OK) or not (mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class HistoryDB:
    """A history database. Use :meth:`open`; it is a context manager."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool, busy_timeout: float):
        self.path = path
        self.conn = conn
        self.readonly = readonly
        self.busy_timeout = busy_timeout
        conn.create_function("casefold", 1, _casefold, deterministic=True)  # find_items: case in every script

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        create: bool = False,
        readonly: bool = False,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> HistoryDB:
        """Open (or with ``create=True`` create) a database and bring its schema up to date.

        Raises DatabaseError for a missing file (unless ``create``), a file that is not SQLite, a
        read-only file opened for writing, a lock held past ``busy_timeout`` seconds, or a schema
        newer than this version knows.
        """
        if not isinstance(path, str | os.PathLike):
            raise UsageError(f"a database path is a str or a Path, not {path!r}")
        path = Path(path)
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or \
                not (math.isfinite(busy_timeout) and busy_timeout >= 0):
            raise UsageError(f"the busy timeout is a number of seconds >= 0 (got {busy_timeout!r})")
        if path.is_dir():
            raise DatabaseError(f"not a SQLite database (a directory): {path}")
        if not path.exists():
            if not create or readonly:
                raise DatabaseError(f"no database at {path} (run `genrec-edge init`)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file in the way, no permission: the path, not a raw traceback
                raise FileAccessError(f"cannot use {path}: {exc.strerror or exc}") from None
        elif not readonly and _is_read_only_file(path):
            raise DatabaseUnavailableError(f"database is read-only: {path} (fix its permissions or open it read-only)")
        try:
            if readonly:
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=busy_timeout)
            else:
                conn = sqlite3.connect(str(path), timeout=busy_timeout)
        except sqlite3.Error as exc:
            raise _translate(exc, path, busy_timeout) from None
        self = cls(path, conn, readonly, busy_timeout)
        try:
            with self._errors():
                # Reading the schema is what detects a file that is not SQLite.
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if not readonly:
                    conn.execute("PRAGMA journal_mode=WAL").fetchone()
                self._migrate()
        except BaseException:
            conn.close()
            raise
        return self

    def _migrate(self) -> None:
        applied = _applied_migrations(self.conn)
        known = {fn.__name__ for fn in MIGRATIONS}
        unknown = [name for name in applied if name not in known]
        if unknown:
            raise DatabaseError(
                f"database schema is newer than this genrec-edge (unknown migrations {unknown}): {self.path}"
            )
        if len(set(applied)) == len(known):
            return
        if not applied:
            foreign = [name for (name,) in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != ? "
                "ORDER BY rowid", (MIGRATIONS_TABLE,))]
            if foreign:
                raise DatabaseError(f"not a genrec-edge database (it has tables {foreign[:5]}): {self.path}")
            if self.readonly:
                raise DatabaseError(f"not a genrec-edge database (no schema): {self.path}")
        if self.readonly:
            raise DatabaseError(
                f"database schema is version {len(applied)}, this genrec-edge needs {SCHEMA_VERSION}: "
                f"open it for writing once to upgrade: {self.path}"
            )
        import sqlite_utils

        migrations().apply(sqlite_utils.Database(self.conn))

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        if self._closed:  # sqlite3's own ProgrammingError escaped before
            raise UsageError("this HistoryDB is closed: open another with HistoryDB.open")
        try:
            yield
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self.conn.in_transaction:
                    self.conn.rollback()
            raise _translate(exc, self.path, self.busy_timeout) from None

    _closed = False

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.ProgrammingError:  # another thread's connection: sqlite3 refuses to touch it
            raise UsageError("close a HistoryDB in the thread that opened it (one connection per thread)") from None
        self._closed = True

    def __enter__(self) -> HistoryDB:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------- reads
    def schema_version(self) -> int:
        """The number of applied migrations (m001 -> 1, ...)."""
        with self._errors():
            return len(_applied_migrations(self.conn))

    def quick_check(self) -> str:
        """SQLite's ``PRAGMA quick_check``: ``"ok"`` for a sound file, else the problems found."""
        with self._errors():
            rows = self.conn.execute("PRAGMA quick_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    def dataset(self) -> Dataset | None:
        """The most recently ingested dataset, or None for an empty database."""
        with self._errors():
            row = self.conn.execute(
                "SELECT name, source, catalog_sha256, ingested_at FROM datasets "
                "ORDER BY ingested_at DESC, name LIMIT 1"
            ).fetchone()
        return Dataset(*row) if row else None

    def catalog(self) -> Catalog:
        """Every item, in id order."""
        with self._errors():
            pairs = self.conn.execute("SELECT id, title FROM items ORDER BY id").fetchall()
        return Catalog.from_pairs([(int(i), str(t)) for i, t in pairs])

    def users(self) -> list[int]:
        with self._errors():
            return [r[0] for r in self.conn.execute("SELECT id FROM users ORDER BY id")]

    def count_interactions(self) -> int:
        with self._errors():
            return self.conn.execute("SELECT count(*) FROM interactions").fetchone()[0]

    def count_items(self) -> int:
        with self._errors():
            return self.conn.execute("SELECT count(*) FROM items").fetchone()[0]

    def sequences(self) -> Iterator[tuple[int, list[int]]]:
        """``(user_id, item ids oldest first)`` for every user with at least one interaction, by user id.

        Streams in primary-key order, so it never holds more than one user's history in memory.
        """
        current_user: int | None = None
        items: list[int] = []
        with self._errors():
            cursor = self.conn.execute(
                "SELECT user_id, item_id FROM interactions ORDER BY user_id, timestamp, item_id"
            )
            for user_id, item_id in cursor:
                if user_id != current_user:
                    if current_user is not None:
                        yield current_user, items
                    current_user, items = user_id, []
                items.append(item_id)
        if current_user is not None:
            yield current_user, items

    def _require_user(self, user_id: int) -> int:
        """The id as an int, if that user exists; NotFoundError otherwise (also for what no id can be)."""
        number = _as_int64(user_id)
        if number is None or self.conn.execute("SELECT 1 FROM users WHERE id = ?", (number,)).fetchone() is None:
            raise NotFoundError(f"unknown user {user_id}")
        return number

    def history(self, user_id: int, limit: int | None = None) -> list[Interaction]:
        """The user's interactions oldest first; ``limit`` keeps the last N. Unknown user: NotFoundError."""
        if limit is not None:
            number = _whole_number(limit)
            if number is None or number < 0:
                raise UsageError(f"limit must be a whole number >= 0 (got {limit!r})")
            limit = min(number, INT64_MAX)
        with self._errors():
            user_id = self._require_user(user_id)
            columns = "i.item_id, it.title, it.year, it.genres, i.timestamp, i.rating"
            join = "FROM interactions i JOIN items it ON it.id = i.item_id WHERE i.user_id = ?"
            if limit is None:
                rows = self.conn.execute(
                    f"SELECT {columns} {join} ORDER BY i.timestamp, i.item_id", (user_id,)
                ).fetchall()
            else:
                rows = self.conn.execute(
                    f"SELECT {columns} {join} ORDER BY i.timestamp DESC, i.item_id DESC LIMIT ?",
                    (user_id, limit),
                ).fetchall()
                rows.reverse()
        return [_interaction_from_row(r) for r in rows]

    def rating_range(self) -> tuple[float, float] | None:
        """The lowest and highest rating the database holds; None if it holds none (implicit feedback).

        The scale of its datasets (ml-latest-small: 0.5 to 5, ml-1m: 1 to 5), read from the data since no
        format states one. :meth:`add_interaction` keeps new ratings inside it, so only an ingest changes
        it: one scan per file and ingest (the ``datasets`` rows' ``ingested_at``) per process.
        """
        with self._errors():
            stamps = tuple(self.conn.execute("SELECT name, ingested_at FROM datasets ORDER BY name").fetchall())
            key = str(self.path.resolve())
            cached = _RATING_RANGES.get(key)
            if cached is None or cached[0] != stamps:
                low, high = self.conn.execute("SELECT min(rating), max(rating) FROM interactions").fetchone()
                cached = _RATING_RANGES[key] = (stamps, None if low is None else (float(low), float(high)))
        return cached[1]

    def _check_rating(self, rating: float) -> None:
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise UsageError(f"rating must be a finite number, not {rating!r}")
        scale = self.rating_range()
        if scale is None:
            raise UsageError("this database holds no ratings (implicit feedback): add the interaction without one")
        low, high = scale
        if not low <= rating <= high:
            raise UsageError(f"rating {rating:g} is outside this database's rating range, {low:g} to {high:g}")

    def seen_items(self, user_id: int) -> set[int]:
        with self._errors():
            user_id = self._require_user(user_id)
            return {r[0] for r in self.conn.execute("SELECT item_id FROM interactions WHERE user_id = ?", (user_id,))}

    def item(self, item_id: int) -> Item:
        number = _as_int64(item_id)
        if number is None:
            raise NotFoundError(f"unknown item {item_id}")
        with self._errors():
            row = self.conn.execute(
                "SELECT id, title, year, genres FROM items WHERE id = ?", (number,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"unknown item {item_id}")
        return _item_from_row(row)

    def item_by_title(self, title: str) -> list[Item]:
        """Items whose title is exactly ``title``, or another of its spellings (:func:`~.catalog.title_spellings`:
        NFC, on one line); MovieLens has a few duplicate titles."""
        if not isinstance(title, str):
            raise UsageError(f"a title is a string, not {title!r}")
        with self._errors():
            for spelling in title_spellings(_utf8_safe(title)):
                rows = self.conn.execute(
                    "SELECT id, title, year, genres FROM items WHERE title = ? ORDER BY id", (spelling,)
                ).fetchall()
                if rows:
                    break
        return [_item_from_row(r) for r in rows]

    def find_items(self, text: str, limit: int = 20) -> list[Item]:
        """Items whose title contains ``text``, ignoring case in every script ("AMÉLIE" finds "Amélie"; SQLite's
        own LIKE folds ASCII only): exact, then prefix, then by id."""
        if not isinstance(text, str):
            raise UsageError(f"the text to search for is a string, not {text!r}")
        if len(text) > MAX_SEARCH_CHARS:  # SQLite refuses longer LIKE patterns ("too complex"), a database error
            raise UsageError(f"the text to search for is at most {MAX_SEARCH_CHARS} characters (got {len(text)})")
        if "\x00" in text:  # SQLite's LIKE stops at a NUL: "%\x00" matched every title
            raise UsageError("the text to search for contains a NUL character")
        number = _whole_number(limit)
        if number is None or number < 1:  # -1 returned everything, 1.5 a "datatype mismatch"
            raise UsageError(f"limit must be a whole number >= 1 (got {limit!r})")
        limit = number
        text = _utf8_safe(text)
        folded = text.casefold()
        pattern = "%" + folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._errors():
            rows = self.conn.execute(
                "SELECT id, title, year, genres FROM (SELECT *, casefold(title) AS folded FROM items) "
                "WHERE folded LIKE ? ESCAPE '\\' "
                "ORDER BY (folded = ?) DESC, (folded LIKE ? || '%' ESCAPE '\\') DESC, id LIMIT ?",
                (pattern, folded, pattern[1:-1], min(limit, INT64_MAX)),
            ).fetchall()
        return [_item_from_row(r) for r in rows]

    # ---------------------------------------------------------------- writes
    def add_user(self, user_id: int) -> None:
        """Create a user (no-op if it exists)."""
        user_id = _check_int64(user_id, "user id")
        with self._errors(), self.conn:
            self.conn.execute("INSERT OR IGNORE INTO users(id) VALUES (?)", (user_id,))

    def add_interaction(
        self, user_id: int, item_id: int, timestamp: int | None = None, rating: float | None = None
    ) -> Interaction:
        """Record that ``user_id`` interacted with ``item_id`` (now, unless ``timestamp``); creates the user.

        Recording the same (user, timestamp, item) twice keeps the first rating. A rating must lie in
        :meth:`rating_range` (UsageError otherwise). Returns the stored interaction.
        """
        return self.record_interaction(user_id, item_id, timestamp, rating)[0]

    def record_interaction(
        self, user_id: int, item_id: int, timestamp: int | None = None, rating: float | None = None
    ) -> tuple[Interaction, bool]:
        """:meth:`add_interaction`, and whether it stored a new row (False: that key was there; kept as it was)."""
        user_id = _check_int64(user_id, "user id")
        item = self.item(item_id)
        item_id = item.id
        if rating is not None:
            self._check_rating(rating)
        timestamp = _check_int64(int(time.time()) if timestamp is None else timestamp, "timestamp")
        with self._errors(), self.conn:
            self.conn.execute("INSERT OR IGNORE INTO users(id) VALUES (?)", (user_id,))
            created = self.conn.execute(
                "INSERT OR IGNORE INTO interactions(user_id, item_id, timestamp, rating) VALUES (?, ?, ?, ?)",
                (user_id, item_id, timestamp, rating),
            ).rowcount == 1
            stored = self.conn.execute(
                "SELECT rating FROM interactions WHERE user_id = ? AND timestamp = ? AND item_id = ?",
                (user_id, timestamp, item_id),
            ).fetchone()
        return Interaction(item.id, item.title, item.year, item.genres, timestamp, stored[0]), created

    def record_dataset(self, name: str, source: str) -> None:
        """Upsert a ``datasets`` row and refresh every row's catalog hash (the caller owns the transaction)."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        self.conn.execute(
            "INSERT INTO datasets(name, source, ingested_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET source = excluded.source, ingested_at = excluded.ingested_at",
            (name, source, now),
        )
        self.refresh_catalog_sha256()

    def refresh_catalog_sha256(self) -> str:
        """Recompute the catalog hash over all items and store it on every dataset row."""
        pairs = self.conn.execute("SELECT id, title FROM items ORDER BY id").fetchall()
        digest = catalog_sha256([(int(i), str(t)) for i, t in pairs])
        self.conn.execute("UPDATE datasets SET catalog_sha256 = ?", (digest,))
        return digest
