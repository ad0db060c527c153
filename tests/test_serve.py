"""The local HTTP service, through a real HTTP client (urllib / raw sockets) on 127.0.0.1.

Servers are started by the tests with ``make_server(..., port=0)`` in a thread, or as a real
``genrec-edge serve`` process where signals matter. The model is a tiny random GGUF built for the
tiny database's catalog; the database is a real SQLite file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import EMPTY_USER, TINY_HISTORIES, TINY_TITLES
from fastapi.routing import APIRoute

from genrec_edge.errors import UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.serve import MAX_BODY, make_server, openapi_spec, openapi_text

ROOT = Path(__file__).resolve().parents[1]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy for loopback


def http(url: str, method: str = "GET", body=None, headers: dict | None = None, timeout: float = 30.0):
    """One request; returns ``(status, parsed JSON body, headers)`` for 2xx and 4xx/5xx alike."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        hdrs.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read the whole response; returns ``(status, JSON body)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@contextmanager
def running(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def db_server(tiny_db):
    """A server over the tiny database without a model (history and health routes)."""
    with running(make_server(tiny_db, port=0, busy_timeout=0.3)) as server:
        yield server


# ------------------------------------------------------------------------------------------ no model needed
def test_health(db_server):
    status, body, headers = http(db_server.url + "/health")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["status"] == "ok"
    assert body["recommend"] is False and body["workers"] == 0 and body["cache"] == 0 and body["worker_restarts"] == 0
    assert body["db"]["users"] == len(TINY_HISTORIES) + 1
    assert body["db"]["items"] == len(TINY_TITLES)


def test_head_health_for_probes(db_server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", db_server.server_address[1], timeout=10)
    conn.request("HEAD", "/health")  # was 405: HEAD-based health probes failed
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.close()


def test_user_history_in_time_order_with_exact_titles(db_server):
    status, body, _ = http(db_server.url + "/users/1/history")
    assert status == 200
    assert [row["item_id"] for row in body["history"]] == TINY_HISTORIES[1]
    assert [row["title"] for row in body["history"]] == [TINY_TITLES[i] for i in TINY_HISTORIES[1]]
    status, body, _ = http(db_server.url + "/users/7/history?limit=3")
    assert [row["item_id"] for row in body["history"]] == TINY_HISTORIES[7][-3:]


def test_find_items_gives_the_ids_the_cli_search_gives(db_server, tiny_db):
    """An app that embeds the service finds item ids (for "exclude", "only", POST /history) by title."""
    from urllib.parse import quote

    with HistoryDB.open(tiny_db, readonly=True) as db:
        expected = [(i.id, i.title) for i in db.find_items("HEAT", limit=20)]
        everything = [(i.id, i.title) for i in db.find_items("(", limit=3)]
    status, body, _ = http(db_server.url + "/items?search=HEAT")
    assert status == 200, body
    assert [(r["item_id"], r["title"]) for r in body["items"]] == expected and expected[0][1] == "Heat (1995)"
    assert set(body["items"][0]) == {"item_id", "title", "year", "genres"}
    status, body, _ = http(db_server.url + "/items?search=" + quote("(") + "&limit=3")
    assert status == 200 and [(r["item_id"], r["title"]) for r in body["items"]] == everything
    status, body, _ = http(db_server.url + "/items?search=zzqx")
    assert status == 200 and body == {"items": []}
    for query, words in [("", 'missing field "search"'), ("?search=", "search must not be empty"),
                         ("?search=a&limit=0", "limit must be an integer between 1 and 1000"),
                         ("?search=a&limit=x", "limit"), ("?search=a&item=1", "unknown query parameter(s)"),
                         ("?search=" + "a" * 2001, "search is longer than 2000 characters"),
                         ("?search=%00", "contains a NUL character")]:
        status, body, _ = http(db_server.url + "/items" + query)
        assert status == 400 and words in body["error"], (query, status, body)


def test_add_history_by_item_and_by_adversarial_title(db_server, tiny_db):
    status, body, _ = http(db_server.url + "/history", "POST", {"user": 1, "item_id": 200, "timestamp": 2_000_000_000})
    assert status == 201, body
    assert body == {"user": 1, "item_id": 200, "title": TINY_TITLES[200], "year": body["year"], "genres": body["genres"],
                    "timestamp": 2_000_000_000, "rating": None}
    quoted = 'Quote "Me" (2001)'
    backslash = "Back\\slash (2002)"
    status, body, _ = http(db_server.url + "/history", "POST", {"user": 42, "title": quoted, "rating": 4.5})
    assert status == 201, body
    assert body["title"] == quoted and body["rating"] == 4.5
    status, body, _ = http(db_server.url + "/history", "POST", {"user": 42, "title": backslash, "timestamp": 3_000_000_000})
    assert status == 201, body
    # The same user, item and timestamp again: nothing is created (200, not 201) and the first record stays.
    again = {"user": 42, "title": backslash, "timestamp": 3_000_000_000, "rating": 5}
    status, body, _ = http(db_server.url + "/history", "POST", again)
    assert status == 200 and body["rating"] is None, body
    status, body, _ = http(db_server.url + "/users/42/history")
    assert [row["title"] for row in body["history"]] == [quoted, backslash]
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert [r.item_id for r in db.history(1)][-1] == 200


def test_negative_and_int64_user_ids_reach_the_same_rows_as_the_cli(db_server, tiny_db):
    # The database, `data ingest` and `history add` take any SQLite INTEGER as an id; so does the service.
    for user in (-5, -(2**63), 2**63 - 1):
        status, body, _ = http(db_server.url + "/history", "POST", {"user": user, "item_id": 200, "timestamp": 7})
        assert status == 201 and body["user"] == user, body
        status, body, _ = http(db_server.url + f"/users/{user}/history")
        assert status == 200 and [row["item_id"] for row in body["history"]] == [200], body
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert [r.item_id for r in db.history(-5)] == [200]


BAD_REQUESTS = [
    # (method, path, body bytes, content type, status, expected substring)
    ("POST", "/history", b"{not json", "application/json", 400, "not valid JSON"),
    ("POST", "/history", b"[1, 2]", "application/json", 400, "must be a JSON object"),
    ("POST", "/history", b'{"user": 1, "item_id": NaN}', "application/json", 400, "NaN is not valid JSON"),
    ("POST", "/history", b"\xff\xfe{}", "application/json", 400, "not UTF-8"),
    ("POST", "/history", b"[" * 20000 + b"]" * 20000, "application/json", 400, "nested too deeply"),
    ("POST", "/history", b'{"user": 1, "item_id": 10, "extra": 1}', "application/json", 400, "unknown field(s) ['extra']"),
    ("POST", "/history", b'{"item_id": 10}', "application/json", 400, 'missing field "user"'),
    ("POST", "/history", b'{"user": 1}', "application/json", 400, 'exactly one of "item_id" or "title"'),
    ("POST", "/history", b'{"user": 1, "item_id": 10, "title": "x"}', "application/json", 400, 'exactly one of "item_id" or "title"'),
    ("POST", "/history", b'{"user": "1", "item_id": 10}', "application/json", 400, "user must be an integer"),
    ("POST", "/history", b'{"user": true, "item_id": 10}', "application/json", 400, "user must be an integer"),
    ("POST", "/history", b'{"user": 9223372036854775808, "item_id": 10}', "application/json", 400, "user must be between -9223372036854775808 and 9223372036854775807"),
    ("POST", "/history", b'{"user": -9223372036854775809, "item_id": 10}', "application/json", 400, "user must be between -9223372036854775808"),
    ("POST", "/history", b'{"user": 1, "item_id": 10, "rating": "5"}', "application/json", 400, "rating must be a number"),
    ("POST", "/history", b'{"user": 1, "title": ""}', "application/json", 400, "title must not be empty"),
    ("POST", "/history", b'{"user": 1, "item_id": 11}', "application/json", 404, "unknown item 11"),
    ("POST", "/history", b'{"user": 1, "title": "No Such Film (1900)"}', "application/json", 404, "unknown title"),
    ("POST", "/history", b'{"user": 1, "item_id": 10}', "text/plain", 415, "Content-Type must be application/json"),
    ("POST", "/recommend", b'{"user": 1, "k": 0}', "application/json", 400, "k must be an integer between 1 and 100"),
    ("POST", "/recommend", b'{"user": 1, "k": 101}', "application/json", 400, "k must be an integer between 1 and 100"),
    ("POST", "/recommend", b'{"user": 1, "k": 2.5}', "application/json", 400, "k must be an integer between 1 and 100"),
    ("POST", "/recommend", b'{"user": 1, "history": ["x"]}', "application/json", 400, 'exactly one of "user" or "history"'),
    ("POST", "/recommend", b"{}", "application/json", 400, 'exactly one of "user" or "history"'),
    ("GET", "/users/999/history", None, None, 404, "unknown user 999"),
    ("GET", "/users/1/history?limit=-1", None, None, 400, "limit must be an integer"),
    ("GET", "/users/1/history?color=red", None, None, 400, "unknown query parameter"),
    ("GET", "/users/1/history?limit=1&limit=2", None, None, 400, "query parameter(s) given more than once: 'limit'"),
    ("GET", "/users/abc/history", None, None, 400, 'user must be an integer, not "abc"'),
    ("GET", "/users/1.5/history", None, None, 400, 'user must be an integer, not "1.5"'),
    ("GET", "/users/%EF%BC%91/history", None, None, 400, "user must be an integer"),  # a full-width digit one
    ("GET", "/users/9223372036854775808/history", None, None, 400, "user must be between"),
    ("GET", "/nope", None, None, 404, "no route /nope"),
    ("DELETE", "/history", None, None, 405, "DELETE is not allowed on /history"),
    ("GET", "/recommend", None, None, 405, "GET is not allowed on /recommend"),
]


@pytest.mark.parametrize(("method", "path", "body", "ctype", "status", "message"), BAD_REQUESTS,
                         ids=[f"{m} {p} {s} {msg[:24]}" for m, p, _, _, s, msg in BAD_REQUESTS])
def test_bad_requests_get_json_errors(db_server, method, path, body, ctype, status, message):
    headers = {"Content-Type": ctype} if ctype else {}
    got_status, got, resp_headers = http(db_server.url + path, method, body, headers)
    assert got_status == status, got
    assert set(got) == {"error"}
    assert message in got["error"]
    assert "Traceback" not in got["error"]
    if status == 405:
        assert resp_headers["Allow"]


def test_recommend_without_model_is_503(db_server):
    status, body, headers = http(db_server.url + "/recommend", "POST", {"user": 1, "k": 3})
    assert status == 503 and "no model loaded" in body["error"]
    assert headers["Retry-After"] == "1"


def test_body_size_limit_and_content_length(db_server):
    port = db_server.server_address[1]
    head = f"POST /history HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    status, body = raw_request(port, (head + f"Content-Length: {MAX_BODY + 1}\r\n\r\n").encode())
    assert status == 413 and str(MAX_BODY) in body["error"]
    status, body = raw_request(port, (head + "\r\n").encode())
    assert status == 411 and "Content-Length" in body["error"]
    status, body = raw_request(port, (head + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode())
    assert status == 411
    # A body just under the limit is read and judged on its content.
    padded = json.dumps({"user": 1, "title": "x" * (MAX_BODY - 100)}).encode()
    status, body, _ = http(db_server.url + "/history", "POST", padded)
    assert status == 400 and "longer than" in body["error"]
    status, body = raw_request(port, b"GARBAGE\r\n\r\n")
    assert status == 400


def test_dns_rebinding_host_header_is_refused(db_server):
    status, body, _ = http(db_server.url + "/health", headers={"Host": "evil.example:8765"})
    assert status == 403 and "loopback" in body["error"]
    status, _, _ = http(db_server.url + "/health", headers={"Host": "localhost:8765"})
    assert status == 200
    for host in ("[::1]evil.example", "[::1]:80evil", "localhost:evil", "127.0.0.1:"):  # loopback-looking prefixes
        status, body, _ = http(db_server.url + "/health", headers={"Host": host})
        assert status == 403, host
    assert http(db_server.url + "/health", headers={"Host": "[::1]:8765"})[0] == 200


def test_cors_preflight_is_not_granted(db_server):
    status, body, headers = http(db_server.url + "/history", "OPTIONS", headers={"Origin": "http://evil.example"})
    assert status == 405
    assert "Access-Control-Allow-Origin" not in headers


def test_bearer_token(tiny_db):
    with running(make_server(tiny_db, port=0, token="s3cret")) as server:
        assert http(server.url + "/health")[0] == 200  # liveness stays open
        status, body, headers = http(server.url + "/users/1/history")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert http(server.url + "/users/1/history", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http(server.url + "/users/1/history", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert http(server.url + "/users/1/history", headers={"Authorization": "bearer s3cret"})[0] == 200  # RFC 7235
        assert http(server.url + "/users/1/history", headers={"Authorization": "Basic s3cret"})[0] == 401
    for token in ("", "  ", " s3cret"):  # no client could send it: refused at start, not a locked-out server
        with pytest.raises(UsageError, match="bearer token"):
            make_server(tiny_db, port=0, token=token)
    for host, message in (("", "--host is empty"), ("127.0.0.1:80", "without a port")):
        with pytest.raises(UsageError, match=message):
            make_server(tiny_db, host=host, port=0)


def test_messages_name_json_kinds_and_survive_lone_surrogates(db_server):
    # A lone surrogate quoted back in an error was a 500 (UnicodeEncodeError); it is escaped instead.
    for body in (b'{"user": "\\ud800"}', b'{"history": ["Heat (1995)"], "k": "\\udfff"}'):
        status, answer, _ = http(db_server.url + "/recommend", "POST", body)
        assert status == 400 and "\\ud" in answer["error"], answer
    status, answer, _ = http(db_server.url + "/history", "POST", b'{"user": 1, "item_id": 10, "item_id": 20}')
    assert status == 400 and 'the key "item_id" appears twice' in answer["error"], answer  # last-wins before
    status, answer, _ = http(db_server.url + "/history", "POST", b"null")
    assert status == 400 and answer["error"] == "request body must be a JSON object, not null"
    status, answer, _ = http(db_server.url + "/recommend", "PUT", {"user": 1})
    assert status == 405, answer  # the method, not the body's framing


def test_locked_database_is_503(tiny_db, db_server):
    holder = sqlite3.connect(tiny_db, timeout=0.1)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the server's 0.3 s busy timeout
    try:
        started = time.monotonic()
        status, body, headers = http(db_server.url + "/history", "POST", {"user": 1, "item_id": 10, "timestamp": 5})
        assert status == 503, body
        assert "locked" in body["error"] and headers["Retry-After"] == "1"
        assert time.monotonic() - started < 5
        # Readers are not blocked by a writer in WAL mode.
        assert http(db_server.url + "/users/1/history")[0] == 200
    finally:
        holder.rollback()
        holder.close()
    status, body, _ = http(db_server.url + "/history", "POST", {"user": 1, "item_id": 10, "timestamp": 5})
    assert status == 201, body


def test_refuses_non_loopback_host_without_allow_remote(tiny_db, capsys):
    with pytest.raises(UsageError, match="refusing to listen on 0.0.0.0"):
        make_server(tiny_db, host="0.0.0.0", port=0)
    from genrec_edge.cli import main

    rc = main(["serve", "--host", "0.0.0.0", "--port", "0", "--db", str(tiny_db), "--model", str(tiny_db)])
    err = capsys.readouterr().err
    assert rc == UsageError.exit_code
    assert "refusing to listen on 0.0.0.0" in err and "--allow-remote" in err
    assert "Traceback" not in err


def test_openapi_served_equals_saved_and_describes_every_route(db_server):
    status, served, _ = http(db_server.url + "/openapi.json")
    assert status == 200
    saved = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert saved == openapi_text(), "docs/openapi.json is stale: python -m genrec_edge.serve docs/openapi.json"
    assert served == openapi_spec() == json.loads(saved)
    assert served["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, ops in served["paths"].items() for method in ops}
    routes = [r for r in db_server.app.routes if isinstance(r, APIRoute)]
    assert described == {(m, r.path_format) for r in routes for m in r.methods}
    for path, ops in served["paths"].items():
        for op in ops.values():
            assert op["responses"], path
            assert op["summary"], path
    # every $ref resolves
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(served)
    assert refs and all(ref.split("/")[-1] in served["components"]["schemas"] for ref in refs)


# ------------------------------------------------------------------------------------------ with the model
_MODELS: dict[tuple, Path] = {}


def tiny_model_for(db_path: Path, out_root: Path, extra_titles: tuple[str, ...] = ()) -> Path:
    """A tiny random GGUF whose provenance names ``db_path``'s catalog (built once per catalog per session)."""
    from tinymodel import DEFAULT_TITLES, tiny_gguf

    with HistoryDB.open(db_path, readonly=True) as db:
        sha = db.catalog().sha256
    if sha not in _MODELS:
        out = out_root / f"model-{sha[:12]}"
        _MODELS[sha] = tiny_gguf(out, corpus=list(DEFAULT_TITLES) + list(extra_titles),
                                 provenance={"catalog_sha256": sha})
    return _MODELS[sha]


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def tiny_model(tiny_db, model_root) -> Path:
    return tiny_model_for(tiny_db, model_root)


@pytest.fixture
def model_server(tiny_db, tiny_model):
    with running(make_server(tiny_db, tiny_model, port=0, threads=1)) as server:
        yield server


def test_recommend_for_user_and_for_history(model_server):
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "k": 5})
    assert status == 200, body
    assert [r["rank"] for r in body["items"]] == [1, 2, 3, 4, 5]
    recommended = {i for r in body["items"] for i in r["item_ids"]}
    assert not recommended & set(TINY_HISTORIES[1]), "seen items must be excluded"
    assert all(r["title"] in TINY_TITLES.values() for r in body["items"])
    assert body["timings"]["total_ms"] > 0
    history = [TINY_TITLES[10], 'Quote "Me" (2001)']
    status, body, _ = http(model_server.url + "/recommend", "POST", {"history": history, "k": 3})
    assert status == 200, body
    assert len(body["items"]) == 3
    assert not {r["title"] for r in body["items"]} & set(history)


def test_recommend_exclude_and_only_fields(model_server, tiny_db, tiny_model):
    from genrec_edge.recommend import Recommender

    url = model_server.url + "/recommend"
    status, first, _ = http(url, "POST", {"user": 1, "k": 4})
    assert status == 200, first
    drop = first["items"][0]["item_ids"]
    status, body, _ = http(url, "POST", {"user": 1, "k": 4, "exclude": drop})
    assert status == 200, body
    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as rec:
        alone = rec.recommend(user=1, k=4, exclude=drop)
        only = rec.recommend(history=[TINY_TITLES[10]], k=4, only=[10, 20, 30, 40, 50])
    assert [(r["title"], r["score"]) for r in body["items"]] == [(r.title, r.score) for r in alone.items]
    assert not set(drop) & {i for r in body["items"] for i in r["item_ids"]}
    status, body, _ = http(url, "POST", {"user": 1, "k": 4, "exclude": None, "only": None})
    assert status == 200 and body["items"] == first["items"]  # null: no filter
    status, body, _ = http(url, "POST", {"history": [TINY_TITLES[10]], "k": 4, "only": [50, 40, 30, 20, 10, 10]})
    assert status == 200 and [r["title"] for r in body["items"]] == [r.title for r in only.items]
    for payload, code, words in [({"user": 1, "exclude": [999]}, 404, "unknown item 999 in exclude"),
                                 ({"user": 1, "only": [999]}, 404, "unknown item 999 in only"),
                                 ({"user": 1, "exclude": ["10"]}, 400, "exclude"),
                                 ({"user": 1, "exclude": 10}, 400, "exclude"),
                                 ({"user": 1, "only": []}, 400, "nothing left to recommend")]:
        status, body, _ = http(url, "POST", payload)
        assert status == code and words in body["error"], (payload, status, body)


def test_a_repeated_request_is_answered_from_the_cache_until_the_history_changes(tiny_db, tiny_model):
    with running(make_server(tiny_db, tiny_model, port=0, threads=1, cache=4, prompt_cache=2,
                             log=lambda line: None)) as server:
        health = http(server.url + "/health")[1]
        assert (health["cache"], health["prompt_cache"]) == (4, 2)
        url = server.url + "/recommend"
        answers = [http(url, "POST", {"user": 3, "k": 5})[1] for _ in range(2)]
        assert [a["cached"] for a in answers] == [False, True]
        assert answers[0]["items"] == answers[1]["items"] and answers[1]["timings"]["decoded_tokens"] == 0
        # Another k is another search, from the prompt the first request decoded.
        status, body, _ = http(url, "POST", {"user": 3, "k": 4})
        assert status == 200 and body["cached"] is False and server.service.recommender.prompt_hits == 1
        assert body["timings"]["prefilled_tokens"] == 0 < answers[0]["timings"]["prefilled_tokens"]
        status, _, _ = http(server.url + "/history", "POST", {"user": 3, "item_id": answers[0]["items"][0]["item_ids"][0]})
        assert status == 201
        status, body, _ = http(url, "POST", {"user": 3, "k": 5})
        assert status == 200 and body["cached"] is False
        assert answers[0]["items"][0]["title"] not in {r["title"] for r in body["items"]}  # now seen


def test_recommend_errors_with_model(model_server):
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 999, "k": 3})
    assert status == 404 and "999" in body["error"]
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": EMPTY_USER, "k": 3})
    assert status == 422, body
    status, body, _ = http(model_server.url + "/recommend", "POST", {"history": ["No Such Film"], "k": 3})
    assert 400 <= status < 500 and "No Such Film" in body["error"]


def test_concurrent_requests_share_searches_and_get_their_own_answers(tiny_db, tiny_model):
    """Requests arriving together are searched in groups (recommend_many); each answer equals the one a
    request gets alone, and a bad request in a group fails alone."""
    from genrec_edge.recommend import Recommender

    with Recommender.open(tiny_model, tiny_db, threads=1, batch=4, warn=lambda m: None) as rec:
        alone = {u: [r.title for r in rec.recommend(user=u, k=3).items] for u in (1, 2, 4, 7, 8)}
        groups: list[int] = []
        real = rec.recommend_many

        def spy(requests, k=10, cancel=None):
            groups.append(len(requests))
            return real(requests, k=k, cancel=cancel)

        rec.recommend_many = spy
        with running(make_server(tiny_db, port=0, recommender=rec, log=lambda line: None)) as server:
            users = [1, 2, 4, 7, 8, 999]
            answers: dict[int, tuple] = {}
            barrier = threading.Barrier(len(users))

            def ask(user: int) -> None:
                barrier.wait()
                answers[user] = http(server.url + "/recommend", "POST", {"user": user, "k": 3})[:2]

            threads = [threading.Thread(target=ask, args=(u,)) for u in users]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    for user, titles in alone.items():
        status, body = answers[user]
        assert status == 200 and [r["title"] for r in body["items"]] == titles
    assert answers[999][0] == 404 and "999" in answers[999][1]["error"]
    assert max(groups) > 1, f"no request shared a search: {groups}"


def test_recommend_prior_field(model_server):
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "k": 3, "prior": "pop",
                                                                      "prior_weight": 0.5})
    assert status == 200, body
    assert body["prior"] == "pop" and body["prior_weight"] == 0.5
    assert all(r["lm_score"] is not None and r["score"] <= r["lm_score"] for r in body["items"])
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "k": 3, "prior": "none"})
    assert status == 200 and body["prior"] == "none" and all(r["score"] == r["lm_score"] for r in body["items"])
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "prior": "sasrec"})
    assert status == 404 and "no sasrec prior" in body["error"]
    for bad in ({"user": 1, "prior": "knn"}, {"user": 1, "prior_weight": -1}, {"user": 1, "prior_weight": "1"},
                {"user": 1, "prior": "none", "prior_weight": 2}, {"user": 1, "prior_weight": 1e20}):
        status, body, _ = http(model_server.url + "/recommend", "POST", bad)
        assert status == 400 and "prior" in body["error"], (bad, body)
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "prior": "knn"})
    assert body["error"] == "prior must be one of 'none', 'pop' or 'sasrec', not \"knn\"", body
    status, body, _ = http(model_server.url + "/recommend", "POST", {"user": 1, "prior": "none", "prior_weight": 0})
    assert status == 200 and body["prior"] == "none", body


