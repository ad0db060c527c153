"""A small JSON HTTP API over the Recommender, for apps that are not written in Python.

FastAPI (routing, request models, the OpenAPI document) on uvicorn (asyncio, h11). What is ours: the
request and response models, the handlers (:class:`Service`), and the policy for a service that runs for
weeks next to a user's data (:class:`_Guard`, one middleware):

* bound to loopback unless ``allow_remote``; the ``Host`` header must name a loopback host (stops DNS
  rebinding from a web page) unless ``allow_remote``;
* POST bodies must be ``application/json`` (a browser cannot send that cross-origin without a CORS
  preflight, which this server never grants), at most ``max_body`` bytes (413), with a Content-Length
  (411), strict JSON (no NaN, UTF-8, one object), received within ``request_timeout`` seconds (408);
* optional bearer token (``token``) on every route but ``/health``;
* every :class:`~genrec_edge.errors.GenrecError` becomes a 4xx/5xx with ``{"error": "..."}``, a request
  that fails validation a 400 with one line; any other exception becomes a 500 with a one-line message,
  never a traceback;
* at most ``max_inflight`` requests are served at once (503 beyond);
* SIGTERM/SIGINT stop accepting connections and finish the requests in flight (:func:`serve`).

``workers=N`` (≥ 1; ``genrec-edge serve`` uses 1) searches in N processes, each with its own model
(:class:`~genrec_edge.pool.RecommenderPool`), while this process keeps the HTTP side: concurrent /recommend
requests are answered up to N at a time, each by a free worker; a lone request still gets every core, and
a worker that crashes costs one 503, not the service (bench/results/serve-workers-2026-12-02.md: 1.19x
and, with 2 workers, 1.49x the users/s of a busy service on 2 cores). ``workers=0`` (the default here: a
script that spawns processes needs an ``if __name__ == "__main__"`` guard) searches in this process.

The routes are plain ``def`` functions: FastAPI runs them in its threadpool, so SQLite and llama.cpp never
block the event loop. Routes (``GET /openapi.json``, also saved as ``docs/openapi.json``)::

    GET  /health                    liveness + what is loaded
    GET  /openapi.json              this API's description
    GET  /users/{user}/history      a user's history, oldest first (?limit=N keeps the last N)
    GET  /items?search=TEXT         catalog items whose title contains TEXT (?limit=N, default 20): their ids
    POST /recommend                 {"user": 42, "k": 10} or {"history": ["title", ...], "k": 10}
    POST /history                   {"user": 42, "item_id": 1 | "title": "...", "rating"?: 4.5, "timestamp"?: 0}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import parse_qsl

import anyio
import h11
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import __version__
from .errors import (
    CatalogMismatchError,
    CorruptModelError,
    DatabaseError,
    DatabaseUnavailableError,
    EmptyHistoryError,
    EngineError,
    GenrecError,
    GrammarError,
    IngestError,
    NotFoundError,
    SearchCancelled,
    UsageError,
    WorkerLostError,
)
from .history import MAX_SEARCH_CHARS
from .recommend import DEFAULT_K, MAX_K, MAX_PRIOR_WEIGHT

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY = 64 * 1024
MAX_HISTORY_TITLES = 1000
MAX_ITEMS_LIMIT = 1000  # GET /items?limit=
MAX_FILTER_IDS = 10_000  # "exclude" / "only" item ids each; the 64 KiB body bounds both: ~8,000 six-digit ids in all
MAX_TITLE_CHARS = 2000
MAX_LIMIT = 1_000_000
MAX_INFLIGHT = 16
BATCH_WAIT_MS = 10.0  # how long a /recommend request waits for others to share its search
GONE_POLL_S = 0.1  # how often a queued /recommend request looks whether its client is still there
CLIENT_GONE = 499  # the access log's status for a request whose client left before its search (nginx's)
MIN_ID, MAX_ID = -(2**63), 2**63 - 1  # SQLite INTEGER, as the history database stores ids and times
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request, and then its body


class HTTPError(HTTPException):
    """A response other than 2xx, raised inside a route: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)


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
    if isinstance(exc, WorkerLostError):  # replaced already: a retry is answered
        return 503
    if isinstance(exc, (CorruptModelError, CatalogMismatchError, GrammarError, EngineError)):
        return 500
    return 400


# ------------------------------------------------------------------------------------------ request bodies
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {_shown(repeated)} appears twice (which one would count?)")
    return dict(pairs)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object (strict JSON: no NaN, no Infinity)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "request body is not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    except ValueError as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
                 list: "an array"}
        raise HTTPError(400, f"request body must be a JSON object, not {kinds.get(type(data), type(data).__name__)}")
    return data


