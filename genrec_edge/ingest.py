"""Load MovieLens releases (and generic CSV files) into the history database.

Formats (``FORMAT PATH``):

- ``movielens-csv``: ml-latest-small, ml-latest, ml-20m, ml-25m - ``movies.csv`` and ``ratings.csv`` in PATH.
- ``movielens-dat``: ml-1m, ml-10m - ``movies.dat`` and ``ratings.dat`` (``::``-separated). ml-1m is
  latin-1, ml-10m UTF-8: ``encoding="auto"`` reads movies.dat as UTF-8 if the whole file decodes, else latin-1.
- ``movielens-100k``: ml-100k - ``u.data`` (tab-separated ``user item rating timestamp``) and ``u.item``
  (latin-1, ``|``-separated: id|title|release date|video release date|IMDb URL|19 genre flags).
- ``csv``: generic - ``interactions`` and ``items`` CSV files with named columns; time as unix seconds
  or an ISO date.

A MovieLens release name (``ml-1m``, the names ``data download`` takes) stands for its format, and
``auto`` detects the format from the files in PATH (``detect_format``).

The whole ingest is one transaction: a malformed row raises ``IngestError("FILE:LINE: reason")`` and
leaves the database exactly as it was; with ``skip_bad`` bad rows are counted and skipped instead. Rows
are streamed and written in chunks, so ML-25M never sits in memory. Inserts are ``INSERT OR IGNORE``,
so ingesting the same data twice adds nothing the second time.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .catalog import one_line
from .errors import IngestError, UsageError, refuse_options
from .history import DEFAULT_BUSY_TIMEOUT, INT64_MAX, INT64_MIN, HistoryDB
from .progress import byte_bar

FORMATS = ("movielens-csv", "movielens-dat", "movielens-100k", "csv")
CHUNK_ROWS = 50_000
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# "Heat (1995)", "Babylon 5 (1994-1998)", "Fargo (2014-)": the first year of a trailing parenthesis.
YEAR_RE = re.compile(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*$")


@dataclass(frozen=True)
class IngestReport:
    """What one ingest added: counts of *new* rows (0 on a repeat), bad rows skipped, wall time."""

    dataset: str
    items: int
    users: int
    interactions: int
    skipped: int
    seconds: float
    # Good rows read: read - new were already in the database (same key) and were kept as they were.
    items_read: int = 0
    interactions_read: int = 0

    def kept(self) -> str:
        """``" (3 items, 12 interactions already there, kept as they were)"``, or ``""``."""
        parts = [f"{n} {what}" for n, what in ((self.items_read - self.items, "items"),
                                                (self.interactions_read - self.interactions, "interactions")) if n]
        return f" ({', '.join(parts)} already there, kept as they were)" if parts else ""


@dataclass(frozen=True)
class ItemRow:
    id: int
    title: str
    year: int | None
    genres: str
    extra: str | None = None


@dataclass(frozen=True)
class InteractionRow:
    user_id: int
    item_id: int
    timestamp: int
    rating: float | None


class BadRow(Exception):
    """One malformed row: ``where`` is "FILE:LINE"."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def parse_year(title: str) -> int | None:
    match = YEAR_RE.search(title)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- reading lines
class LineSource:
    """Decoded lines of one file, one per physical line, with byte progress and decode errors.

    A line that does not decode is replaced by an empty line and its error kept in ``decode_error``,
    so the csv reader's line numbers stay equal to physical line numbers and the parser can report
    (or skip) that exact line.
    """

    def __init__(self, path: Path, encoding: str, on_bytes: Callable[[int], None]):
        self.path = path
        self.encoding = encoding
        self.on_bytes = on_bytes
        self.line_no = 0
        self.decode_error: tuple[int, str] | None = None

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            for raw in fh:
                self.line_no += 1
                self.on_bytes(len(raw))
                if self.line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # whatever the encoding read as
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    text = raw.decode(self.encoding)
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start : exc.start + 1].hex()
                    hint = ": --encoding latin-1 reads the file as Latin-1" if self.encoding == "utf-8" else ""
                    self.decode_error = (
                        self.line_no,
                        f"not valid {self.encoding.upper()} (byte 0x{bad} at column {exc.start + 1}){hint}",
                    )
                    text = "\n"
                yield text

    def take_decode_error(self, line_no: int) -> None:
        if self.decode_error is not None:
            err_line, reason = self.decode_error
            self.decode_error = None
            raise BadRow(f"{self.path}:{err_line}", reason)