def _start_cli_server(tiny_db: Path, model: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--db", str(tiny_db), "--model", str(model),
         "--threads", "1", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith("serving on http://127.0.0.1:"):
            port = int(line.split("http://127.0.0.1:", 1)[1].split(" ", 1)[0])
            return proc, port
    proc.kill()
    raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")


def test_sigterm_finishes_the_request_in_flight(tiny_db, tiny_model):
    proc, port = _start_cli_server(tiny_db, tiny_model)
    try:
        body = json.dumps({"user": 5, "item_id": 200, "timestamp": 4_000_000_000}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock.sendall(
            f"POST /history HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10]
        )
        time.sleep(0.3)  # the request is now in flight: headers read, body half sent
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the server must wait for the request in flight"
        sock.sendall(body[10:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        sock.close()
        assert response.startswith(b"HTTP/1.1 201"), response[:200]
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert db.history(5)[-1].item_id == 200


def test_sigint_stops_an_idle_server(tiny_db, tiny_model):
    proc, port = _start_cli_server(tiny_db, tiny_model, "--cache", "5", "--prompt-cache", "3")
    try:
        status, health, _ = http(f"http://127.0.0.1:{port}/health")
        assert status == 200 and (health["cache"], health["prompt_cache"]) == (5, 3)  # the options reach it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_queued_request_whose_client_left_is_not_searched(tiny_db, tiny_model):
    """Clients that time out (and retry) used to leave their requests in the queue, each searched for nobody:
    six abandoned requests held the next one up for ~20 s on the real model."""
    from genrec_edge.recommend import Recommender

    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as rec:
        searched: list[int] = []
        real = rec.recommend_many

        def counting(requests, k=10, cancel=None):
            searched.extend(r.user for r in requests)
            return real(requests, k=k, cancel=cancel)

        rec.recommend_many = counting
        lines: list[str] = []
        with running(make_server(tiny_db, port=0, recommender=rec, log=lines.append)) as server:
            port = server.server_address[1]
            body = json.dumps({"user": 2, "k": 3}).encode()
            with rec.lock:  # the search process is busy: the requests below wait in the queue
                for _ in range(4):
                    sock = socket.create_connection(("127.0.0.1", port))
                    sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
                    time.sleep(0.1)
                    sock.close()  # the client gives up
                time.sleep(0.5)  # longer than GONE_POLL_S: each waiting request has seen its client leave
            status, answer, _ = http(server.url + "/recommend", "POST", {"user": 1, "k": 3})
            assert status == 200, answer
        statuses = [line.rsplit(" ", 1)[-1] for line in lines if '"POST /recommend' in line]
        # The first had already taken the search slot (it waited on the lock): it was stopped by its cancel
        # check once it had the lock, before its prefill; the other three never reached the search.
        assert statuses.count("499") == 4 and statuses.count("200") == 1, lines
        assert searched == [2, 1]



def test_a_client_that_left_during_its_groups_search_is_logged_499(tiny_db, tiny_model):
    """A client that disconnected while its group's search went on for the others was logged 200, as if it had
    been answered: the access log said 499 only for a client whose whole group had gone."""
    from genrec_edge.recommend import Recommender
    from genrec_edge.serve import RequestBatcher

    with Recommender.open(tiny_model, tiny_db, threads=1, batch=2, warn=lambda m: None) as rec:
        lines: list[str] = []
        with running(make_server(tiny_db, port=0, recommender=rec, log=lines.append)) as server:
            server.service._batcher = RequestBatcher(rec, wait_ms=10_000)  # the group forms once both arrived
            port = server.server_address[1]
            body = json.dumps({"user": 2, "k": 3}).encode()
            answers: list = []
            with rec.lock:  # the group's search waits for the model: both requests are in it
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(0.2)
                stays = threading.Thread(target=lambda: answers.append(
                    http(server.url + "/recommend", "POST", {"user": 1, "k": 3})[:2]))
                stays.start()
                time.sleep(0.3)
                sock.close()  # this client gives up; the other one still waits, so the search goes on
                time.sleep(0.5)  # longer than GONE_POLL_S: the server has seen it leave
            stays.join(60)
        assert answers and answers[0][0] == 200, answers
        statuses = sorted(line.rsplit(" ", 1)[-1] for line in lines if '"POST /recommend' in line)
        assert statuses == ["200", "499"], lines


def test_a_client_that_left_before_sending_its_body_is_logged_499_not_400(tiny_db):
    """Starlette's ClientDisconnect while the body was read became FastAPI's 400 "error parsing the body": the
    access log blamed a request that the client had abandoned."""
    lines: list[str] = []
    with running(make_server(tiny_db, port=0, log=lines.append)) as server:
        port = server.server_address[1]
        for path in (b"/history", b"/recommend"):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 40\r\n\r\n{\"user\": 1," % path)
            time.sleep(0.3)
            sock.close()  # the rest of the body never comes
        deadline = time.monotonic() + 10
        while len([line for line in lines if '"POST /' in line]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http(server.url + "/health")[0] == 200
    statuses = [line.rsplit(" ", 1)[-1] for line in lines if '"POST /' in line]
    assert statuses == ["499", "499"], lines


def test_a_group_whose_call_fails_retries_alone_only_the_requests_still_wanted(tiny_db, tiny_model):
    """A group's call that fails (a bad request in it) is retried request by request; a request whose client
    has gone is not searched again for nobody (ClientGone: 499), and the others still get their own answers."""
    from genrec_edge.errors import NotFoundError
    from genrec_edge.recommend import Recommender, Request
    from genrec_edge.serve import ClientGone, RequestBatcher

    with Recommender.open(tiny_model, tiny_db, threads=1, batch=3, cache=8, warn=lambda m: None) as rec:
        alone = [r.title for r in rec.recommend(user=1, k=3).items]
        rec._cache.clear()
        batcher = RequestBatcher(rec, wait_ms=10_000)  # the group forms once all three have arrived
        left = threading.Event()
        left.set()  # its client has gone; as the leader's own request, it is still in the group
        outcomes: dict[str, object] = {}

        def ask(name: str, request: Request, gone: threading.Event | None = None) -> None:
            try:
                outcomes[name] = batcher.submit(request, 3, gone)
            except Exception as exc:  # noqa: BLE001
                outcomes[name] = exc

        leader = threading.Thread(target=ask, args=("left", Request(user=2), left))
        leader.start()
        time.sleep(0.3)  # the leader waits for its group to fill
        others = [threading.Thread(target=ask, args=("stays", Request(user=1))),
                  threading.Thread(target=ask, args=("bad", Request(user=999)))]
        for t in others:
            t.start()
            time.sleep(0.05)
        for t in [leader, *others]:
            t.join(60)
        assert isinstance(outcomes["bad"], NotFoundError), outcomes
        assert [r.title for r in outcomes["stays"].items] == alone, outcomes
        assert isinstance(outcomes["left"], ClientGone), outcomes
        searched = rec.recommend_many([2, 1], k=3)
        assert [r.cached for r in searched] == [False, True], "user 2 was searched for nobody"


def test_serve_busy_timeout_bounds_the_wait_for_a_locked_database(tiny_db, tiny_model):
    """`serve` had no --busy-timeout (every other command that writes has one): a write waited a fixed 5 s."""
    proc, port = _start_cli_server(tiny_db, tiny_model, "--busy-timeout", "0.2")
    holder = sqlite3.connect(tiny_db, timeout=0.1)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        status, body, _ = http(f"http://127.0.0.1:{port}/history", "POST", {"user": 1, "item_id": 10, "timestamp": 5})
        assert status == 503 and "locked" in body["error"] and time.monotonic() - started < 2, body
    finally:
        holder.rollback()
        holder.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