def _utf8_safe(text: str) -> str:
    """``text`` with any lone surrogate (``"\\ud800"`` in a request's JSON) escaped: it has no UTF-8 form, so
    neither pydantic-core nor a JSON response could carry it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _shown(value: Any) -> str:
    return _utf8_safe(json.dumps(value, ensure_ascii=False, default=str)[:40])


_DECIMAL = re.compile(r"-?[0-9]+")  # a whole number as a path or query string gives it (ASCII digits only)


def _bounded_int(low: int, high: int, *, message: str | None = None, from_text: bool = False) -> Any:
    """An int in ``[low, high]`` (never a bool, float or numeric string unless ``from_text``, for query
    strings), failing with our wording; the bounds also go into the schema."""

    def check(value: Any) -> int:  # the message is ours; pydantic's bound check after it never fails
        if from_text and isinstance(value, str) and _DECIMAL.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PydanticCustomError("int_type", message or "must be an integer, not {value}", {"value": _shown(value)})
        if not low <= value <= high:
            raise PydanticCustomError(
                "int_range", message or "must be between {low} and {high}, not {value}",
                {"low": low, "high": high, "value": _shown(value)},
            )
        return value

    # The schema names the bounds; int64's own limits as "format" (FastAPI writes bounds as floats).
    schema: dict[str, Any] = {"format": "int64"} if high == MAX_ID else {}
    bounds = {"ge": low} if low > MIN_ID else {}
    if high < MAX_ID:
        bounds["le"] = high
    return Annotated[int, Field(json_schema_extra=schema or None, **bounds), BeforeValidator(check)]


Id = _bounded_int(MIN_ID, MAX_ID)  # any id the database can hold, as the CLI and ingest take them
PathId = _bounded_int(MIN_ID, MAX_ID, from_text=True)
K = _bounded_int(1, MAX_K, message=f"must be an integer between 1 and {MAX_K}, not {{value}}")
Timestamp = _bounded_int(MIN_ID, MAX_ID)
Limit = _bounded_int(0, MAX_LIMIT, message=f"must be an integer between 0 and {MAX_LIMIT}, not {{value}}", from_text=True)
Title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]
ItemsLimit = _bounded_int(1, MAX_ITEMS_LIMIT, message=f"must be an integer between 1 and {MAX_ITEMS_LIMIT}, not "
                          "{value}", from_text=True)


def _schema(one_of: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], None]:
    """A request model's JSON schema: exactly one of ``one_of``; optional fields that may not be null
    (give one or leave it out) have no ``"default": null``."""

    def amend(schema: dict[str, Any]) -> None:
        for prop in schema.get("properties", {}).values():
            if "default" in prop and prop["default"] is None and "anyOf" not in prop:
                del prop["default"]
        if one_of:
            schema["oneOf"] = [{"required": [name]} for name in one_of]

    return amend


class _Request(BaseModel):
    """A request's fields: strict types (no "1" for 1), unknown names refused with the allowed ones."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_schema())
    names: ClassVar[str] = "field(s)"

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise PydanticCustomError(
                    "unknown_field", "unknown {names} {unknown}; allowed: {allowed}",
                    {"names": cls.names, "unknown": str(unknown), "allowed": str(sorted(cls.model_fields))},
                )
        return data


class RecommendRequest(_Request):
    model_config = ConfigDict(json_schema_extra=_schema(one_of=("user", "history")))

    user: Id = Field(None, description="A user in the database.")
    history: Annotated[list[Title], Field(min_length=1, max_length=MAX_HISTORY_TITLES)] = Field(
        None, description="Exact catalog titles, oldest first: an ad-hoc user."
    )
    k: K = DEFAULT_K
    prior: Literal["none", "pop", "sasrec"] | None = Field(
        None, description="Collaborative prior fused into the search (default: the model's own; none: the LLM alone)."
    )
    prior_weight: Annotated[float, Field(ge=0, le=MAX_PRIOR_WEIGHT, allow_inf_nan=False)] | None = Field(
        None, description="λ in log P_LM + λ·log P_CF (default: the weight tuned for the model's prior)."
    )
    exclude: Annotated[list[Id], Field(max_length=MAX_FILTER_IDS)] | None = Field(
        None, description="Item ids not to recommend, besides the history's (a cart, items shown before)."
    )
    only: Annotated[list[Id], Field(max_length=MAX_FILTER_IDS)] | None = Field(
        None, description="Recommend from these item ids alone (default: the whole catalog)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if (self.user is None) == (self.history is None):
            raise PydanticCustomError("one_of", 'give exactly one of "user" or "history"')
        return self


class HistoryAdd(_Request):
    model_config = ConfigDict(json_schema_extra=_schema(one_of=("item_id", "title")))

    user: Id = Field(description="Created if new.")
    item_id: Id = None
    title: Title = Field(None, description="Exact catalog title (instead of item_id).")
    rating: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="Within the range of the ratings the database holds (MovieLens: 0.5 to 5)."
    )
    timestamp: Timestamp | None = Field(None, description="Unix seconds; default now.")

    @model_validator(mode="after")
    def _one_item(self) -> HistoryAdd:
        if (self.item_id is None) == (self.title is None):
            raise PydanticCustomError("one_of", 'give exactly one of "item_id" or "title"')
        return self


