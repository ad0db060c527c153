"""Recommendations from N worker processes, each with its own model: ``--workers N`` of ``serve``, ``evaluate``
and batch ``recommend``.

Why processes (docs/FINDINGS.md): on 2 cores, two processes with one model each rank 1.2-1.3x the users/s
of one process using both cores, with identical results (bench/results/process-split-2026-12-01.md), while
batching several users into one search does not pay (bench/results/runtime.md). Behind the HTTP service,
a busy service answered 1.49x the users/s with 2 search processes and 1.19x with 1 than with the search in
the HTTP process (bench/results/serve-workers-2026-12-02.md). Each worker keeps the shipped adaptive thread
count (cpu_share.py): a lone request still runs on every core, concurrent ones share them out.

:class:`RecommenderPool` has the :class:`~genrec_edge.recommend.Recommender` calls those make
(``recommend``, ``recommend_many``, ``rank_many``, ``batch``, ``model_path``, ``default_prior``, ``close``)
plus ``workers``, how many calls it serves at once; :func:`ordered_map` keeps that many busy while the
results come back in order. Each worker is a one-process :class:`concurrent.futures.ProcessPoolExecutor`
(spawn: a forked child would inherit this process's threads and llama.cpp state). The pool hands each call
to a free worker, in the order calls come, one call per worker at a time; calls wait here while every worker
is busy. **Affinity:** a request for a user (or an ad-hoc history) goes to the same worker whenever that one
is free, so that worker's result cache and prompt cache (``cache``, ``prompt_cache``) answer follow-ups
(another ``k``, other filters, a repeat); when it is busy, any free worker takes the call. A worker that
dies (killed, out of memory) breaks its executor: the call it was running raises
:class:`~genrec_edge.errors.WorkerLostError` (HTTP 503: retry) and the next call handed to it starts a fresh
process first (``restarts`` counts them); the other workers' calls go on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .errors import SearchCancelled, UsageError, WorkerLostError, stop_if_cancelled
from .recommend import stderr_warning

_recommender: Any = None  # in a worker process: its own Recommender
_loaded: Any = None  # in a worker process: (its default prior, the warnings opening gave) or the GenrecError
_cancelled: Any = None  # in a worker process: the pool's shared flags, one per cancellable call in flight

_CLOSED = "this RecommenderPool is closed: open another with RecommenderPool.open"
_CLOSED_BEFORE_SERVED = "this RecommenderPool was closed before the call was served"
CANCEL_SLOTS = 64  # cancellable calls in flight at once; more are served, just not cancellable
CANCEL_POLL_S = 0.1  # how often a waiting caller asks its ``cancel``


def _load(kwargs: dict[str, Any], cancelled: Any = None) -> None:
    global _recommender, _loaded, _cancelled
    _cancelled = cancelled
    # Ctrl-C reaches the terminal's whole process group: the parent finishes its requests in flight, then
    # stops us (ProcessPoolExecutor.shutdown). If the parent dies without doing so (SIGKILL, a crash), we
    # must not live on holding a model: a worker is re-parented, so its parent id changes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp loads (docs/FINDINGS.md)
    from .errors import GenrecError
    from .recommend import Recommender

    warnings: list[str] = []
    try:
        _recommender = Recommender.open(**kwargs, warn=warnings.append)
        _loaded = (_recommender.default_prior, warnings)
    except GenrecError as exc:  # bad input: the parent raises it, with its type, line and exit code
        _loaded = exc


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _started() -> Any:
    return _loaded


def affinity_key(requests: Sequence) -> int | None:
    """Which worker a ``recommend_many`` call prefers (this number modulo the workers): its first request's
    user id, or a checksum of its history. The same in every run, unlike ``hash``; consecutive user ids
    take turns."""
    if not requests:
        return None
    first = requests[0]
    if first.user is not None:
        return first.user
    return zlib.crc32("\n".join(first.history).encode("utf-8", "surrogatepass"))


def _recommend_many(requests: list, k: int, slot: int | None = None) -> tuple[int, list]:
    cancel = None if slot is None else (lambda: _cancelled[slot] != 0)
    return os.getpid(), _recommender.recommend_many(requests, k=k, cancel=cancel)


def _rank_many(requests: list, k: int, prior: str | None, prior_weight: float | None) -> tuple[int, list]:
    return os.getpid(), _recommender.rank_many(requests, k, prior=prior, prior_weight=prior_weight)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``fn(item)`` for each item, yielded in the items' order, up to ``2 * workers`` calls at a time (each
    in a thread that waits on a pool call): every worker stays busy, and whoever writes the results writes
    them in the order one process would."""
    with ThreadPoolExecutor(workers) as callers:
        window: deque = deque()
        for item in items:
            window.append(callers.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


AUTO = "auto"
WORKER_OVERHEAD_BYTES = 320 << 20  # resident per worker beyond its model file (~410 MB in all at Q8_0's 138 MB)
# A build with AMX keeps a second, repacked copy of the weights for its kernels: ~550-580 MB resident at Q8_0
# (docs/FINDINGS.md), so ``auto`` counts the model twice there.
AMX_WEIGHT_COPIES = 2
MEMORY_SHARE = 0.5  # of the memory available now, the most ``auto`` gives to workers
UNKNOWN_MODEL_BYTES = 150 << 20  # the default model at Q8_0 (138 MB), for a model not built yet


def parse_workers(value: int | str) -> int | str:
    """``--workers``: a number of processes (1 or more) or ``auto``; one clear line for anything else."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise UsageError(f"--workers takes a number of processes (1 or more) or auto, not {value!r}")


def available_memory() -> int | None:
    """Bytes this machine can still give without swapping: Linux's MemAvailable; elsewhere (macOS) half the
    physical memory, a guess; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, OSError, ValueError):
        return None


