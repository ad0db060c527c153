"""The service's policy on the ASGI stack: the in-flight limit, request deadlines, keep-alive, blocking work
off the event loop, unexpected exceptions, the access log, field names, and a /health that reads no catalog.

Real servers on 127.0.0.1 (``make_server(..., port=0)`` in a thread), real SQLite.
"""

from __future__ import annotations

import http.client
import socket
import sqlite3
import threading
import time

from conftest import TINY_TITLES, cli_help_in_a_fresh_process
from test_serve import http as request
from test_serve import raw_request, running

from genrec_edge.history import HistoryDB
from genrec_edge.ingest import ingest
from genrec_edge.serve import make_server


def _half_sent_post(port: int, body: bytes) -> socket.socket:
    """A POST /history whose headers are sent and whose body is not: a request in flight."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST /history HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5]
    )
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def write_csv_dataset(folder, *, ratings: list[float] | None):
    """A generic-CSV dataset: item 9001 and one interaction with it per rating (user 500, 501, ...);
    with ``ratings=None`` one interaction and no rating column (implicit feedback)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text("item_id,title,genres\n9001,New Film (2030),Drama\n", encoding="utf-8")
    if ratings is None:
        rows = "user_id,item_id,timestamp\n500,9001,100\n"
    else:
        rows = "user_id,item_id,timestamp,rating\n" + "".join(f"{500 + n},9001,{100 + n},{r}\n" for n, r in enumerate(ratings))
    (folder / "inter.csv").write_text(rows, encoding="utf-8")
    return folder


def test_the_old_item_field_is_refused_not_guessed(tiny_db):
    with running(make_server(tiny_db, port=0)) as server:
        status, body, _ = request(server.url + "/history", "POST", {"user": 1, "item": 10})
        assert status == 400
        assert body["error"] == "unknown field(s) ['item']; allowed: ['item_id', 'rating', 'timestamp', 'title', 'user']"
        status, body, _ = request(server.url + "/users/1/history?limit=1")
        assert set(body["history"][0]) == {"item_id", "title", "year", "genres", "timestamp", "rating"}


def test_requests_beyond_the_in_flight_limit_get_503(tiny_db):
    with running(make_server(tiny_db, port=0, max_inflight=1)) as server:
        port = server.server_address[1]
        body = b'{"user": 3, "item_id": 200, "timestamp": 7}'
        held = _half_sent_post(port, body)
        time.sleep(0.3)
        status, answer, headers = request(server.url + "/health")
        assert status == 503 and answer == {"error": "server busy: too many requests in flight"}
        assert headers["Retry-After"] == "1"
        held.sendall(body[5:])
        assert _read_all(held).startswith(b"HTTP/1.1 201")
        assert request(server.url + "/health")[0] == 200  # the slot is free again


def test_a_body_that_does_not_arrive_in_time_is_408_and_a_silent_connection_is_closed(tiny_db):
    with running(make_server(tiny_db, port=0, request_timeout=0.5)) as server:
        port = server.server_address[1]
        started = time.monotonic()
        response = _read_all(_half_sent_post(port, b'{"user": 3, "item_id": 200}'))
        assert response.startswith(b"HTTP/1.1 408"), response[:100]
        assert b"request body not received within 0.5 s" in response
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert silent.recv(100) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 5
        silent.close()
        assert request(server.url + "/health")[0] == 200


def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(tiny_db):
    """After a first request, a second one's headers sent a byte at a time were waited for indefinitely."""
    with running(make_server(tiny_db, port=0, request_timeout=0.5)) as server:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or not first.rstrip().endswith(b"}"):
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":  # never the final blank line
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        if not closed:
            sock.settimeout(5)
            closed = sock.recv(100) == b""
        assert closed and time.monotonic() - started < 3
        sock.close()