def _csv_rows(source: LineSource, delimiter: str = ",") -> Iterator[tuple[int, list[str] | BadRow]]:
    """(line, fields) per record; a BadRow in place of the fields for a record that cannot be read."""
    reader = csv.reader(iter(source), delimiter=delimiter, strict=True)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, BadRow(f"{source.path}:{reader.line_num}", f"bad CSV quoting ({exc})")
            continue
        try:
            source.take_decode_error(reader.line_num)
        except BadRow as bad:
            yield reader.line_num, bad
            continue
        if not fields:
            continue  # blank line
        yield reader.line_num, fields


def _split_rows(source: LineSource, separator: str) -> Iterator[tuple[int, list[str] | BadRow]]:
    for text in source:
        try:
            source.take_decode_error(source.line_no)
        except BadRow as bad:
            yield source.line_no, bad
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        yield source.line_no, text.split(separator)


def _in_int64(number: int, what: str, value: str) -> int:
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{what} {value.strip()!r} is out of range (SQLite integers are 64-bit)")
    return number


# Numbers as data files write them: ASCII digits only. Python's int()/float() also take "1_000" and other
# scripts' digits ("٢"), which no export writes and which would land as other ids, times or ratings.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _int(value: str, what: str) -> int:
    text = value.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{what} {value!r} is not an integer")
    return _in_int64(int(text), what, value)


def _title(value: str) -> str:
    """A stripped, non-empty title on one line (a prompt lists one title per line) without NUL bytes (C
    strings, GBNF and terminals would truncate it)."""
    title = one_line(value.strip())
    if not title:
        raise ValueError("empty title")
    if "\x00" in title:
        raise ValueError("title contains a NUL byte")
    return title


def _rating(value: str) -> float | None:
    value = value.strip()
    if value == "":
        return None
    if value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ValueError(f"rating {value!r} is not a finite number (leave the field empty for no rating)")
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"rating {value!r} is not a number")
    rating = float(value)
    if not math.isfinite(rating):  # 1e999
        raise ValueError(f"rating {value!r} is not a finite number (leave the field empty for no rating)")
    return rating


def _timestamp(value: str) -> int:
    """Unix seconds, or an ISO-8601 date / date-time (naive means UTC)."""
    value = value.strip()
    if _INTEGER.fullmatch(value):
        return _in_int64(int(value), "timestamp", value)
    if value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ValueError(f"timestamp {value!r} is not a finite number")
    if _DECIMAL.fullmatch(value):
        number = float(value)
        if not math.isfinite(number):  # 1e999
            raise ValueError(f"timestamp {value!r} is not a finite number")
        return _in_int64(int(number), "timestamp", value)
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"timestamp {value!r} is neither unix seconds nor an ISO date") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp())


def _expect(fields: list[str], count: int) -> None:
    if len(fields) != count:
        raise ValueError(f"expected {count} fields, got {len(fields)}")


def _check_header(path: Path, fields: list[str], expected: list[str]) -> None:
    if [f.strip() for f in fields] != expected:
        raise IngestError(f"{path}:1: expected header {','.join(expected)}, got {','.join(fields)}")


# ----------------------------------------------------------------------------- format parsers
# Each parser yields (line, ItemRow | InteractionRow) or a BadRow; it opens files through a LineSource factory.
Opener = Callable[[Path, str], LineSource]


