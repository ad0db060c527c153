"""A small JSON HTTP API over the Recommender, for apps that are not written in Python.

Built on the standard library (``http.server.ThreadingHTTPServer``): one thread per request, HTTP/1.0
(one request per connection, so shutdown never waits on an idle keep-alive socket).

Routes (described in OpenAPI 3 by :func:`openapi_spec`, served at ``GET /openapi.json`` and saved as
``docs/openapi.json``)::

    GET  /health                    liveness + what is loaded
    GET  /openapi.json              this API's description
    GET  /users/{user}/history      a user's history, oldest first (?limit=N keeps the last N)
    POST /recommend                 {"user": 42, "k": 10} or {"history": ["title", ...], "k": 10}
    POST /history                   {"user": 42, "item": 1 | "title": "...", "rating"?: 4.5, "timestamp"?: 0}

Safety for a service that runs for weeks next to a user's data:

* bound to loopback unless ``allow_remote``; the ``Host`` header must name a loopback host (stops DNS
  rebinding from a web page) unless ``allow_remote``;
* POST bodies must be ``application/json`` (a browser cannot send that cross-origin without a CORS
  preflight, which this server never grants), at most ``max_body`` bytes (413), with a Content-Length (411);
* optional bearer token (``token``) on every route but ``/health``;
* every :class:`~genrec_edge.errors.GenrecError` becomes a 4xx/5xx with ``{"error": "..."}``; any other
  exception becomes a 500 with a one-line message, never a traceback;
* at most ``max_inflight`` requests are served at once (503 beyond);
* SIGTERM/SIGINT stop accepting connections and finish the requests in flight (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import math
import re
import signal
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .errors import (
    CatalogMismatchError,
    CorruptModelError,
    DatabaseError,
    DatabaseUnavailableError,
    EmptyHistoryError,
    GenrecError,
    GrammarError,
    IngestError,
    NotFoundError,
    UsageError,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY = 64 * 1024
MAX_K = 100
DEFAULT_K = 10
MAX_HISTORY_TITLES = 1000
MAX_TITLE_CHARS = 2000
MAX_INFLIGHT = 16
MAX_ID = 2**63 - 1
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request


class HTTPError(Exception):
    """A response other than 200, raised inside a route."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