def test_keep_alive_serves_several_requests_on_one_connection(tiny_db):
    with running(make_server(tiny_db, port=0)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        statuses, sockets, seconds = [], set(), []
        for _ in range(9):
            started = time.perf_counter()
            conn.request("GET", "/users/1/history?limit=2")
            resp = conn.getresponse()
            resp.read()
            seconds.append(time.perf_counter() - started)
            statuses.append(resp.status)
            sockets.add(id(conn.sock))
        conn.close()
        assert statuses == [200] * 9 and len(sockets) == 1
        # Without TCP_NODELAY on the server's sockets every keep-alive response waits >= 40 ms (Nagle vs
        # delayed ACK); a request takes a few ms here.
        assert sorted(seconds)[4] < 0.035, seconds


def test_blocking_work_does_not_block_the_event_loop(tiny_db):
    """A POST waiting for SQLite's lock (in a worker thread) leaves /health answering at once."""
    with running(make_server(tiny_db, port=0, busy_timeout=5.0)) as server:
        holder = sqlite3.connect(tiny_db, timeout=0.1)
        holder.execute("BEGIN IMMEDIATE")
        results: list = []
        writer = threading.Thread(target=lambda: results.append(
            request(server.url + "/history", "POST", {"user": 2, "item_id": 10, "timestamp": 9})))
        writer.start()
        try:
            time.sleep(0.3)
            started = time.monotonic()
            assert request(server.url + "/health")[0] == 200
            assert time.monotonic() - started < 1.0
            assert writer.is_alive(), "the write must still be waiting for the lock"
        finally:
            holder.rollback()
            holder.close()
        writer.join(10)
        assert results[0][0] == 201, results
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert db.history(2)[0].item_id == 10


class _BrokenRecommender:
    """Stands in for a bug: raises what no route expects."""

    def recommend(self, **_):
        raise ZeroDivisionError("boom")

    def recommend_many(self, *_, **__):  # what the service calls (requests gathered into groups)
        raise ZeroDivisionError("boom")


def test_an_unexpected_exception_is_one_line_and_the_log_keeps_no_secret(tiny_db):
    lines: list[str] = []
    with running(make_server(tiny_db, port=0, recommender=_BrokenRecommender(), token="s3cret",
                             log=lines.append)) as server:
        auth = {"Authorization": "Bearer s3cret"}
        status, body, _ = request(server.url + "/recommend", "POST", {"user": 1, "k": 3}, auth)
        assert status == 500 and body == {"error": "internal error (ZeroDivisionError)"}
        assert request(server.url + "/health")[0] == 200  # still serving
        assert raw_request(server.server_address[1], b"GARBAGE\r\n\r\n")[0] == 400
    log = "\n".join(lines)
    assert "internal error on POST /recommend: ZeroDivisionError: boom" in log
    assert '127.0.0.1 "POST /recommend HTTP/1.1" 500' in log
    assert '127.0.0.1 "GET /health HTTP/1.1" 200' in log
    assert "Traceback" not in log and "s3cret" not in log


def test_health_counts_without_reading_the_catalog_and_sees_an_ingest(tiny_db, tmp_path, monkeypatch):
    def no_catalog(self):
        raise AssertionError("/health must not read and hash the catalog")

    with running(make_server(tiny_db, port=0)) as server:
        monkeypatch.setattr(HistoryDB, "catalog", no_catalog)
        status, body, _ = request(server.url + "/health")
        assert status == 200 and body["db"]["items"] == len(TINY_TITLES)
        # Items change only by an ingest (here while serving, as another process could): seen at once.
        folder = write_csv_dataset(tmp_path / "more", ratings=[4.0])
        ingest(tiny_db, "csv", folder, interactions="inter.csv", items="items.csv", progress=False)
        status, body, _ = request(server.url + "/health")
        assert body["db"]["items"] == len(TINY_TITLES) + 1
        assert body["db"]["users"] == 10  # 8 users, the empty one, and the ingested user 500


def test_head_only_on_health_and_no_cors_preflight(tiny_db):
    with running(make_server(tiny_db, port=0)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("HEAD", "/health")  # for probes that send HEAD
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        conn.request("HEAD", "/users/1/history")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "GET"
        assert resp.read() == b""
        conn.close()
        status, body, headers = request(server.url + "/recommend", "OPTIONS",
                                        headers={"Origin": "http://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
        assert status == 405 and not any(h.lower().startswith("access-control-") for h in headers)


def test_the_cli_imports_the_web_stack_only_to_serve():
    _, imported = cli_help_in_a_fresh_process([["--help"], ["serve", "--help"]],
                                              {"fastapi", "uvicorn", "starlette", "llama_cpp"})
    assert imported == []