def _rows_with_reasons(path: Path, rows, parse) -> Iterator:
    for line, fields in rows:
        if isinstance(fields, BadRow):
            yield fields
            continue
        try:
            yield line, parse(fields)
        except ValueError as exc:
            yield BadRow(f"{path}:{line}", str(exc))


def _csv_with_header(path: Path, open_lines: Opener, delimiter: str = ",") -> tuple[list[str] | None, Iterator]:
    """(header row, data rows) of a UTF-8 CSV; ``(None, nothing)`` for an empty file."""
    rows = _csv_rows(open_lines(path, "utf-8"), delimiter)
    first = next(rows, None)
    if first is None:
        raise IngestError(f"{path}: empty file (a CSV needs at least its header line)")
    if isinstance(first[1], BadRow):
        raise IngestError(str(first[1]))
    return first[1], rows


def _csv_body(path: Path, open_lines: Opener, header: list[str]) -> Iterator:
    """The data rows of a UTF-8 CSV whose first row must be ``header`` (none for an empty file)."""
    found, rows = _csv_with_header(path, open_lines)
    if found is not None:
        _check_header(path, found, header)
    return rows


def movielens_csv_items(path: Path, open_lines: Opener) -> Iterator:
    rows = _csv_body(path, open_lines, ["movieId", "title", "genres"])

    def parse(fields):
        _expect(fields, 3)
        title = _title(fields[1])
        return ItemRow(_int(fields[0], "movie id"), title, parse_year(title), fields[2].strip())

    yield from _rows_with_reasons(path, rows, parse)


def movielens_csv_interactions(path: Path, open_lines: Opener) -> Iterator:
    rows = _csv_body(path, open_lines, ["userId", "movieId", "rating", "timestamp"])

    def parse(fields):
        _expect(fields, 4)
        return InteractionRow(
            _int(fields[0], "user id"), _int(fields[1], "movie id"), _int(fields[3], "timestamp"), _rating(fields[2])
        )

    yield from _rows_with_reasons(path, rows, parse)


def detect_encoding(path: Path) -> str:
    """UTF-8 if the whole file decodes as UTF-8 (ml-10m), else latin-1 (ml-1m)."""
    try:
        with open(path, encoding="utf-8") as fh:
            while fh.read(1 << 20):
                pass
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def movielens_dat_items(path: Path, open_lines: Opener, encoding: str = "auto") -> Iterator:
    if encoding == "auto":
        encoding = detect_encoding(path)

    def parse(fields):
        # MovieID::Title::Genres - a title never contains "::", but be safe: id first, genres last.
        if len(fields) < 3:
            raise ValueError(f"expected 3 '::'-separated fields, got {len(fields)}")
        title = _title("::".join(fields[1:-1]))
        return ItemRow(_int(fields[0], "movie id"), title, parse_year(title), fields[-1].strip())

    source = open_lines(path, encoding)
    yield from _rows_with_reasons(path, _split_rows(source, "::"), parse)


def movielens_dat_interactions(path: Path, open_lines: Opener) -> Iterator:
    def parse(fields):
        if len(fields) != 4:
            raise ValueError(f"expected 4 '::'-separated fields, got {len(fields)}")
        return InteractionRow(
            _int(fields[0], "user id"), _int(fields[1], "movie id"), _int(fields[3], "timestamp"), _rating(fields[2])
        )

    yield from _rows_with_reasons(path, _split_rows(open_lines(path, "utf-8"), "::"), parse)


def movielens_100k_items(path: Path, open_lines: Opener) -> Iterator:
    def parse(fields):
        _expect(fields, 5 + len(ML100K_GENRES))
        flags = fields[5:]
        if any(f.strip() not in ("0", "1") for f in flags):
            raise ValueError("genre flags must be 0 or 1")
        genres = "|".join(g for g, f in zip(ML100K_GENRES, flags, strict=True) if f.strip() == "1" and g != "unknown")
        title = _title(fields[1])
        extra = {k: v for k, v in (("release_date", fields[2]), ("imdb_url", fields[4])) if v.strip()}
        return ItemRow(
            _int(fields[0], "item id"), title, parse_year(title), genres, json.dumps(extra) if extra else None
        )

    yield from _rows_with_reasons(path, _split_rows(open_lines(path, "latin-1"), "|"), parse)