def auto_workers(model_bytes: int, jobs: int, threads: int | None = None, cpus: int | None = None,
                 memory: int | None = None, amx: bool | None = None) -> tuple[int, int | None]:
    """``(processes, threads each)`` for ``jobs`` searches run here with ``--workers auto``.

    One single-thread process per usable core: the layout that ranked the most users per second on every
    machine measured (2 cores: 1.28x one process with both, bench/results/process-split-2026-12-01.md; and
    more where a hypervisor takes cores away: docs/FINDINGS.md). With ``threads`` given, one process per
    ``threads`` cores instead. Never more processes than ``jobs`` (each loads its own model), nor than fit in
    ``MEMORY_SHARE`` of the memory available (``model_bytes`` + ``WORKER_OVERHEAD_BYTES`` each, the model
    counted ``AMX_WEIGHT_COPIES`` times when llama.cpp was built with AMX). One process keeps ``threads`` as
    given (None: every core, adapted to other programs' load), as without workers. ``cpus``, ``memory`` and
    ``amx`` default to this machine's (``usable_cpus``, ``available_memory``, ``llama_probe.amx_recorded``)."""
    from .cpu_share import usable_cpus

    cpus = usable_cpus() if cpus is None else cpus
    memory = available_memory() if memory is None else memory
    if amx is None:
        from .llama_probe import amx_recorded

        amx = amx_recorded()
    count = max(1, cpus // threads) if threads else cpus
    if memory is not None:
        each = model_bytes * (AMX_WEIGHT_COPIES if amx else 1) + WORKER_OVERHEAD_BYTES
        count = min(count, max(1, int(memory * MEMORY_SHARE) // each))
    count = max(1, min(count, jobs))
    if count == 1:
        return 1, threads
    return count, threads if threads else max(1, cpus // count)


def resolve_workers(workers: int | str, model_path: str | Path | None, jobs: int,
                    threads: int | None) -> tuple[int, int | None]:
    """``(processes, threads each)`` for ``jobs`` searches with ``--workers`` as given: a number (at most
    ``jobs``), or ``auto`` (:func:`auto_workers`; a model not built yet, ``None`` for the default, counts as
    ``UNKNOWN_MODEL_BYTES``)."""
    workers = parse_workers(workers)
    if workers != AUTO:
        return max(1, min(workers, jobs)), threads  # a process per job at most: each loads its own model
    try:
        size = os.path.getsize(model_path) if model_path is not None else UNKNOWN_MODEL_BYTES
    except OSError:  # the caller's own check names the file
        size = UNKNOWN_MODEL_BYTES
    return auto_workers(size, jobs, threads)


class RecommenderPool:
    """``workers`` processes, each with ``Recommender.open(model, db, ...)``. Use :meth:`open`."""

    def __init__(self, kwargs: dict[str, Any], workers: int, warn=None):
        self.workers = workers
        self.batch = kwargs["batch"]
        self.cache_size = kwargs["cache"]  # each worker's (Recommender.cache_size)
        self.prompt_cache_size = kwargs["prompt_cache"]  # each worker's (Recommender.prompt_cache_size)
        self.model_path = Path(kwargs["model"])
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self.served: Counter[int] = Counter()  # calls answered, by worker process id
        self.restarts = 0  # times a dead worker broke the executor and a fresh one was started
        # A call's ``cancel`` reaches its worker through a flag in shared memory, checked between llama.cpp calls.
        self._cancelled = multiprocessing.get_context("spawn").RawArray("b", CANCEL_SLOTS)
        self._free_slots = list(range(CANCEL_SLOTS))
        # Its own lock: a slot comes back from the executor's thread when its call ends, and close() holds
        # ``_lock`` while it waits for that thread.
        self._slots_lock = threading.Lock()
        self._queue: list[object] = []  # callers waiting for a worker, first come first
        # Which workers run a call of ours; a caller waits on ``_turn`` for one to be free.
        self._turn = threading.Condition(threading.Lock())
        self._busy = [False] * workers
        self._replacing = [threading.Lock() for _ in range(workers)]  # one fresh process at a time, per worker
        self._executors, (self.default_prior, warnings) = self._start(workers)
        for message in warnings:  # the first worker's, once: every worker opened the same files
            (warn or stderr_warning)(message)

    @property
    def _executor(self) -> ProcessPoolExecutor:
        """The first worker's executor (a test keeps that worker busy with its own calls)."""
        return self._executors[0]

    @classmethod
    def open(
        cls,
        model: str | Path | None,
        db: str | Path,
        *,
        workers: int,
        threads: int | None = None,
        beam: int | None = None,
        batch: int = 1,
        prior: str | None = None,
        prior_weight: float | None = None,
        cache: int = 0,
        prompt_cache: int = 0,
        warn=None,
    ) -> RecommenderPool:
        """Start ``workers`` processes and wait until each has loaded the model. Bad input (a missing or
        corrupt model, a foreign catalog) raises the error ``Recommender.open`` raises, with its message and
        exit code, and the warnings it gives go to ``warn`` (default: stderr), once. ``cache``: each worker's
        result cache (``Recommender.open``); a repeated request is a hit where the worker that takes it has it;
        ``prompt_cache`` likewise, each worker's kept prompts."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:  # "2" or 1.5: raw TypeErrors
            raise UsageError(f"workers must be a whole number, at least 1, not {workers!r}")
        from .models import default_model_path

        kwargs = {"model": str(model if model is not None else default_model_path()), "db": str(db),
                  "threads": threads, "beam": beam, "batch": batch, "prior": prior, "prior_weight": prior_weight,
                  "cache": cache, "prompt_cache": prompt_cache}
        return cls(kwargs, workers, warn)

    def _start(self, count: int) -> tuple[list[ProcessPoolExecutor], tuple[str, list[str]]]:
        """``count`` fresh one-process executors whose workers have all loaded (side by side), and the first
        one's (default prior, warnings)."""
        executors = [ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_load,
                                         initargs=(self._kwargs, self._cancelled)) for _ in range(count)]
        try:
            # One call each, all at once: each process loads its model before answering, so the first
            # requests do not wait for a load.
            loaded = [future.result() for future in [executor.submit(_started) for executor in executors]]
        except BrokenProcessPool:
            loaded = [WorkerLostError("a worker process could not load the model")]
        failed = [result for result in loaded if isinstance(result, BaseException)]
        if failed:
            # Waited for: an executor whose manager thread still runs when the interpreter exits can make
            # concurrent.futures' exit hook write to its closed wake-up pipe ("Exception ignored ... Bad file
            # descriptor" on stderr after the error line; seen once in CI with 2 workers, CPython 3.11). The
            # workers have answered, so this is quick.
            for executor in executors:
                executor.shutdown(wait=True, cancel_futures=True)
            raise failed[0]
        return executors, loaded[0]

    def recommend_many(self, requests: Sequence, k: int = 10, cancel: Callable[[], bool] | None = None) -> list:
        """``Recommender.recommend_many`` in one free worker (the same results: tested). ``cancel`` is asked
        every 0.1 s while the call waits for a worker or runs; True stops it there (between llama.cpp calls)
        with :class:`~genrec_edge.errors.SearchCancelled`, and frees the worker for the next call."""
        from .recommend import Request

        requests = [Request.of(r) for r in requests]  # a bad request fails here, before any pickling
        return self._call(_recommend_many, requests, k, cancel=cancel, key=affinity_key(requests))

    def rank_many(self, requests: Sequence, k: int, prior: str | None = None,
                  prior_weight: float | None = None) -> list:
        """``Recommender.rank_many`` (no database: the histories are given) in one free worker."""
        requests = [(list(h), set(s), None if i is None else list(i)) for h, s, i in requests]
        return self._call(_rank_many, requests, k, prior, prior_weight)

    def _call(self, fn, *args, cancel: Callable[[], bool] | None = None, key: int | None = None) -> list:
        if self._closed:  # the executor's own RuntimeError ("cannot schedule new futures") escaped before
            raise UsageError(_CLOSED)
        stop_if_cancelled(cancel)
        worker = self._take_worker(key, cancel)
        future = None
        held = [False]  # the slot, given back once: by whichever of the two below comes first
        working = [True]  # the worker, likewise
        slot = None
        try:
            slot = self._take_slot() if cancel is not None else None
            held[0] = slot is not None
            extra = {} if slot is None else {"slot": slot}  # the call's flag, for a function that takes one
            executor, future = self._submit(worker, fn, args, extra)
            # Its worker is busy, and reads the flag, until the call ends, whenever our wait ends.
            future.add_done_callback(lambda _: self._give_back(worker, slot, held, working))
            try:
                pid, results = self._wait(future, cancel, slot)
            except BrokenProcessPool:  # died during this call (maybe because of it): replaced, not retried
                self._replace(worker, executor)
                raise WorkerLostError("a worker process died during this request; it was replaced: try again") from None
            except CancelledError:  # close() dropped it while it waited in the executor (a bare CancelledError)
                raise UsageError(_CLOSED_BEFORE_SERVED) from None
        finally:
            if future is None or future.done():  # never sent, or ended: back before we return
                self._give_back(worker, slot, held, working)
        with self._lock:
            self.served[pid] += 1
        return results

    def _submit(self, worker: int, fn, args: tuple, extra: dict):
        """``(executor, future)`` of the call sent to ``worker``; a worker that died between calls is replaced
        first, once."""
        for attempt in range(2):
            executor = self._executors[worker]
            try:
                return executor, executor.submit(fn, *args, **extra)
            except BrokenProcessPool:  # a RuntimeError too: first
                if attempt:
                    raise WorkerLostError("a fresh worker process died before it took a call: try again") from None
                self._replace(worker, executor)
            except RuntimeError:  # "cannot schedule new futures after shutdown": close() came first
                if self._closed:
                    raise UsageError(_CLOSED_BEFORE_SERVED) from None
                raise
        raise AssertionError("unreachable")

    def _take_worker(self, key: int | None, cancel: Callable[[], bool] | None) -> int:
        """A free worker, marked busy: the one ``key`` prefers if it is free, else the first free one; waits
        (asking ``cancel`` every 0.1 s) while all are busy. Callers are served in the order they came."""
        me = object()
        with self._turn:
            self._queue.append(me)
            try:
                while True:
                    if self._closed:
                        raise UsageError(_CLOSED_BEFORE_SERVED)
                    free = [w for w, busy in enumerate(self._busy) if not busy]
                    if free and self._queue[0] is me:
                        preferred = None if key is None else key % self.workers
                        worker = preferred if preferred in free else free[0]
                        self._busy[worker] = True
                        return worker
                    self._turn.wait(CANCEL_POLL_S if cancel is not None else None)
                    if cancel is not None and cancel():
                        raise SearchCancelled("cancelled: the answer is no longer wanted")
            finally:
                self._queue.remove(me)
                self._turn.notify_all()  # the next caller in line may take a free worker now

    def _give_back(self, worker: int, slot: int | None, held: list[bool], working: list[bool]) -> None:
        self._give_back_slot(slot, held)
        with self._turn:
            if working[0]:
                working[0] = False
                self._busy[worker] = False
                self._turn.notify_all()

    def _take_slot(self) -> int | None:
        with self._slots_lock:
            if not self._free_slots:
                return None
            slot = self._free_slots.pop()
        self._cancelled[slot] = 0
        return slot

    def _give_back_slot(self, slot: int | None, held: list[bool]) -> None:
        with self._slots_lock:
            if held[0]:
                held[0] = False
                self._free_slots.append(slot)

    def _wait(self, future, cancel: Callable[[], bool] | None, slot: int | None):
        """The call's result; once ``cancel`` says so, the worker is told (it raises SearchCancelled at its
        next check) or a call still queued in the executor is dropped. A wait ended otherwise (``cancel``
        raised, an interrupt) tells the worker too: nobody will take that answer."""
        if cancel is None or slot is None:
            return future.result()
        try:
            while True:
                try:
                    return future.result(timeout=CANCEL_POLL_S)
                except TimeoutError:
                    pass
                if cancel():
                    break
        except BaseException:
            if not future.done():
                self._stop(future, slot)
            raise
        if self._stop(future, slot):
            raise SearchCancelled("cancelled: the answer is no longer wanted")
        return future.result()  # running: its worker stops at its next check and raises SearchCancelled here

    def _stop(self, future, slot: int) -> bool:
        """Tell the call's worker to stop; True if the call was still queued here, and is dropped."""
        self._cancelled[slot] = 1
        return future.cancel()

    def recommend(self, user: int | None = None, history: Sequence[str] | None = None, k: int = 10,
                  prior: str | None = None, prior_weight: float | None = None, exclude: Iterable[int] | None = (),
                  only: Iterable[int] | None = None):
        """``Recommender.recommend`` (beam search; sampling is not offered here)."""
        from .recommend import Request

        return self.recommend_many([Request.one_of(user, history, prior, prior_weight, False, exclude, only)], k=k)[0]

    def _replace(self, worker: int, broken: ProcessPoolExecutor) -> None:
        """A fresh process for ``worker`` if its executor is still ``broken`` (the first caller to see it does
        it). The model loads outside ``_lock``: the other workers' calls go on meanwhile."""
        with self._replacing[worker]:
            with self._lock:
                if self._closed:  # a worker died while (or after) the pool closed: start no process nobody stops
                    raise UsageError(_CLOSED)
                if self._executors[worker] is not broken:
                    return
            broken.shutdown(wait=False, cancel_futures=True)
            fresh = self._start(1)[0][0]
            with self._lock:
                if self._closed:  # closed while it loaded
                    fresh.shutdown(wait=True, cancel_futures=True)
                    raise UsageError(_CLOSED)
                self._executors[worker] = fresh
                self.restarts += 1

    _closed = False

    def close(self) -> None:
        with self._turn:  # callers waiting for a worker give up
            self._closed = True
            self._turn.notify_all()
        with self._lock:
            for executor in self._executors:
                executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RecommenderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