class HistoryQuery(_Request):
    names: ClassVar[str] = "query parameter(s)"

    limit: Limit = Field(None, description="Keep only the last N interactions.")


class ItemsQuery(_Request):
    names: ClassVar[str] = "query parameter(s)"

    search: Annotated[str, Field(min_length=1, max_length=MAX_SEARCH_CHARS)] = Field(
        description="Part of a title, in any case."
    )
    limit: ItemsLimit = Field(20, description="At most this many items.")


# pydantic's own error types, worded like ours ({value} is the input, the rest comes from the error's ctx)
_WORDING = {
    "string_type": "must be a string, not {value}",
    "string_too_short": "must not be empty",
    "string_too_long": "is longer than {max_length} characters",
    "list_type": "must be a list, not {value}",
    "too_short": "must not be empty",
    "too_long": "has more than {max_length} entries",
    "float_type": "must be a number or null, not {value}",
    "finite_number": "must be a finite number",
    "literal_error": "must be one of {expected}, not {value}",
    "greater_than_equal": "must be >= {ge}, not {value}",
    "less_than_equal": "must be <= {le}, not {value}",
}


def validation_message(errors: list[dict[str, Any]]) -> str:
    """The first validation error as one line: ``user must be an integer, not "1"``."""
    error = errors[0]
    loc = list(error["loc"])
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    if error["type"] == "missing":
        return f'missing field "{name}"' if name else "request body must be a JSON object"
    try:
        text = _WORDING[error["type"]].format(value=_shown(error.get("input")), **error.get("ctx", {}))
    except KeyError:  # ours (already worded), or one we have no wording for
        text = error["msg"]
    return f"{name} {text}" if name else text


# ------------------------------------------------------------------------------------------ responses
class Error(BaseModel):
    error: str = Field(description="One line.")


class Interaction(BaseModel):
    item_id: int
    title: str
    year: int | None
    genres: list[str]
    timestamp: int
    rating: float | None

    @classmethod
    def of(cls, row: Any) -> Interaction:
        return cls(item_id=row.item_id, title=row.title, year=row.year, genres=list(row.genres),
                   timestamp=row.timestamp, rating=row.rating)


class StoredInteraction(Interaction):
    user: int


class History(BaseModel):
    user: int
    history: list[Interaction] = Field(description="Oldest first.")


class CatalogItem(BaseModel):
    item_id: int
    title: str
    year: int | None
    genres: list[str]


class CatalogItems(BaseModel):
    items: list[CatalogItem] = Field(description="The exact title first, then titles that start with the text, "
                                     "then the rest, each by id.")


class Recommendation(BaseModel):
    rank: int
    item_ids: list[int] = Field(description="The ids of the items with this title.")
    title: str
    year: int | None
    genres: list[str]
    score: float | None = Field(description="What ranks: log P_LM + λ·log P_CF up to a per-user constant.")
    lm_score: float | None = Field(description="The language model's log-probability of the title alone.")


class Recommendations(BaseModel):
    items: list[Recommendation] = Field(description="Best first.")
    prior: str = Field(description="The collaborative prior used: none, pop or sasrec.")
    prior_weight: float = Field(description="Its λ (0 for none).")
    timings: dict[str, int | float] = Field(description="Milliseconds (*_ms) and token counts.")
    cached: bool = Field(False, description="Answered from the server's result cache (serve --cache): the same "
                         "history, filters, prior and k as an earlier request, so the same items; no search ran.")

    @classmethod
    def of(cls, recs: Any) -> Recommendations:
        return cls.model_validate(recs.to_dict())  # the JSON `recommend --json` prints


class DatabaseInfo(BaseModel):
    path: str
    schema_version: int
    users: int
    items: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    model: str | None
    recommend: bool = Field(description="Whether a model is loaded (POST /recommend answers).")
    workers: int = Field(description="Search processes (serve --workers); 0: searches run in the server process.")
    worker_restarts: int = Field(0, description="Times a search process died and was started afresh (the "
                                 "request it was running got 503).")
    cache: int = Field(0, description="Searches each search process keeps for repeated requests (serve --cache).")
    prompt_cache: int = Field(0, description="Decoded prompts each search process keeps for the same users asked "
                              "again with other settings (serve --prompt-cache).")
    db: DatabaseInfo