def movielens_100k_interactions(path: Path, open_lines: Opener) -> Iterator:
    def parse(fields):
        _expect(fields, 4)
        return InteractionRow(
            _int(fields[0], "user id"), _int(fields[1], "item id"), _int(fields[3], "timestamp"), _rating(fields[2])
        )

    yield from _rows_with_reasons(path, _split_rows(open_lines(path, "utf-8"), "\t"), parse)


def _generic_columns(path: Path, header: list[str], wanted: dict[str, tuple[str | None, bool]]) -> dict[str, int]:
    header = [h.strip() for h in header]
    found: dict[str, int] = {}
    for key, (column, required) in wanted.items():
        if column and column in header:
            found[key] = header.index(column)
        elif required:
            others = [d for d in (",", ";", "\t", "|") if len(header) == 1 and d in header[0]]
            hint = f"; the header holds {others[0]!r}: another --delimiter?" if others else ""
            raise IngestError(f"{path}:1: no column {column!r} (columns: {', '.join(header)}){hint}")
    return found


def generic_items(path: Path, open_lines: Opener, *, item_id_col: str, title_col: str, genres_col: str | None, delimiter: str) -> Iterator:
    header, rows = _csv_with_header(path, open_lines, delimiter)
    if header is None:
        return
    cols = _generic_columns(path, header, {"id": (item_id_col, True), "title": (title_col, True), "genres": (genres_col, False)})

    def parse(fields):
        _expect(fields, len(header))
        title = _title(fields[cols["title"]])
        genres = fields[cols["genres"]].strip() if "genres" in cols else ""
        return ItemRow(_int(fields[cols["id"]], "item id"), title, parse_year(title), genres)

    yield from _rows_with_reasons(path, rows, parse)


def generic_interactions(
    path: Path, open_lines: Opener, *, user_col: str, item_col: str, time_col: str, rating_col: str | None, delimiter: str
) -> Iterator:
    header, rows = _csv_with_header(path, open_lines, delimiter)
    if header is None:
        return
    cols = _generic_columns(
        path, header, {"user": (user_col, True), "item": (item_col, True), "time": (time_col, True), "rating": (rating_col, False)}
    )

    def parse(fields):
        _expect(fields, len(header))
        rating = _rating(fields[cols["rating"]]) if "rating" in cols else None
        return InteractionRow(
            _int(fields[cols["user"]], "user id"), _int(fields[cols["item"]], "item id"), _timestamp(fields[cols["time"]]), rating
        )

    yield from _rows_with_reasons(path, rows, parse)


# ----------------------------------------------------------------------------- the ingest
# The csv format's columns and delimiter when not given (the order of ingest()'s parameters).
CSV_DEFAULTS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp", "rating_col": "rating",
                "title_col": "title", "item_id_col": "item_id", "genres_col": "genres", "delimiter": ","}
MOVIELENS_FILES = {  # format -> (items file, interactions file) in the release folder
    "movielens-csv": ("movies.csv", "ratings.csv"),
    "movielens-dat": ("movies.dat", "ratings.dat"),
    "movielens-100k": ("u.item", "u.data"),
}


def detect_format(path: Path | None) -> str:
    """The MovieLens format of an extracted release folder, from the files it holds."""
    if path is None:
        raise UsageError("format auto needs the PATH of the extracted release folder")
    if not path.is_dir():
        raise IngestError(f"{path}: not a folder (expected an extracted MovieLens release)")
    found = [fmt for fmt, names in MOVIELENS_FILES.items() if all((path / name).is_file() for name in names)]
    if len(found) != 1:
        expected = "; ".join(" and ".join(names) for names in MOVIELENS_FILES.values())
        partly = [(name, names) for names in MOVIELENS_FILES.values() for name in names if (path / name).is_file()]
        if found:
            held = f"files of several formats ({', '.join(found)})"
        elif partly:
            name, names = partly[0]
            held = f"{name} but not {' or '.join(n for n in names if n != name)}"
        else:
            held = "none of the MovieLens files"
        raise UsageError(f"{path}: cannot detect the format, it holds {held} ({expected}): name the format")
    return found[0]


