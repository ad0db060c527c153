"""Bounded fuzzing (hypothesis, derandomized for CI): the GGUF header validator, the grammar builder and
validator, and the CSV ingesters never crash (only a GenrecError may escape) and never hang (every
example runs under a SIGALRM watchdog, so a hang fails the test instead of stalling CI).

Each test counts the inputs it tried; ``test_fuzz_counts`` (last in the file) prints them.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_doctor import write_gguf

from genrec_edge.errors import GenrecError

PER_EXAMPLE_SECONDS = 3.0
COUNTS: dict[str, list[int]] = {}  # name -> [tried, raised GenrecError]
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: float = PER_EXAMPLE_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(name: str, fn, *args, **kwargs):
    """Run one example: a result, or None when it raised a GenrecError (the only allowed failure)."""
    tried = COUNTS.setdefault(name, [0, 0])
    tried[0] += 1
    with watchdog():
        try:
            return fn(*args, **kwargs)
        except GenrecError as exc:
            tried[1] += 1
            message = str(exc)
            assert message and "\n" not in message.strip() and "Traceback" not in message
            return None


# ------------------------------------------------------------------------------------------ GGUF header
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> bytes:
    path = write_gguf(tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf", catalog_sha256="a" * 64)
    return path.read_bytes()


@st.composite
def mutated(draw, good: bytes) -> bytes:
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "u64", "u32", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "u64" and len(data) >= 8:
            pos = min(pos, len(data) - 8)
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, draw(st.integers(0, 2**64 - 1))]))
            data[pos : pos + 8] = struct.pack("<Q", value)
        elif op == "u32" and len(data) >= 4:
            pos = min(pos, len(data) - 4)
            data[pos : pos + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(data=st.data())
def test_gguf_header_validator_mutations(tmp_path, good_gguf, data):
    from genrec_edge.convert import read_provenance, validate_gguf_header

    blob = data.draw(mutated(good_gguf))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(blob)
    info = attempt("gguf header (mutated valid file)", validate_gguf_header, path)
    if info is not None:  # accepted: its facts must be consistent with the bytes
        assert info.file_size == len(blob)
        assert all(info.data_offset + t.offset + t.nbytes <= len(blob) for t in info.tensors)
        attempt("gguf provenance", read_provenance, path)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=256), st.binary(max_size=64).map(lambda b: b"GGUF" + b)))
def test_gguf_header_validator_random_bytes(tmp_path, blob):
    from genrec_edge.convert import validate_gguf_header

    path = tmp_path / "fuzz.gguf"
    path.write_bytes(blob)
    assert attempt("gguf header (random bytes)", validate_gguf_header, path) is None or blob[:4] == b"GGUF"


# ------------------------------------------------------------------------------------------ grammar
titles_strategy = st.lists(st.text(min_size=0, max_size=24), min_size=0, max_size=12)


@FUZZ
@given(titles=titles_strategy)
def test_grammar_builder_is_exact_or_refuses(titles):
    from genrec_edge.grammar import catalog_grammar, grammar_language, validate_grammar

    grammar = attempt("grammar builder", catalog_grammar, titles)
    if grammar is None:
        return
    assert attempt("grammar validator (built)", validate_grammar, grammar) is not None, grammar
    language = attempt("grammar language", grammar_language, grammar)
    if language is not None:
        assert language == set(titles), (titles, grammar)


@st.composite
def grammar_text(draw) -> str:
    pieces = draw(st.lists(st.sampled_from(
        ['root', ' ::= ', '"a"', '"\\"', '"\\x4', '"\\u00e9"', '[a-z]', '[^\\n]', '(', ')', '|', '*', '+', '?',
         '\n', ' ', 'x', '::=', '# c\n', '.', '{2,3}', '"', '\\', ']', '[', 'rule-1', '\t', '\r\n']),
        max_size=30))
    return "".join(pieces) + draw(st.text(max_size=10))


@FUZZ
@given(text=st.one_of(grammar_text(), st.text(max_size=80)))
def test_grammar_validator_never_crashes(text):
    from genrec_edge.grammar import validate_grammar

    attempt("grammar validator (random text)", validate_grammar, text)


# ------------------------------------------------------------------------------------------ CSV ingesters
ITEM_HEADER = b"item_id,title,genres\n"
INTER_HEADER = b"user_id,item_id,timestamp,rating\n"
csv_cell = st.one_of(
    st.integers(-5, 30).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b'"', b'""', b'"a,b"', b"1.5", b"NaN", b"1e309", b"\xff", b"\x00", b"\r", b"\n", b"|",
                     b"2020-01-01", b"99999999999999999999999", "é🎬".encode()]),
    st.binary(max_size=6),
)
csv_row = st.lists(csv_cell, min_size=0, max_size=6).map(lambda cells: b",".join(cells) + b"\n")
csv_body = st.lists(csv_row, max_size=8).map(b"".join)


@pytest.fixture(scope="module")
def fuzz_db(tmp_path_factory) -> Path:
    from tinymodel import DEFAULT_TITLES  # noqa: F401 (same tests dir)

    return tmp_path_factory.mktemp("fuzz-db") / "fuzz.db"


def _counts(db: Path) -> tuple[int, int, int]:
    if not db.exists():
        return (0, 0, 0)
    conn = sqlite3.connect(db)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items'").fetchone():
            return (0, 0, 0)
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("items", "users", "interactions"))
    finally:
        conn.close()


@FUZZ
@given(
    items=st.one_of(csv_body.map(lambda b: ITEM_HEADER + b), csv_body),
    inter=st.one_of(csv_body.map(lambda b: INTER_HEADER + b), csv_body),
    skip_bad=st.booleans(),
)
def test_generic_csv_ingest_never_crashes(tmp_path, fuzz_db, items, inter, skip_bad):
    from genrec_edge.ingest import ingest

    (tmp_path / "items.csv").write_bytes(items)
    (tmp_path / "inter.csv").write_bytes(inter)
    before = _counts(fuzz_db)
    report = attempt("csv ingest (generic)", ingest, fuzz_db, "csv", items=tmp_path / "items.csv",
                     interactions=tmp_path / "inter.csv", skip_bad=skip_bad, progress=False)
    if report is None:
        assert _counts(fuzz_db) == before, "a failed ingest must change nothing"


MOVIELENS_FILES = {
    "movielens-csv": ("movies.csv", b"movieId,title,genres\n", "ratings.csv", b"userId,movieId,rating,timestamp\n", b","),
    "movielens-dat": ("movies.dat", b"", "ratings.dat", b"", b"::"),
    "movielens-100k": ("u.item", b"", "u.data", b"", b"|"),
}


@FUZZ
@given(
    fmt=st.sampled_from(sorted(MOVIELENS_FILES)),
    items=csv_body,
    inter=csv_body,
    with_header=st.booleans(),
)
def test_movielens_ingest_never_crashes(tmp_path, fuzz_db, fmt, items, inter, with_header):
    from genrec_edge.ingest import ingest

    items_name, items_header, inter_name, inter_header, sep = MOVIELENS_FILES[fmt]
    folder = tmp_path / fmt
    folder.mkdir(exist_ok=True)
    if fmt == "movielens-100k":  # u.data is tab-separated
        inter = inter.replace(b",", b"\t")
        items = items.replace(b",", sep)
    else:
        items, inter = items.replace(b",", sep), inter.replace(b",", sep)
    (folder / items_name).write_bytes((items_header if with_header else b"") + items)
    (folder / inter_name).write_bytes((inter_header if with_header else b"") + inter)
    before = _counts(fuzz_db)
    report = attempt(f"ingest ({fmt})", ingest, fuzz_db, fmt, folder, progress=False)
    if report is None:
        assert _counts(fuzz_db) == before


def test_fuzz_counts(capsys):
    """Runs last: every fuzz target above ran, and the totals are printed for the report."""
    with capsys.disabled():
        for name, (tried, refused) in sorted(COUNTS.items()):
            print(f"\nfuzz {name}: {tried} inputs, {refused} refused with a GenrecError, 0 crashes, 0 hangs")
    if len(COUNTS) >= 5:  # the whole file ran (not a -k selection)
        assert all(tried > 0 for tried, _ in COUNTS.values())