# ------------------------------------------------------------------------------------------ the service
@dataclasses.dataclass
class Service:
    """What each route does, independent of HTTP. Blocking: call it from a worker thread.

    ``recommender`` is a :class:`~genrec_edge.recommend.Recommender` (thread-safe) or None, in which
    case :meth:`recommend` answers 503. The database is opened per call (SQLite connections belong to
    one thread, and each request runs in a threadpool thread); opening is a few file reads.
    """

    db: Path
    recommender: Any = None
    model: Path | None = None
    busy_timeout: float = 5.0
    batch_wait_ms: float = BATCH_WAIT_MS

    def __post_init__(self) -> None:
        self._batcher = RequestBatcher(self.recommender, self.batch_wait_ms) if self.recommender is not None else None

    def _open_db(self, *, readonly: bool):
        from .history import HistoryDB

        return HistoryDB.open(self.db, readonly=readonly, busy_timeout=self.busy_timeout)

    def health(self) -> Health:
        # Counts, not db.catalog(): a probe must not read and hash every title. Nothing is cached, so an
        # ingest by another process while we serve shows at once.
        with self._open_db(readonly=True) as db:
            info = DatabaseInfo(path=str(self.db), schema_version=db.schema_version(), users=len(db.users()),
                                items=db.count_items())
        return Health(version=__version__, model=str(self.model) if self.model else None,
                      recommend=self.recommender is not None, workers=getattr(self.recommender, "workers", 0),
                      worker_restarts=getattr(self.recommender, "restarts", 0),
                      cache=getattr(self.recommender, "cache_size", 0),
                      prompt_cache=getattr(self.recommender, "prompt_cache_size", 0), db=info)

    def user_history(self, user: int, limit: int | None) -> History:
        with self._open_db(readonly=True) as db:
            rows = db.history(user, limit)
        return History(user=user, history=[Interaction.of(r) for r in rows])

    def find_items(self, text: str, limit: int) -> CatalogItems:
        with self._open_db(readonly=True) as db:
            found = db.find_items(text, limit=limit)
        return CatalogItems(items=[CatalogItem(item_id=i.id, title=i.title, year=i.year, genres=list(i.genres))
                                   for i in found])

    def recommend(self, request: RecommendRequest, gone: threading.Event | None = None) -> Recommendations:
        """``gone`` set (the client disconnected) while the request waits its turn: :class:`ClientGone`."""
        if self._batcher is None:
            raise HTTPError(503, "no model loaded: start the server with --model")
        from .recommend import Request

        recs = self._batcher.submit(
            Request(user=request.user, history=None if request.history is None else tuple(request.history),
                    prior=request.prior, prior_weight=request.prior_weight, exclude=tuple(request.exclude or ()),
                    only=None if request.only is None else tuple(request.only)),
            request.k, gone,
        )
        return Recommendations.of(recs)

    def add_history(self, request: HistoryAdd) -> tuple[StoredInteraction, bool]:
        """The stored interaction, and whether it is new (False: that user, item and timestamp were there)."""
        with self._open_db(readonly=False) as db:
            item_id = request.item_id
            if item_id is None:
                matches = db.item_by_title(request.title)
                if not matches:
                    raise NotFoundError(f"unknown title {request.title!r}")
                if len(matches) > 1:
                    ids = [m.id for m in matches]
                    raise HTTPError(409, f'title {request.title!r} matches items {ids}: give "item_id" instead')
                item_id = matches[0].id
            row, created = db.record_interaction(request.user, item_id, timestamp=request.timestamp,
                                                 rating=request.rating)
        return StoredInteraction(user=request.user, **Interaction.of(row).model_dump()), created