def resolve_format(fmt: str, path: Path | None) -> str:
    """One of ``FORMATS``, from a format, a MovieLens release name (``ml-1m``: its format) or ``auto``."""
    from .download import RELEASES

    if fmt in FORMATS:
        return fmt
    if fmt in RELEASES:
        return RELEASES[fmt].format
    if fmt == "auto":
        return detect_format(path)
    raise UsageError(
        f"unknown format {fmt!r} (choose from {', '.join(FORMATS)}); or a MovieLens release name "
        f"({', '.join(RELEASES)}), or auto to detect it from PATH"
    )


def _resolve_files(fmt: str, path: Path | None, interactions: Path | None, items: Path | None) -> tuple[Path, Path]:
    if fmt == "csv":
        if interactions is None or items is None:
            raise UsageError("format csv needs --interactions FILE and --items FILE")
        if path is not None and not path.is_dir():
            raise IngestError(f"{path}: no such folder (csv reads --interactions and --items relative to it)")
        base = path if path is not None else Path(".")
        files = (base / items, base / interactions)
    else:
        if path is None:
            raise UsageError(f"format {fmt} needs the PATH of the extracted release folder")
        names = MOVIELENS_FILES[fmt]
        if not path.is_dir():
            raise IngestError(f"{path}: not a folder (expected the extracted release with {' and '.join(names)})")
        files = (path / names[0], path / names[1])
    for file in files:
        if not file.is_file():
            raise IngestError(f"{file}: no such file")
    return files