# ------------------------------------------------------------------------------------------ errors → HTTP
def status_for(exc: GenrecError) -> int:
    """The HTTP status for one of our errors: the client's fault → 4xx, the server's state → 5xx."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (UsageError, IngestError)):
        return 400
    if isinstance(exc, EmptyHistoryError):
        return 422
    if isinstance(exc, DatabaseError):
        # Locked (another writer past the busy timeout) and read-only are conditions that pass or that an
        # operator fixes: 503 tells a client to retry later. A corrupt or missing file is a 500.
        if isinstance(exc, DatabaseUnavailableError):
            return 503
        return 500
    if isinstance(exc, (CorruptModelError, CatalogMismatchError, GrammarError)):
        return 500
    return 400


# ------------------------------------------------------------------------------------------ validation
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object (strict JSON: no NaN, no Infinity)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "request body is not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    except ValueError as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"request body must be a JSON object, not {type(data).__name__}")
    return data


def _require_keys(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _int_field(data: dict[str, Any], name: str, *, low: int = 0, high: int = MAX_ID) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"{name} must be an integer, not {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high}, not {value}")
    return value


def _title_field(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string, not {json.dumps(value)[:40]}")
    if not value:
        raise HTTPError(400, f"{name} must not be empty")
    if len(value) > MAX_TITLE_CHARS:
        raise HTTPError(400, f"{name} is longer than {MAX_TITLE_CHARS} characters")
    return value


def _k_field(data: dict[str, Any], max_k: int) -> int:
    if "k" not in data:
        return min(DEFAULT_K, max_k)
    value = data["k"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_k:
        raise HTTPError(400, f"k must be an integer between 1 and {max_k}, not {json.dumps(value)[:40]}")
    return value


# ------------------------------------------------------------------------------------------ JSON views
def interaction_json(row: Any) -> dict[str, Any]:
    return {
        "item": row.item_id,
        "title": row.title,
        "year": row.year,
        "genres": list(row.genres),
        "timestamp": row.timestamp,
        "rating": row.rating,
    }


def recommendations_json(recs: Any) -> dict[str, Any]:
    items = [
        {
            "rank": r.rank,
            "item_ids": list(r.item_ids),
            "title": r.title,
            "year": r.year,
            "genres": list(r.genres),
            "score": r.score if r.score is None or math.isfinite(r.score) else None,
        }
        for r in recs.items
    ]
    timings = dataclasses.asdict(recs.timings) if dataclasses.is_dataclass(recs.timings) else {}
    return {"items": items, "timings": timings}


# ------------------------------------------------------------------------------------------ the service
@dataclasses.dataclass
class Service:
    """The routes, independent of HTTP transport: ``handle(method, target, body) -> (status, json)``.

    ``recommender`` is a :class:`~genrec_edge.recommend.Recommender` (thread-safe) or None, in which
    case ``/recommend`` answers 503. The database is opened per request (SQLite connections belong to
    one thread, and ThreadingHTTPServer makes one thread per request); opening is a few file reads.
    """

    db: Path
    recommender: Any = None
    model: Path | None = None
    max_k: int = MAX_K
    busy_timeout: float = 5.0

    def handle(self, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
        try:
            return self._dispatch(method, target, body)
        except HTTPError as exc:
            return exc.status, {"error": str(exc)}
        except GenrecError as exc:
            return status_for(exc), {"error": str(exc)}

    def _dispatch(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        path = parts.path
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if method != route.method:
                allowed = sorted(r.method for r in ROUTES if r.pattern.fullmatch(path))
                raise HTTPError(405, f"{method} is not allowed on {path}", {"Allow": ", ".join(allowed)})
            handler = getattr(self, route.handler)
            return handler(match=match, query=parse_qs(parts.query, keep_blank_values=True), body=body)
        raise HTTPError(404, f"no route {path}")

    def _open_db(self, *, readonly: bool):
        from .history import HistoryDB

        return HistoryDB.open(self.db, readonly=readonly, busy_timeout=self.busy_timeout)

    # ---- routes
    def health(self, **_: Any) -> tuple[int, Any]:
        with self._open_db(readonly=True) as db:
            users = len(db.users())
            items = len(db.catalog())
            schema = db.schema_version()
        return 200, {
            "status": "ok",
            "version": __version__,
            "model": str(self.model) if self.model else None,
            "recommend": self.recommender is not None,
            "db": {"path": str(self.db), "schema_version": schema, "users": users, "items": items},
        }

    def openapi(self, **_: Any) -> tuple[int, Any]:
        return 200, openapi_spec()

    def user_history(self, *, match: re.Match, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        user = int(match.group("user"))
        if user > MAX_ID:
            raise HTTPError(400, f"user must be between 0 and {MAX_ID}")
        limit = None
        unknown = sorted(set(query) - {"limit"})
        if unknown:
            raise HTTPError(400, f"unknown query parameter(s) {unknown}; allowed: ['limit']")
        if "limit" in query:
            raw = query["limit"][-1]
            if not raw.isdigit() or not 0 <= int(raw) <= 1_000_000:
                raise HTTPError(400, f"limit must be an integer between 0 and 1000000, not {raw[:40]!r}")
            limit = int(raw)
        with self._open_db(readonly=True) as db:
            rows = db.history(user, limit)
        return 200, {"user": user, "history": [interaction_json(r) for r in rows]}

    def recommend(self, *, body: bytes, **_: Any) -> tuple[int, Any]:
        data = parse_json_object(body)
        _require_keys(data, {"user", "history", "k"})
        k = _k_field(data, self.max_k)
        if ("user" in data) == ("history" in data):
            raise HTTPError(400, 'give exactly one of "user" or "history"')
        if self.recommender is None:
            raise HTTPError(503, "no model loaded: start the server with --model")
        if "user" in data:
            user = _int_field(data, "user")
            recs = self.recommender.recommend(user=user, k=k)
        else:
            history = data["history"]
            if not isinstance(history, list):
                raise HTTPError(400, "history must be a list of titles")
            if not history:
                raise HTTPError(400, "history must not be empty")
            if len(history) > MAX_HISTORY_TITLES:
                raise HTTPError(400, f"history has more than {MAX_HISTORY_TITLES} titles")
            titles = [_title_field(t, f"history[{i}]") for i, t in enumerate(history)]
            recs = self.recommender.recommend(history=titles, k=k)
        return 200, recommendations_json(recs)

    def add_history(self, *, body: bytes, **_: Any) -> tuple[int, Any]:
        data = parse_json_object(body)
        _require_keys(data, {"user", "item", "title", "rating", "timestamp"})
        if "user" not in data:
            raise HTTPError(400, 'missing field "user"')
        user = _int_field(data, "user")
        if ("item" in data) == ("title" in data):
            raise HTTPError(400, 'give exactly one of "item" or "title"')
        rating = data.get("rating")
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating)
        ):
            raise HTTPError(400, f"rating must be a number or null, not {json.dumps(rating)[:40]}")
        timestamp = _int_field(data, "timestamp", low=-MAX_ID) if data.get("timestamp") is not None else None
        with self._open_db(readonly=False) as db:
            if "item" in data:
                item = _int_field(data, "item")
            else:
                title = _title_field(data["title"], "title")
                matches = db.item_by_title(title)
                if not matches:
                    raise NotFoundError(f"unknown title {title!r}")
                if len(matches) > 1:
                    ids = [m.id for m in matches]
                    raise HTTPError(409, f"title {title!r} matches items {ids}: give \"item\" instead")
                item = matches[0].id
            row = db.add_interaction(user, item, timestamp=timestamp, rating=rating)
        return 201, {"user": user, **interaction_json(row)}


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    template: str  # OpenAPI path template
    handler: str

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        """``/users/{user}/history`` -> ``/users/(?P<user>[0-9]{1,19})/history``."""
        pieces = re.split(r"(\{\w+\})", self.template)
        return re.compile(
            "".join(f"(?P<{p[1:-1]}>[0-9]{{1,19}})" if p.startswith("{") else re.escape(p) for p in pieces)
        )


ROUTES = (
    Route("GET", "/health", "health"),
    Route("GET", "/openapi.json", "openapi"),
    Route("GET", "/users/{user}/history", "user_history"),
    Route("POST", "/recommend", "recommend"),
    Route("POST", "/history", "add_history"),
)


# ------------------------------------------------------------------------------------------ OpenAPI
def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.0 description of every route (also saved as ``docs/openapi.json``)."""
    error = {"$ref": "#/components/schemas/Error"}

    def err(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": error}}}

    def ok(description: str, ref: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}

    common = {
        "400": err("Bad input (malformed JSON, unknown field, wrong type, k out of range)."),
        "401": err("Missing or wrong bearer token (only when the server has one)."),
        "503": err("Database locked by another writer past the busy timeout, read-only, or server busy."),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "genrec-edge local service",
            "version": __version__,
            "description": "JSON API over genrec-edge's catalog-constrained LLM recommender. "
            "Bound to 127.0.0.1 by default. Errors are {\"error\": \"one line\"}.",
        },
        "servers": [{"url": f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"}],
        "paths": {
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness, version, what is loaded, database counts.",
                    "responses": {"200": ok("Service is up.", "#/components/schemas/Health"), "503": common["503"]},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This OpenAPI description.",
                    "responses": {"200": {"description": "OpenAPI 3 document.", "content": {"application/json": {}}}},
                }
            },
            "/users/{user}/history": {
                "get": {
                    "operationId": "userHistory",
                    "summary": "A user's interactions, oldest first.",
                    "parameters": [
                        {"name": "user", "in": "path", "required": True,
                         "schema": {"type": "integer", "minimum": 0, "format": "int64"}},
                        {"name": "limit", "in": "query", "required": False,
                         "description": "Keep only the last N interactions.",
                         "schema": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                    ],
                    "responses": {
                        "200": ok("The history.", "#/components/schemas/History"),
                        **common,
                        "404": err("Unknown user."),
                    },
                }
            },
            "/recommend": {
                "post": {
                    "operationId": "recommend",
                    "summary": "Top-k catalog items for a user id or for a list of titles.",
                    "description": "Items the user has already seen are excluded. Titles in a history "
                    "must be exact catalog titles.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RecommendRequest"}}},
                    },
                    "responses": {
                        "200": ok("Recommendations, best first.", "#/components/schemas/Recommendations"),
                        **common,
                        "404": err("Unknown user or title."),
                        "411": err("Missing Content-Length."),
                        "413": err(f"Body larger than {MAX_BODY} bytes."),
                        "415": err("Content-Type is not application/json."),
                        "422": err("The user has no history to recommend from."),
                    },
                }
            },
            "/history": {
                "post": {
                    "operationId": "addHistory",
                    "summary": "Record that a user interacted with an item (by id or exact title).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HistoryAdd"}}},
                    },
                    "responses": {
                        "201": ok("The stored interaction.", "#/components/schemas/StoredInteraction"),
                        **common,
                        "404": err("Unknown item or title."),
                        "409": err("The title matches several items: give the item id."),
                        "411": err("Missing Content-Length."),
                        "413": err(f"Body larger than {MAX_BODY} bytes."),
                        "415": err("Content-Type is not application/json."),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Health": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": ["ok"]},
                        "version": {"type": "string"},
                        "model": {"type": "string", "nullable": True},
                        "recommend": {"type": "boolean"},
                        "db": {"type": "object"},
                    },
                },
                "RecommendRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "user": {"type": "integer", "minimum": 0, "format": "int64"},
                        "history": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_HISTORY_TITLES,
                            "items": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS},
                        },
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
                    },
                    "oneOf": [{"required": ["user"]}, {"required": ["history"]}],
                },
                "Recommendation": {
                    "type": "object",
                    "properties": {
                        "rank": {"type": "integer"},
                        "item_ids": {"type": "array", "items": {"type": "integer"},
                                     "description": "The ids of the items with this title."},
                        "title": {"type": "string"},
                        "year": {"type": "integer", "nullable": True},
                        "genres": {"type": "array", "items": {"type": "string"}},
                        "score": {"type": "number", "nullable": True},
                    },
                },
                "Recommendations": {
                    "type": "object",
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Recommendation"}},
                        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
                    },
                },
                "Interaction": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "integer"},
                        "title": {"type": "string"},
                        "year": {"type": "integer", "nullable": True},
                        "genres": {"type": "array", "items": {"type": "string"}},
                        "timestamp": {"type": "integer"},
                        "rating": {"type": "number", "nullable": True},
                    },
                },
                "StoredInteraction": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Interaction"},
                        {"type": "object", "properties": {"user": {"type": "integer"}}},
                    ]
                },
                "History": {
                    "type": "object",
                    "properties": {
                        "user": {"type": "integer"},
                        "history": {"type": "array", "items": {"$ref": "#/components/schemas/Interaction"}},
                    },
                },
                "HistoryAdd": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["user"],
                    "properties": {
                        "user": {"type": "integer", "minimum": 0, "format": "int64"},
                        "item": {"type": "integer", "minimum": 0, "format": "int64"},
                        "title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS},
                        "rating": {"type": "number", "nullable": True},
                        "timestamp": {"type": "integer", "format": "int64",
                                      "description": "Unix seconds; default now."},
                    },
                    "oneOf": [{"required": ["item"]}, {"required": ["title"]}],
                },
            },
        },
    }