class RequestBatcher:
    """Gathers /recommend requests that arrive together into one ``Recommender.recommend_many`` call.

    The first request of a group waits at most ``wait_ms`` for others (the bound on added latency), then
    searches up to ``recommender.batch`` requests with the same ``k`` at once; later arrivals form the
    next group. Up to ``recommender.workers`` groups (1 for a Recommender, N for a pool of N processes)
    are searched at the same time, oldest requests first. Results are those of single requests
    (recommend.py); a request the group call refuses (unknown user, ...) is answered alone, so one bad
    request never fails its neighbours.
    """

    def __init__(self, recommender: Any, wait_ms: float = BATCH_WAIT_MS):
        self.recommender = recommender
        self.wait = max(0.0, wait_ms) / 1000
        self.size = max(1, int(getattr(recommender, "batch", 1)))
        self.parallel = max(1, int(getattr(recommender, "workers", 1)))
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leaders = 0  # threads now forming or searching a group

    def submit(self, request: Any, k: int, gone: threading.Event | None = None):
        """The request's result. While it waits for a free slot, ``gone`` set (its client disconnected)
        takes it out of the queue with :class:`ClientGone`: abandoned requests are not searched for nobody
        (clients that time out and retry made the queue grow). A search under way stops at its next
        llama.cpp call once every client of its group has gone (``recommend_many``'s ``cancel``)."""
        pending = _Pending(request, k, gone)
        with self._cond:
            self._queue.append(pending)
            self._cond.notify_all()
            while self._leaders >= self.parallel and not pending.done.is_set():  # wait for ours or a free slot
                self._cond.wait(None if gone is None else GONE_POLL_S)
                if pending.is_gone() and pending in self._queue:
                    self._queue.remove(pending)
                    raise ClientGone()
            if pending.done.is_set():
                return pending.result()
            self._leaders += 1
        try:
            self._lead(pending)
        finally:
            with self._cond:
                self._leaders -= 1
                self._cond.notify_all()
        pending.done.wait()  # another leader's group took ours
        return pending.result()

    def _lead(self, mine: _Pending) -> None:
        """Serve groups from the head of the queue until ours is answered or in another leader's group."""
        while not mine.done.is_set():
            with self._cond:
                deadline = time.monotonic() + self.wait
                while mine in self._queue and len([p for p in self._queue if p.k == mine.k]) < self.size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if mine not in self._queue:
                    return
                for p in [p for p in self._queue if p.is_gone() and p is not mine]:  # nobody to answer
                    self._queue.remove(p)
                    p.fail(ClientGone())
                k = self._queue[0].k
                group = [p for p in self._queue if p.k == k][: self.size]
                for p in group:
                    self._queue.remove(p)
            self._run(group, k)
            with self._cond:
                self._cond.notify_all()

    def _run(self, group: list[_Pending], k: int) -> None:
        def everyone_gone() -> bool:
            return all(p.is_gone() for p in group)

        try:
            results = self.recommender.recommend_many([p.request for p in group], k=k, cancel=everyone_gone)
        except SearchCancelled:
            for p in group:
                p.fail(ClientGone())
            return
        except WorkerLostError as exc:  # replaced, not retried: a request that kills its worker would kill again
            for p in group:
                p.fail(WorkerLostError(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - each request gets its own answer below
            if len(group) == 1:
                group[0].fail(exc)
                return
            for p in group:  # alone, each stopped as a group is once its client has gone
                try:
                    p.succeed(self.recommender.recommend_many([p.request], k=k, cancel=p.is_gone)[0])
                except SearchCancelled:
                    p.fail(ClientGone())
                except Exception as one:  # noqa: BLE001
                    p.fail(one)
            return
        for p, result in zip(group, results, strict=True):
            p.succeed(result)


class ClientGone(Exception):  # noqa: N818 - a state, not a failure: nobody is waiting for the answer
    """The client of a /recommend request disconnected before its search began, or (with every other
    client of its group) before it ended."""


class _Pending:
    def __init__(self, request: Any, k: int, gone: threading.Event | None = None):
        self.request, self.k, self.gone = request, k, gone
        self.done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def succeed(self, value: Any) -> None:
        self._value = value
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self.done.set()

    def is_gone(self) -> bool:
        return self.gone is not None and self.gone.is_set() and not self.done.is_set()

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


# ------------------------------------------------------------------------------------------ the app
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _utf8_safe(message)}, status, headers)  # a message may quote the request


class _StrictJSONRequest(Request):
    """The body arrives within the app's ``request_timeout`` (else 408) and is strict JSON (else 400)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            timeout = self.app.state.request_timeout
            try:
                with anyio.fail_after(timeout):
                    await super().body()
            except TimeoutError:
                raise HTTPError(408, f"request body not received within {timeout:g} s") from None
            except ClientDisconnect:  # FastAPI would make it a 400; nobody reads the answer: the log says 499
                raise HTTPError(CLIENT_GONE, "the client disconnected before sending the whole body") from None
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_object(await self.body())
        return self._json


class _StrictJSONRoute(APIRoute):
    """FastAPI's route, reading bodies through :class:`_StrictJSONRequest` (FastAPI's documented hook)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_json_handler


ERRORS = {"default": {"model": Error, "description": "Any error: one line, `{\"error\": \"...\"}`."}}
BAD = {400: {"model": Error, "description": "Malformed JSON, unknown field, wrong type, value out of range."}}
BODY = {
    411: {"model": Error, "description": "No Content-Length."},
    413: {"model": Error, "description": f"Body larger than {MAX_BODY} bytes."},
    415: {"model": Error, "description": "Content-Type is not application/json."},
}
BUSY = {503: {"model": Error, "description": "Database locked past the busy timeout, read-only, or server busy."}}