def ingest(
    db_path: str | Path,
    fmt: str,
    path: str | Path | None = None,
    *,
    interactions: str | Path | None = None,
    items: str | Path | None = None,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    title_col: str | None = None,
    item_id_col: str | None = None,
    genres_col: str | None = None,
    delimiter: str | None = None,
    encoding: str = "auto",
    dataset_name: str | None = None,
    skip_bad: bool = False,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    progress: bool = True,
) -> IngestReport:
    """Ingest one dataset into ``db_path`` (created if missing) in a single transaction.

    Example: ``ingest("my.db", "movielens-csv", "ml-latest-small")``. ``fmt`` may also be a MovieLens
    release name or ``auto`` (:func:`resolve_format`). The interactions' items must be in the items file
    or already in the database. Returns the counts of new rows. The csv format's files, columns and
    delimiter (None: :data:`CSV_DEFAULTS`) are refused for the other formats, whose layout is fixed.
    """
    path = Path(path) if path is not None else None
    fmt = resolve_format(fmt, path)
    if encoding not in ("auto", "utf-8", "latin-1"):
        raise UsageError(f"unknown encoding {encoding!r} (auto, utf-8 or latin-1)")
    given = {"interactions": interactions, "items": items, "user_col": user_col, "item_col": item_col,
             "time_col": time_col, "rating_col": rating_col, "title_col": title_col, "item_id_col": item_id_col,
             "genres_col": genres_col, "delimiter": delimiter}
    if fmt != "csv":
        refuse_options((f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None),
                       f"format csv, not {fmt} (whose files and columns are fixed)")
    user_col, item_col, time_col, rating_col, title_col, item_id_col, genres_col, delimiter = (
        CSV_DEFAULTS[name] if given[name] is None else given[name] for name in CSV_DEFAULTS
    )
    delimiter = _delimiter(delimiter)
    items_file, interactions_file = _resolve_files(
        fmt, path, Path(interactions) if interactions else None, Path(items) if items else None
    )
    if fmt == "movielens-csv":
        item_rows = lambda opener: movielens_csv_items(items_file, opener)  # noqa: E731
        interaction_rows = lambda opener: movielens_csv_interactions(interactions_file, opener)  # noqa: E731
    elif fmt == "movielens-dat":
        item_rows = lambda opener: movielens_dat_items(items_file, opener, encoding)  # noqa: E731
        interaction_rows = lambda opener: movielens_dat_interactions(interactions_file, opener)  # noqa: E731
    elif fmt == "movielens-100k":
        item_rows = lambda opener: movielens_100k_items(items_file, opener)  # noqa: E731
        interaction_rows = lambda opener: movielens_100k_interactions(interactions_file, opener)  # noqa: E731
    else:
        item_rows = lambda opener: generic_items(  # noqa: E731
            items_file, opener, item_id_col=item_id_col, title_col=title_col, genres_col=genres_col, delimiter=delimiter
        )
        interaction_rows = lambda opener: generic_interactions(  # noqa: E731
            interactions_file, opener, user_col=user_col, item_col=item_col, time_col=time_col,
            rating_col=rating_col, delimiter=delimiter,
        )  # fmt: skip
    if fmt != "movielens-dat" and encoding != "auto":
        forced = encoding
        base_items, base_interactions = item_rows, interaction_rows
        item_rows = lambda opener: base_items(lambda p, _enc: opener(p, forced))  # noqa: E731
        interaction_rows = lambda opener: base_interactions(lambda p, _enc: opener(p, forced))  # noqa: E731
    name = dataset_name or (path.resolve().name if path is not None else interactions_file.stem)
    source = f"{fmt}:{(path or interactions_file).resolve()}"

    started = time.perf_counter()
    total_bytes = items_file.stat().st_size + interactions_file.stat().st_size
    new_file = not Path(db_path).exists()
    try:
        with HistoryDB.open(db_path, create=True, busy_timeout=busy_timeout) as db, \
                byte_bar("ingest", total_bytes, enabled=progress) as advance:
            opener: Opener = lambda p, enc: LineSource(p, enc, advance)  # noqa: E731
            with db._errors():
                counts = _ingest_in_one_transaction(
                    db, name, source, item_rows(opener), interaction_rows(opener), items_file, interactions_file,
                    skip_bad,
                )
    except BaseException:
        if new_file:  # all or nothing: a failed first ingest leaves no empty database behind
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        raise
    new_items, new_users, new_interactions, skipped, items_read, interactions_read = counts
    return IngestReport(name, new_items, new_users, new_interactions, skipped, time.perf_counter() - started,
                        items_read, interactions_read)


def _delimiter(value: str) -> str:
    """The one-character field separator; ``\\t`` (as typed in a shell) and ``tab`` mean a tab."""
    if value in ("\\t", "tab"):
        return "\t"
    if len(value) != 1 or value in ('"', "\n", "\r"):
        raise UsageError(f"--delimiter is one character other than a quote or a line break (got {value!r}); "
                         "\\t or tab for a tab")
    return value