def openapi_text() -> str:
    """``docs/openapi.json``'s exact content."""
    return json.dumps(openapi_spec(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------ HTTP transport
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_header_ok(header: str | None) -> bool:
    """Does a request's Host header name a loopback host? (DNS-rebinding guard.)"""
    if not header:
        return False
    host = header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host.lower())


class _Handler(BaseHTTPRequestHandler):
    server: GenrecHTTPServer
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # answer even a garbled request line with a status line + JSON
    server_version = f"genrec-edge/{__version__}"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve("PATCH")

    def do_OPTIONS(self) -> None:  # noqa: N802 (no CORS: answer a preflight with 405 and no Allow-Origin)
        self._send(405, {"error": "cross-origin requests are not allowed"})

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(405, {"error": "HEAD is not supported"}, body=False)

    def _serve(self, method: str) -> None:
        server = self.server
        if not server.inflight.acquire(blocking=False):
            self._send(503, {"error": "server busy: too many requests in flight"}, {"Retry-After": "1"})
            return
        try:
            status, payload, headers = self._respond(method)
        except Exception as exc:  # a bug: one line on the server's log, a 500 with no traceback to the client
            server.log(f"internal error on {method} {self.path}: {type(exc).__name__}: {exc}")
            status, payload, headers = 500, {"error": f"internal error ({type(exc).__name__})"}, {}
        finally:
            server.inflight.release()
        self._send(status, payload, headers)

    def _respond(self, method: str) -> tuple[int, Any, dict[str, str]]:
        server = self.server
        if not server.allow_remote and not _host_header_ok(self.headers.get("Host")):
            return 403, {"error": "Host header must name a loopback address (127.0.0.1, localhost, [::1])"}, {}
        if server.token is not None and urlsplit(self.path).path != "/health":
            given = self.headers.get("Authorization", "")
            expected = f"Bearer {server.token}"
            if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
                return 401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"}
        body = b""
        if method in ("POST", "PUT", "PATCH"):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return 411, {"error": "chunked bodies are not supported: send a Content-Length"}, {}
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                return 411, {"error": "Content-Length is required"}, {}
            if not raw_length.strip().isdigit():
                return 400, {"error": f"bad Content-Length {raw_length[:40]!r}"}, {}
            length = int(raw_length)
            if length > server.max_body:
                return 413, {"error": f"request body is {length} bytes, the limit is {server.max_body}"}, {}
            content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if content_type != "application/json":
                return 415, {"error": "Content-Type must be application/json"}, {}
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                return 408, {"error": f"request body not received within {REQUEST_TIMEOUT:g} s"}, {}
            if len(body) < length:
                return 400, {"error": f"request body ended after {len(body)} of {length} bytes"}, {}
        try:
            status, payload = server.service.handle(method, self.path, body)
        except HTTPError as exc:  # pragma: no cover - handle() already maps these
            return exc.status, {"error": str(exc)}, exc.headers
        headers = {"Retry-After": "1"} if status == 503 else {}
        if status == 405:
            allowed = sorted(r.method for r in ROUTES if r.pattern.fullmatch(urlsplit(self.path).path))
            headers["Allow"] = ", ".join(allowed)
        return status, payload, headers

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None, body: bool = True) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (malformed request line, header too long, ...) as JSON too.
        self.close_connection = True
        self._send(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        self.server.log(f"{self.address_string()} {format % args}")


class GenrecHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose ``server_close()`` waits for the requests in flight."""

    daemon_threads = False  # server_close() joins the request threads: in-flight requests finish
    block_on_close = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        service: Service,
        *,
        allow_remote: bool = False,
        token: str | None = None,
        max_body: int = MAX_BODY,
        max_inflight: int = MAX_INFLIGHT,
        log: Callable[[str], None] | None = None,
        owns_recommender: bool = False,
    ):
        self.service = service
        self.allow_remote = allow_remote
        self.token = token
        self.max_body = max_body
        self.inflight = threading.BoundedSemaphore(max_inflight)
        self._log = log
        self._owns_recommender = owns_recommender
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def log(self, line: str) -> None:
        if self._log is not None:
            self._log(line)

    def server_close(self) -> None:
        super().server_close()  # joins request threads (block_on_close)
        if self._owns_recommender and self.service.recommender is not None:
            with contextlib.suppress(Exception):
                self.service.recommender.close()
            self.service.recommender = None


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote``."""
    if not is_loopback(host) and not allow_remote:
        raise UsageError(
            f"refusing to listen on {host}: the API has no TLS and trusts every client; "
            "pass --allow-remote to expose it to your network"
        )


def make_server(
    db: str | Path,
    model: str | Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int | None = None,
    beam: int | None = None,
    recommender: Any = None,
    allow_remote: bool = False,
    token: str | None = None,
    max_body: int = MAX_BODY,
    max_k: int = MAX_K,
    max_inflight: int = MAX_INFLIGHT,
    busy_timeout: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> GenrecHTTPServer:
    """A bound, not yet serving, server (``port=0`` picks a free port: see ``server.url``).

    Opens the database once to fail fast on a bad file, then ``Recommender.open(model, db)`` unless a
    ``recommender`` is given (the server then does not close it). Call ``serve_forever()`` and, when
    done, ``shutdown()`` + ``server_close()``.
    """
    from .history import HistoryDB, _is_read_only_file

    check_host(host, allow_remote)
    if not 1 <= max_k <= 10_000:
        raise UsageError(f"max_k must be between 1 and 10000, not {max_k}")
    db = Path(db)
    # Missing / not SQLite / newer schema: refuse to start. A read-only file still serves reads (POST
    # /history then answers 503 "read-only").
    readonly = db.is_file() and _is_read_only_file(db)
    with HistoryDB.open(db, readonly=readonly, busy_timeout=busy_timeout):
        pass
    owns = False
    if recommender is None and model is not None:
        from .recommend import Recommender

        recommender = Recommender.open(model, db, threads=threads, beam=beam)
        owns = True
    service = Service(db=db, recommender=recommender, model=Path(model) if model else None,
                      max_k=max_k, busy_timeout=busy_timeout)
    try:
        return GenrecHTTPServer(
            (host, port), service, allow_remote=allow_remote, token=token, max_body=max_body,
            max_inflight=max_inflight, log=log, owns_recommender=owns,
        )
    except OSError as exc:
        if owns:
            recommender.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    db: str | Path,
    model: str | Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int | None = None,
    beam: int | None = None,
    allow_remote: bool = False,
    token: str | None = None,
    log: Callable[[str], None] | None = None,
    ready: Callable[[GenrecHTTPServer], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return.

    Must run in the main thread (it installs the signal handlers, restoring the previous ones on return).
    """
    server = make_server(db, model, host=host, port=port, threads=threads, beam=beam,
                         allow_remote=allow_remote, token=token, log=log)
    stopping = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            # shutdown() waits for serve_forever() to return, which runs in this very thread: ask from another.
            threading.Thread(target=server.shutdown, name="genrec-shutdown", daemon=True).start()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(server)
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()  # waits for in-flight requests, then closes the model


def write_openapi(path: str | Path) -> Path:
    """Save :func:`openapi_text` (what ``docs/openapi.json`` must equal)."""
    path = Path(path)
    path.write_text(openapi_text(), encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m genrec_edge.serve docs/openapi.json
    print(write_openapi(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json"))