def create_app(
    service: Service,
    *,
    allow_remote: bool = False,
    token: str | None = None,
    max_body: int = MAX_BODY,
    max_inflight: int = MAX_INFLIGHT,
    request_timeout: float = REQUEST_TIMEOUT,
    log: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app: :class:`Service`'s methods as routes, behind :class:`_Guard`."""
    app = FastAPI(
        title="genrec-edge local service",
        version=__version__,
        description="JSON API over genrec-edge's catalog-constrained LLM recommender. Bound to 127.0.0.1 by "
        'default. Errors are {"error": "one line"}. With --token, every route but /health needs '
        "`Authorization: Bearer <token>`.",
        servers=[{"url": f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"}],
        openapi_url=None, docs_url=None, redoc_url=None,  # our /openapi.json below; no HTML pages
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.router.route_class = _StrictJSONRoute
    app.state.request_timeout = request_timeout

    @app.get("/health", summary="Liveness, version, what is loaded, database counts.", operation_id="health",
             response_description="The service is up.", responses={**BUSY, **ERRORS})
    def health() -> Health:
        return service.health()

    @app.head("/health", summary="Liveness alone, for probes that send HEAD.", operation_id="healthHead",
              response_description="The service is up.", responses={**BUSY, **ERRORS})
    def health_head() -> Response:
        service.health()  # the same checks (the database opens), no body
        return Response(status_code=200)

    @app.get("/openapi.json", summary="This OpenAPI description.", operation_id="openapi", response_model=None,
             response_description="OpenAPI 3 document.")
    def openapi() -> JSONResponse:
        return JSONResponse(_document(app))

    @app.get("/users/{user}/history", summary="A user's interactions, oldest first.", operation_id="userHistory",
             response_description="The history.",
             responses={**BAD, 404: {"model": Error, "description": "Unknown user."}, **BUSY, **ERRORS})
    def user_history(user: Annotated[PathId, PathParam()], query: Annotated[HistoryQuery, Query()]) -> History:
        return service.user_history(user, query.limit)

    @app.get("/items", summary="Catalog items whose title contains a text, in any case: their ids.",
             operation_id="findItems", response_description="The matching items (none: an empty list).",
             responses={**BAD, **BUSY, **ERRORS})
    def find_items(query: Annotated[ItemsQuery, Query()]) -> CatalogItems:
        return service.find_items(query.search, query.limit)

    @app.post("/recommend", summary="Top-k catalog items for a user id or for a list of titles.",
              description="Items the user has already seen are excluded. Titles in a history must be exact "
              "catalog titles.", operation_id="recommend", response_description="Recommendations, best first.",
              responses={**BAD, 404: {"model": Error, "description": "Unknown user or title."}, **BODY,
                         422: {"model": Error, "description": "The user has no history to recommend from."},
                         **BUSY, **ERRORS})
    async def recommend(body: RecommendRequest, request: Request) -> Recommendations:
        # The search runs in a worker thread, as a plain route's would; meanwhile the event loop watches the
        # connection, and a client gone before its request's search began is not searched for.
        gone = threading.Event()

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(GONE_POLL_S)
            gone.set()

        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                result = await anyio.to_thread.run_sync(service.recommend, body, gone)
            except Exception as exc:  # noqa: BLE001 - raised below, as itself: a task group would wrap it
                error = exc
            finally:
                tasks.cancel_scope.cancel()
        # Gone before its answer (its group's search went on for the others): nobody reads it either.
        if isinstance(error, ClientGone) or (error is None and gone.is_set()):
            return Response(status_code=CLIENT_GONE)  # nobody reads it; the access log says 499
        if error is not None:
            raise error
        return result

    @app.post("/history", status_code=201, operation_id="addHistory", response_description="The stored interaction.",
              summary="Record that a user interacted with an item (by id or exact title).",
              responses={200: {"model": StoredInteraction, "description": "Already stored (the same user, item "
                               "and timestamp): kept as it was, first rating included."},
                         **BAD, 404: {"model": Error, "description": "Unknown item or title."},
                         409: {"model": Error, "description": "The title matches several items: give item_id."},
                         **BODY, **BUSY, **ERRORS})
    def add_history(body: HistoryAdd, response: Response) -> StoredInteraction:
        stored, created = service.add_history(body)
        if not created:  # nothing was created: the same user, item and timestamp are stored (the first rating)
            response.status_code = 200
        return stored

    @app.exception_handler(GenrecError)
    async def genrec_error(request: Request, exc: GenrecError) -> JSONResponse:
        return _error(status_for(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail
        if not isinstance(exc, HTTPError):  # the router's own
            if exc.status_code == 404:
                message = f"no route {request.url.path}"
            elif exc.status_code == 405:
                message = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, exc.headers)

    app.add_middleware(_Guard, allow_remote=allow_remote, token=token, max_body=max_body,
                       max_inflight=max_inflight, log=log)
    return app


def _document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document (generated once per app, from the routes and models), plus the token."""
    spec = app.openapi()
    if "security" not in spec:
        spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{}, {"bearer": []}]  # no token, or the --token one
        _integral_bounds(spec)
    return spec


def _integral_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model stores ``minimum``/``maximum`` as floats: write ``1``, not ``1.0``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum") and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integral_bounds(value)


class _Guard:
    """Our policy for every request before FastAPI sees it (pure ASGI, on the event loop): the Host check,
    the bearer token, POST framing, the in-flight limit; then common headers, the access log, and a 500
    with one line for any exception a route lets through."""

    def __init__(self, app: Any, *, allow_remote: bool, token: str | None, max_body: int, max_inflight: int,
                 log: Callable[[str], None] | None):
        self.app = app
        self.allow_remote = allow_remote
        self.token = token.encode("utf-8") if token is not None else None
        self.max_body = max_body
        self.max_inflight = max_inflight
        self.inflight = 0  # only touched on the event loop: no lock
        self.log = log

    def _refusal(self, scope: dict[str, Any]) -> JSONResponse | None:
        headers = Headers(scope=scope)
        if not self.allow_remote and not _host_header_ok(headers.get("host")):
            return _error(403, "Host header must name a loopback address (127.0.0.1, localhost, [::1])")
        if self.token is not None and scope["path"] != "/health":
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")  # the scheme's case is free
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                      self.token):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        names = [name for name, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # the router would keep the last one silently
            return _error(400, f"query parameter(s) given more than once: {', '.join(repr(name[:40]) for name in repeated)}")
        if scope["method"] == "POST":  # the only method with a body here; PUT/PATCH get the router's 405
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return _error(411, "chunked bodies are not supported: send a Content-Length")
            raw_length = headers.get("content-length")
            if raw_length is None:
                return _error(411, "Content-Length is required")
            if not raw_length.strip().isdigit():
                return _error(400, f"bad Content-Length {raw_length[:40]!r}")
            if int(raw_length) > self.max_body:
                return _error(413, f"request body is {int(raw_length)} bytes, the limit is {self.max_body}")
            if headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
                return _error(415, "Content-Type must be application/json")
        if self.inflight >= self.max_inflight:
            return _error(503, "server busy: too many requests in flight")
        return None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers["Cache-Control"] = "no-store"
                headers["X-Content-Type-Options"] = "nosniff"
                if status == 503 and "retry-after" not in headers:
                    headers["Retry-After"] = "1"
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
        else:
            self.inflight += 1
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception as exc:  # a bug: one line on the log, a 500 with no traceback to the client
                self._log(f"internal error on {scope['method']} {scope['path']}: {type(exc).__name__}: {exc}")
                if not status:
                    await _error(500, f"internal error ({type(exc).__name__})")(scope, receive, send_with_headers)
            finally:
                self.inflight -= 1
        client = scope.get("client") or ("-",)
        target = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else "")
        self._log(f'{client[0]} "{scope["method"]} {target} HTTP/{scope["http_version"]}" {status or "-"}')

    def _log(self, line: str) -> None:
        if self.log is not None:
            self.log(line)


# ------------------------------------------------------------------------------------------ OpenAPI
def openapi_spec() -> dict[str, Any]:
    """The OpenAPI description of every route, generated from the app (also saved as ``docs/openapi.json``)."""
    return _document(create_app(Service(db=Path("history.db"))))


def openapi_text() -> str:
    """``docs/openapi.json``'s exact content."""
    return json.dumps(openapi_spec(), indent=2, ensure_ascii=False) + "\n"


def write_openapi(path: str | Path) -> Path:
    """Save :func:`openapi_text` (what ``docs/openapi.json`` must equal)."""
    path = Path(path)
    path.write_text(openapi_text(), encoding="utf-8")
    return path


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
    if host.startswith("["):  # [v6] or [v6]:port, and nothing else after the bracket ("[::1]evil.com" is not)
        end = host.find("]")
        rest = host[end + 1 :] if end >= 0 else "x"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
        host = host[1:end]
    elif host.count(":") == 1:
        host, port = host.split(":", 1)
        if not port.isdigit():
            return False
    return is_loopback(host.lower())


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering a malformed request with our JSON error (not text) and closing a
    connection whose next request's headers have not arrived ``request_timeout`` after it opened or after
    its previous response (uvicorn's keep-alive timer stops at the first byte: headers sent a byte at a time
    held a connection open for as long as the client liked)."""

    request_timeout = REQUEST_TIMEOUT
    _responses = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.loop.call_later(self.request_timeout, self._close_if_silent, 0)

    def on_response_complete(self) -> None:
        self._responses += 1
        super().on_response_complete()
        self.loop.call_later(self.request_timeout, self._close_if_silent, self._responses)

    def _close_if_silent(self, responses: int) -> None:
        # IDLE: no complete request line and headers since (h11 buffers a partial one).
        if self.conn.their_state is h11.IDLE and self._responses == responses and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"), (b"cache-control", b"no-store")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # serve() owns the signals; uvicorn's would re-raise on exit
        yield


class _Log(logging.Handler):
    """uvicorn's own warnings (malformed requests, ...) as lines on our log."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self._out = log

    def emit(self, record: logging.LogRecord) -> None:
        self._out(record.getMessage())


class GenrecHTTPServer:
    """A bound socket and the app. :meth:`serve_forever` runs uvicorn on it until :meth:`shutdown`, which
    lets the requests in flight finish; :meth:`server_close` then closes the socket and an owned model."""

    def __init__(self, sock: socket.socket, app: FastAPI, service: Service, *, request_timeout: float,
                 log: Callable[[str], None] | None, owns_recommender: bool):
        self.socket = sock
        self.app = app
        self.service = service
        self.server_address = sock.getsockname()[:2]
        self._log = log
        self._owns_recommender = owns_recommender
        protocol = type("Protocol", (_Protocol,), {"request_timeout": request_timeout})
        self._uvicorn = _Uvicorn(uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", loop="asyncio", interface="asgi3",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            headers=[("Server", f"genrec-edge/{__version__}")],
        ))
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def url(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; the requests in flight finish first."""
        self._stopped.clear()
        bridge = _Log(self._log) if self._log is not None else None
        uvicorn_log = logging.getLogger("uvicorn.error")
        if bridge is not None:
            uvicorn_log.addHandler(bridge)
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            if bridge is not None:
                uvicorn_log.removeHandler(bridge)
            self._stopped.set()

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting connections, and (``wait``) return once :meth:`serve_forever` has."""
        self._uvicorn.should_exit = True
        if wait:
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        if self._owns_recommender and self.service.recommender is not None:
            with contextlib.suppress(Exception):
                self.service.recommender.close()
            self.service.recommender = None


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote``."""
    if not host.strip():
        raise UsageError("--host is empty: give an address to listen on (default 127.0.0.1)")
    if host.count(":") == 1 or (host.startswith("[") and "]:" in host):
        raise UsageError(f"--host is an address without a port (got {host!r}): the port goes in --port")
    if not is_loopback(host) and not allow_remote:
        raise UsageError(
            f"refusing to listen on {host}: the API has no TLS and trusts every client; "
            "pass --allow-remote to expose it to your network"
        )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets (else keep-alive waits 40 ms per response)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def make_server(
    db: str | Path,
    model: str | Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int | None = None,
    beam: int | None = None,
    batch: int = 1,
    workers: int = 0,
    cache: int = 0,
    prompt_cache: int = 0,
    recommender: Any = None,
    allow_remote: bool = False,
    token: str | None = None,
    max_body: int = MAX_BODY,
    max_inflight: int = MAX_INFLIGHT,
    busy_timeout: float = 5.0,
    request_timeout: float = REQUEST_TIMEOUT,
    log: Callable[[str], None] | None = None,
) -> GenrecHTTPServer:
    """A bound, not yet serving, server (``port=0`` picks a free port: see ``server.url``).

    Opens the database once to fail fast on a bad file, then ``Recommender.open(model, db)`` (``workers``
    ≥ 1: a :class:`~genrec_edge.pool.RecommenderPool` of that many processes; ``cache``: searches kept for
    repeated requests, per search process; ``prompt_cache``: decoded prompts kept, likewise) unless a ``recommender`` is given (the server then does not close it). Call ``serve_forever()`` and, when
    done, ``shutdown()`` + ``server_close()``.
    """
    from .history import HistoryDB, _is_read_only_file

    check_host(host, allow_remote)
    if token is not None and (not token.strip() or token != token.strip()):
        raise UsageError("the bearer token must be non-empty text without surrounding spaces (no client could "
                         "send an empty one)")
    if workers < 0:
        raise UsageError(f"workers must be 0 (search in this process) or more, not {workers}")
    db = Path(db)
    # Missing / not SQLite / newer schema: refuse to start. A read-only file still serves reads (POST
    # /history then answers 503 "read-only").
    readonly = db.is_file() and _is_read_only_file(db)
    with HistoryDB.open(db, readonly=readonly, busy_timeout=busy_timeout):
        pass
    sock = _listen(host, port)
    owns = False
    try:
        if recommender is None and model is not None:
            from .pool import RecommenderPool
            from .recommend import Recommender

            options = {"threads": threads, "beam": beam, "batch": batch, "cache": cache, "prompt_cache": prompt_cache}
            recommender = (RecommenderPool.open(model, db, workers=workers, **options) if workers >= 1
                           else Recommender.open(model, db, **options))
            owns = True
    except BaseException:
        sock.close()
        raise
    service = Service(db=db, recommender=recommender, model=Path(model) if model else None, busy_timeout=busy_timeout)
    app = create_app(service, allow_remote=allow_remote, token=token, max_body=max_body, max_inflight=max_inflight,
                     request_timeout=request_timeout, log=log)
    return GenrecHTTPServer(sock, app, service, request_timeout=request_timeout, log=log, owns_recommender=owns)


def serve(
    db: str | Path,
    model: str | Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int | None = None,
    beam: int | None = None,
    batch: int = 1,
    workers: int = 0,
    cache: int = 0,
    prompt_cache: int = 0,
    allow_remote: bool = False,
    token: str | None = None,
    busy_timeout: float = 5.0,
    log: Callable[[str], None] | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return.

    ``ready(url)`` is called once the socket listens and the model (every worker's) is loaded.

    Must run in the main thread (it installs the signal handlers, restoring the previous ones on return).
    """
    server = make_server(db, model, host=host, port=port, threads=threads, beam=beam, batch=batch,
                         workers=workers, cache=cache, prompt_cache=prompt_cache, allow_remote=allow_remote,
                         token=token, busy_timeout=busy_timeout, log=log)

    def _stop(signum: int, frame: Any) -> None:
        server.shutdown(wait=False)  # a second signal changes nothing: in-flight requests still finish

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(server.url)
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()


if __name__ == "__main__":  # python -m genrec_edge.serve docs/openapi.json
    print(write_openapi(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json"))