def _ingest_in_one_transaction(
    db: HistoryDB, name: str, source: str, item_rows, interaction_rows, items_file: Path, interactions_file: Path,
    skip_bad: bool,
):
    conn = db.conn
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the PK b-tree of a big ingest stays in memory
    conn.execute("BEGIN IMMEDIATE")
    try:
        skipped = 0

        def good(rows):
            nonlocal skipped
            for row in rows:
                if isinstance(row, BadRow):
                    if not skip_bad:
                        raise IngestError(str(row))
                    skipped += 1
                    continue
                yield row[1]

        before = conn.total_changes
        item_ids: dict[int, str] = dict(conn.execute("SELECT id, title FROM items"))  # id -> title
        in_database = set(item_ids)

        def same_catalog(rows):
            """Stop at an item id that already has another title: it is another catalog's (ml-100k numbers
            its films unlike the other releases), and its interactions would land on the wrong titles."""
            for row in rows:
                if not isinstance(row, BadRow):
                    line, item = row
                    known = item_ids.setdefault(item.id, item.title)
                    if known != item.title and one_line(known) != item.title:
                        if item.id in in_database:
                            names = ", ".join(r[0] for r in conn.execute("SELECT name FROM datasets ORDER BY name"))
                            raise IngestError(
                                f"{items_file}:{line}: item {item.id} is {item.title!r} here but {known!r} in the "
                                f"database, which holds another catalog ({names or 'no dataset name'}): ingest "
                                "into another --db"
                            )
                        raise IngestError(f"{items_file}:{line}: item {item.id} is {item.title!r} here but "
                                          f"{known!r} on an earlier line")
                yield row

        batch: list[tuple] = []
        items_read = interactions_read = 0
        for item in good(same_catalog(item_rows)):
            items_read += 1
            batch.append((item.id, item.title, item.year, item.genres, item.extra))
            if len(batch) >= CHUNK_ROWS:
                conn.executemany("INSERT OR IGNORE INTO items(id, title, year, genres, extra) VALUES (?,?,?,?,?)", batch)
                batch.clear()
        conn.executemany("INSERT OR IGNORE INTO items(id, title, year, genres, extra) VALUES (?,?,?,?,?)", batch)
        new_items = conn.total_changes - before

        # A bulk load into an empty table is faster without the secondary index; build it once at the end.
        empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM interactions)").fetchone()[0]
        if empty:
            conn.execute("DROP INDEX IF EXISTS idx_interactions_item")
        users_before = conn.execute("SELECT count(*) FROM users").fetchone()[0]
        new_interactions = 0
        users_batch: set[int] = set()
        batch = []

        def flush() -> int:
            conn.executemany("INSERT OR IGNORE INTO users(id) VALUES (?)", [(u,) for u in users_batch])
            mark = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO interactions(user_id, item_id, timestamp, rating) VALUES (?,?,?,?)", batch
            )
            users_batch.clear()
            batch.clear()
            return conn.total_changes - mark

        def checked(rows):
            for row in rows:
                if not isinstance(row, BadRow) and row[1].item_id not in item_ids:
                    yield BadRow(f"{interactions_file}:{row[0]}", f"unknown item {row[1].item_id} (not in the items file)")
                else:
                    yield row

        for row in good(checked(interaction_rows)):
            interactions_read += 1
            users_batch.add(row.user_id)
            batch.append((row.user_id, row.item_id, row.timestamp, row.rating))
            if len(batch) >= CHUNK_ROWS:
                new_interactions += flush()
        new_interactions += flush()
        if empty:
            conn.execute("CREATE INDEX IF NOT EXISTS idx_interactions_item ON interactions(item_id)")
        new_users = conn.execute("SELECT count(*) FROM users").fetchone()[0] - users_before
        exists = conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone()
        if new_items or new_users or new_interactions or not exists:
            db.record_dataset(name, source)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return new_items, new_users, new_interactions, skipped, items_read, interactions_read


def build_default_db(db_path: str | Path, *, force: bool = False, progress: bool = True) -> IngestReport | None:
    """Build the default database from the bundled ml-latest-small; None if it already exists and is complete.

    Builds into a temporary file next to ``db_path`` and renames it into place, so an interrupted
    build never leaves a half database at ``db_path``.
    """
    from .paths import BUNDLED_DATASET

    db_path = Path(db_path)
    if db_path.exists() and not force:
        try:
            with HistoryDB.open(db_path) as db:
                if db.dataset() is not None and db.count_interactions() > 0:
                    return None
        except Exception:
            pass  # incomplete or broken: rebuild it
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.{os.getpid()}.tmp")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    try:
        report = ingest(tmp, "movielens-csv", BUNDLED_DATASET, dataset_name="ml-latest-small", progress=progress)
        # The last connection closed, so the WAL was checkpointed into tmp: the file alone is complete.
        for stale in (Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
            stale.unlink(missing_ok=True)
        os.replace(tmp, db_path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
    return report


__all__ = ["FORMATS", "IngestReport", "build_default_db", "detect_format", "ingest", "parse_year", "resolve_format"]
