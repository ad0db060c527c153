"""RecommenderPool (``serve --workers N``): real spawned worker processes, each with real llama.cpp on the
tiny random GGUF over the tiny SQLite database."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_serve import http, model_root, running, tiny_model, tiny_model_for  # noqa: F401 (fixtures)

from genrec_edge.errors import CorruptModelError, NotFoundError, SearchCancelled, UsageError, WorkerLostError
from genrec_edge.pool import RecommenderPool
from genrec_edge.recommend import Recommender
from genrec_edge.serve import make_server, status_for

USERS = (1, 2, 3, 4, 5, 6, 7, 8)


def _ranked(recs) -> list[tuple[str, float]]:
    return [(r.title, r.score) for r in recs.items]


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [t for t, _ in a] == [t for t, _ in b] and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))


@pytest.fixture
def pool(tiny_db, tiny_model):  # noqa: F811
    with RecommenderPool.open(tiny_model, tiny_db, workers=2) as p:
        yield p


def test_pool_answers_equal_one_process_and_both_workers_serve(pool, tiny_db, tiny_model):  # noqa: F811
    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as rec:
        alone = {u: _ranked(rec.recommend(user=u, k=5)) for u in USERS}
    assert len(multiprocessing.active_children()) == 2, "both workers start (and load) at open"
    answers: dict[int, list] = {u: [] for u in USERS}
    asks = USERS * 2
    barrier = threading.Barrier(len(asks))

    def ask(user: int) -> None:
        barrier.wait()
        answers[user].append(_ranked(pool.recommend(user=user, k=5)))

    threads = [threading.Thread(target=ask, args=(u,)) for u in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for user in USERS:
        assert len(answers[user]) == 2 and all(_same(a, alone[user]) for a in answers[user]), user
    assert sum(pool.served.values()) == len(asks)
    assert len(pool.served) == 2, f"one worker answered everything: {pool.served}"
    assert _ranked(pool.recommend_many([3], k=5)[0]) == answers[3][0]


def test_pool_passes_exclude_and_only(pool, tiny_db, tiny_model):  # noqa: F811
    from genrec_edge.errors import NotFoundError

    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as rec:
        alone = _ranked(rec.recommend(user=2, k=4, exclude=[10, 20, 30], only=list(range(10, 150, 10))))
    assert _same(_ranked(pool.recommend(user=2, k=4, exclude=[10, 20, 30], only=list(range(10, 150, 10)))), alone)
    with pytest.raises(NotFoundError, match="unknown item 999 in exclude") as raised:
        pool.recommend(user=2, exclude=[999])
    assert (raised.value.item, raised.value.field) == (999, "exclude")  # whole across the process boundary


def test_pool_bad_input_fails_as_one_process_does(pool, tiny_db, tiny_model, tmp_path):  # noqa: F811
    with pytest.raises(NotFoundError, match="999"):
        pool.recommend(user=999, k=3)  # raised in a worker, re-raised here with its type
    with pytest.raises(UsageError, match="exactly one"):
        pool.recommend(k=3)
    with pytest.raises(UsageError, match="one string"):
        pool.recommend_many(["a title"], k=3)
    assert _ranked(pool.recommend(user=1, k=3)), "a bad request leaves the workers serving"
    for workers in (0, "2", 1.5, None, True):  # the strings and floats were raw TypeErrors
        with pytest.raises(UsageError, match="at least 1"):
            RecommenderPool.open(tiny_model, tiny_db, workers=workers)
    bad = tmp_path / "model-Q8_0.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(CorruptModelError):  # a worker's error, raised here with its type
        RecommenderPool.open(bad, tiny_db, workers=2)


def _served_by(pool, call):
    """``call()``'s result and the pid of the worker that answered it."""
    before = pool.served.copy()
    result = call()
    (pid,) = (pool.served - before).keys()
    return result, pid


def test_a_dead_worker_is_replaced(pool):
    before, victim = _served_by(pool, lambda: _ranked(pool.recommend(user=2, k=3)))  # user 2's worker
    restarts = pool.restarts
    (other,) = {p.pid for p in multiprocessing.active_children()} - {victim}
    os.kill(victim, signal.SIGKILL)
    # The executor notices the death on its own thread; the next call handed to that worker (user 2's: it
    # is free) starts a fresh process first, or, in flight then, raises WorkerLostError.
    answers, pids = [], set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            answers.append(_ranked(pool.recommend(user=2, k=3)))
        except WorkerLostError:
            pass
        pids = {p.pid for p in multiprocessing.active_children()}
        if victim not in pids and len(pids) == 2:
            break
        time.sleep(0.1)
    assert victim not in pids and other in pids and len(pids) == 2, pids  # the other worker lives on
    assert all(a == before for a in answers)  # answers before the replacement (if any) are right too
    assert _ranked(pool.recommend(user=2, k=3)) == before
    assert pool.restarts == restarts + 1  # what /health reports as worker_restarts
    assert status_for(WorkerLostError("x")) == 503


def test_the_other_workers_serve_while_a_dead_one_is_replaced(pool):
    """A fresh process loads its model (seconds, for the real one) while the other workers answer: replacing
    one held the pool's lock, and every other worker's answer waited for the load."""
    _, victim = _served_by(pool, lambda: pool.recommend(user=2, k=3))  # worker 0 (2 mod 2)
    real_start = pool._start

    def slow_start(count: int):
        time.sleep(3.0)
        return real_start(count)

    pool._start = slow_start
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    outcome: list = []

    def on_the_dead_worker() -> None:
        try:
            outcome.append(_ranked(pool.recommend(user=2, k=3)))
        except WorkerLostError as exc:  # in flight when the death was noticed: replaced all the same
            outcome.append(exc)

    thread = threading.Thread(target=on_the_dead_worker)
    thread.start()
    time.sleep(0.3)  # it is loading a fresh process for worker 0
    began = time.monotonic()
    assert _ranked(pool.recommend(user=1, k=3))  # worker 1
    assert time.monotonic() - began < 2.0, "worker 1's answer waited for worker 0's fresh process"
    thread.join(60)
    assert len(outcome) == 1 and pool.restarts == 1 and victim not in {p.pid for p in multiprocessing.active_children()}


def test_a_users_follow_ups_go_to_the_worker_that_has_its_prompt_and_answers(tiny_db, tiny_model):  # noqa: F811
    """Affinity: one after another, each user's asks (a repeat, another k, other filters) land on one worker,
    whose result and prompt caches answer them; the users are spread over both workers; the answers are
    one process's."""
    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as rec:
        alone = {u: _ranked(rec.recommend(user=u, k=4)) for u in USERS}
    with RecommenderPool.open(tiny_model, tiny_db, workers=2, cache=8, prompt_cache=8) as pool:
        workers_of: dict[int, set[int]] = {u: set() for u in USERS}
        for _ in range(2):
            for user in USERS:
                first, pid = _served_by(pool, lambda user=user: pool.recommend(user=user, k=4))
                workers_of[user].add(pid)
                assert _same(_ranked(first), alone[user]), user
                more, pid = _served_by(pool, lambda user=user: pool.recommend(user=user, k=2, exclude=[10]))
                workers_of[user].add(pid)
                assert more.timings.prefilled_tokens == 0, f"user {user}'s prompt was decoded again"
        again, _ = _served_by(pool, lambda: pool.recommend(user=3, k=4))
        assert again.cached, "a repeat was searched again"
        assert all(len(pids) == 1 for pids in workers_of.values()), workers_of
        assert len(set().union(*workers_of.values())) == 2, f"one worker took every user: {workers_of}"


def test_a_call_whose_worker_is_busy_takes_a_free_one_or_waits_its_turn(pool):
    """The dispatch alone: a key's worker when free, else the first free one; with none free, callers wait
    in the order they came, and a cancelled waiter leaves the line."""
    assert pool._take_worker(4, None) == 0  # user 4's worker (4 mod 2)
    assert pool._take_worker(2, None) == 1  # user 2's is busy: the free one
    got: list[tuple[str, int]] = []

    def take(name: str, key: int) -> None:
        got.append((name, pool._take_worker(key, None)))

    first = threading.Thread(target=take, args=("first", 1))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=take, args=("second", 0))
    second.start()
    time.sleep(0.2)
    with pytest.raises(SearchCancelled):
        pool._take_worker(0, lambda: True)
    assert got == [], "a call took a busy worker"
    pool._give_back(0, None, [False], [True])  # worker 0 frees up: the first in line takes it
    first.join(5)
    assert got == [("first", 0)] and second.is_alive()
    pool._give_back(1, None, [False], [True])
    second.join(5)
    assert got == [("first", 0), ("second", 1)]
    for worker in (0, 1):
        pool._give_back(worker, None, [False], [True])
    assert _ranked(pool.recommend(user=2, k=3)), "the pool serves after all that"


def test_server_with_workers_answers_concurrent_requests_in_parallel(tiny_db, tiny_model):  # noqa: F811
    """make_server(workers=2): the request batcher hands two groups at once to the pool (one per worker)."""
    server = make_server(tiny_db, tiny_model, port=0, workers=2, cache=3, prompt_cache=5, log=lambda line: None)
    pool = server.service.recommender
    assert isinstance(pool, RecommenderPool)
    inflight, most = 0, 0
    lock = threading.Lock()
    real = pool.recommend_many

    def counting(requests, k=10, cancel=None):
        nonlocal inflight, most
        with lock:
            inflight += 1
            most = max(most, inflight)
        try:
            time.sleep(0.2)  # hold the slot: the second request must not wait for the first
            return real(requests, k=k, cancel=cancel)
        finally:
            with lock:
                inflight -= 1

    pool.recommend_many = counting
    with running(server):
        health = http(server.url + "/health")[1]
        assert (health["workers"], health["cache"], health["prompt_cache"]) == (2, 3, 5)
        answers: dict[int, tuple] = {}
        barrier = threading.Barrier(4)

        def ask(user: int) -> None:
            barrier.wait()
            answers[user] = http(server.url + "/recommend", "POST", {"user": user, "k": 3})[:2]

        threads = [threading.Thread(target=ask, args=(u,)) for u in (1, 2, 4, 999)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert most == 2, f"{most} searches at once with 2 workers"
    assert all(answers[u][0] == 200 for u in (1, 2, 4)), answers
    assert answers[999][0] == 404 and "999" in answers[999][1]["error"]
    assert not multiprocessing.active_children(), "server_close stops the workers"


def test_cli_serve_workers_starts_answers_and_stops_clean(tiny_db, tiny_model):  # noqa: F811
    env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--db", str(tiny_db), "--model", str(tiny_model),
         "--workers", "2", "--threads", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving on http://127.0.0.1:") and "2 search processes" in line, line
        port = int(line.split("http://127.0.0.1:", 1)[1].split(" ", 1)[0])
        children = _children(proc.pid)
        assert len(children) >= 2, children  # the workers (and multiprocessing's resource tracker)
        answers = [http(f"http://127.0.0.1:{port}/recommend", "POST", {"user": 1, "k": 3}) for _ in range(3)]
        assert all(status == 200 and len(body["items"]) == 3 for status, body, _ in answers)
        assert len({json.dumps(body["items"]) for _, body, _ in answers}) == 1
        # The CLI's default --cache: each worker keeps its searches, so 3 asks of 2 workers hit at least once
        assert not answers[0][1]["cached"] and any(body["cached"] for _, body, _ in answers[1:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err, err
        assert not _survivors(children, 10), "no worker outlives the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_workers_bad_input_is_one_line(tiny_db, tmp_path):
    bad = tmp_path / "model-Q8_0.gguf"
    bad.write_bytes(b"not a gguf")
    for args, code in ((["--model", str(bad), "--workers", "2"], CorruptModelError.exit_code),
                       (["--workers", "-1"], 2)):
        done = subprocess.run([sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--db", str(tiny_db), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == code, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and len(lines) <= 6, done.stderr  # typer's usage box for --workers -1
        assert "error" in done.stderr.lower() or "invalid" in done.stderr.lower()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _survivors(pids: list[int], seconds: float) -> list[int]:
    """The processes among ``pids`` still running after waiting up to ``seconds`` for them all to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_exit_when_their_parent_is_killed(tiny_db, tiny_model, tmp_path):  # noqa: F811
    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time\n"
        "from genrec_edge.pool import RecommenderPool\n"
        "if __name__ == '__main__':\n"
        "    pool = RecommenderPool.open(sys.argv[1], sys.argv[2], workers=2)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_model), str(tiny_db)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        proc.kill()  # no shutdown: the workers must notice on their own
        proc.wait()
        assert not _survivors(workers, 15), "a worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_to_the_process_group_stops_serve_cleanly(tiny_db, tiny_model):  # noqa: F811
    """A terminal's Ctrl-C reaches the server and its search processes: the workers ignore it, the server
    stops them after its requests in flight, nothing prints a traceback."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--db", str(tiny_db), "--model", str(tiny_model),
         "--threads", "1"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
    )
    try:
        line = proc.stderr.readline()
        assert "1 search process" in line, line
        port = int(line.split("http://127.0.0.1:", 1)[1].split(" ", 1)[0])
        assert http(f"http://127.0.0.1:{port}/recommend", "POST", {"user": 2, "k": 3})[0] == 200
        children = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert not _survivors(children, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_closed_pool_says_so(tiny_db, tiny_model):  # noqa: F811
    pool = RecommenderPool.open(tiny_model, tiny_db, workers=1)
    assert _ranked(pool.recommend(user=1, k=3))
    pool.close()
    with pytest.raises(UsageError, match="closed"):  # concurrent.futures' RuntimeError before
        pool.recommend(user=1, k=3)
    with pytest.raises(UsageError, match="closed before the call was served"):  # a call that had its worker
        pool._submit(0, time.sleep, (0,), {})  # when close() came: the executor's RuntimeError before


def test_a_cancelled_call_is_stopped_and_frees_its_worker(tiny_db, tiny_model):  # noqa: F811
    """``cancel`` reaches a worker through shared memory: a call whose client left (serve) stops there, at
    its next check, and the worker serves the next call with the exact answer."""
    with RecommenderPool.open(tiny_model, tiny_db, workers=1) as pool:
        before = _ranked(pool.recommend(user=2, k=3))
        busy = pool._executor.submit(time.sleep, 1.0)  # the only worker is busy: our call is handed to it next
        started = time.monotonic()
        with pytest.raises(SearchCancelled, match="no longer wanted"):
            pool.recommend_many([2], k=3, cancel=lambda: time.monotonic() - started > 0.3)
        assert time.monotonic() - started < 10
        busy.result()
        assert pool.served.total() == 1, "the cancelled call was not answered"
        assert _ranked(pool.recommend_many([2], k=3, cancel=lambda: False)[0]) == before
        assert _ranked(pool.recommend(user=2, k=3)) == before
        assert sorted(pool._free_slots) == list(range(len(pool._cancelled))), "every slot is given back"
        with pytest.raises(SearchCancelled):  # already cancelled: not sent at all
            pool.recommend_many([2], k=3, cancel=lambda: True)


def test_a_cancel_check_that_raises_stops_its_worker_and_keeps_its_slot_until_then(tiny_db, tiny_model):  # noqa: F811
    """A ``cancel`` that raises (or an interrupt while the caller waits) ends the caller's wait with that error;
    the call it handed a worker must not run on for nobody, and its flag's slot is not given to another call
    while that worker may still read it."""
    with RecommenderPool.open(tiny_model, tiny_db, workers=1, cache=4) as pool:
        slots = len(pool._free_slots)
        busy = pool._executor.submit(time.sleep, 2.0)  # the only worker is busy: our call is handed to it next
        started = time.monotonic()

        def cancel() -> bool:
            if time.monotonic() - started > 0.3:
                raise RuntimeError("the cancel check broke")
            return False

        with pytest.raises(RuntimeError, match="broke"):
            pool.recommend_many([2], k=3, cancel=cancel)
        assert not busy.done()
        assert len(pool._free_slots) == slots - 1, "the slot was given back while its call is still to run"
        busy.result()
        again = pool.recommend(user=2, k=3)  # after the abandoned call: one worker takes calls in order
        assert not again.cached, "the abandoned call was searched for nobody (its answer was cached)"
        assert len(pool._free_slots) == slots, "the slot comes back once its call has stopped"


def _ask_in_thread(pool, errors: list) -> threading.Thread:
    def ask() -> None:
        try:
            pool.recommend(user=2, k=3)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_a_call_still_queued_when_the_pool_closes_says_so(tiny_db, tiny_model):  # noqa: F811
    """close() drops calls no worker has taken: their callers got a bare concurrent.futures.CancelledError."""
    pool = RecommenderPool.open(tiny_model, tiny_db, workers=1)
    for _ in range(4):  # the worker and the executor's call queue are full: the next call waits in the pool
        pool._executor.submit(time.sleep, 0.3)
    errors: list = []
    thread = _ask_in_thread(pool, errors)
    time.sleep(0.3)
    pool.close()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], UsageError) and "closed" in str(errors[0]), errors


def test_a_worker_that_dies_while_the_pool_closes_is_not_replaced(tiny_db, tiny_model):  # noqa: F811
    """A call in flight saw the dead worker and started a fresh pool of processes that nobody would stop."""
    pool = RecommenderPool.open(tiny_model, tiny_db, workers=1)
    (worker,) = multiprocessing.active_children()
    pool._executor.submit(time.sleep, 3)  # close() waits for it
    errors: list = []
    thread = _ask_in_thread(pool, errors)
    time.sleep(0.3)
    closer = threading.Thread(target=pool.close)
    closer.start()
    time.sleep(0.3)
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(30)
    closer.join(30)
    assert len(errors) == 1 and isinstance(errors[0], UsageError) and "closed" in str(errors[0]), errors
    time.sleep(0.5)
    assert multiprocessing.active_children() == [], "no worker outlives the pool"
    assert pool.restarts == 0


def test_a_batched_group_whose_worker_died_gets_503_not_a_retry(tiny_db, tiny_model):  # noqa: F811
    """A worker that dies during a group's call (serve --workers N --batch M) failed the group, and the batcher
    then retried its requests one by one as if a bad request had failed it: the requests in flight got answers
    instead of the documented 503, and a request that kills its worker (a llama.cpp abort) took the fresh pool
    down again once per request of its group, with every other worker's requests in flight."""
    from genrec_edge.recommend import Request
    from genrec_edge.serve import RequestBatcher

    with RecommenderPool.open(tiny_model, tiny_db, workers=1, batch=2) as pool:
        (worker,) = multiprocessing.active_children()
        busy = pool._executor.submit(time.sleep, 2.0)  # the group's call waits behind this, then dies with it
        batcher = RequestBatcher(pool, wait_ms=5_000)  # the group forms once both have arrived
        outcomes: dict[int, object] = {}

        def ask(user: int) -> None:
            try:
                outcomes[user] = batcher.submit(Request(user=user), 3)
            except Exception as exc:  # noqa: BLE001 - the test looks at what it was
                outcomes[user] = exc

        threads = [threading.Thread(target=ask, args=(u,)) for u in (1, 2)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are in the group's call, queued for the busy worker
        os.kill(worker.pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        with pytest.raises(Exception):  # noqa: B017 - BrokenProcessPool
            busy.result()
        assert all(isinstance(outcomes[u], WorkerLostError) for u in (1, 2)), outcomes
        assert status_for(outcomes[1]) == 503
        assert pool.restarts == 1
        assert _ranked(pool.recommend(user=1, k=3)), "the fresh pool serves"


MB = 1 << 20


def test_auto_workers_one_single_thread_process_per_core_within_memory_and_jobs():
    from genrec_edge.pool import AMX_WEIGHT_COPIES, WORKER_OVERHEAD_BYTES, auto_workers

    plenty = 64 << 30
    model = 138 * MB
    per = model + WORKER_OVERHEAD_BYTES
    assert auto_workers(model, jobs=100, cpus=2, memory=plenty) == (2, 1)
    assert auto_workers(model, jobs=100, cpus=16, memory=plenty) == (16, 1)
    # --threads T: one process per T cores, each with T threads.
    assert auto_workers(model, jobs=100, threads=2, cpus=8, memory=plenty) == (4, 2)
    assert auto_workers(model, jobs=100, threads=2, cpus=2, memory=plenty) == (1, 2)
    assert auto_workers(model, jobs=100, threads=3, cpus=8, memory=plenty) == (2, 3)
    # Fewer jobs than cores: no idle processes; their threads share the cores out.
    assert auto_workers(model, jobs=3, cpus=8, memory=plenty) == (3, 2)
    assert auto_workers(model, jobs=1, cpus=8, memory=plenty) == (1, None)  # one process keeps every core
    assert auto_workers(model, jobs=0, cpus=8, memory=plenty) == (1, None)
    # Half the free memory bounds the count; a machine short of memory gets one process.
    assert auto_workers(model, jobs=100, cpus=16, memory=2 * 3 * per, amx=False) == (3, 5)
    assert auto_workers(model, jobs=100, cpus=16, memory=2 * 3 * per - 1, amx=False) == (2, 8)
    assert auto_workers(model, jobs=100, cpus=16, memory=per, amx=False) == (1, None)
    assert auto_workers(4 * model, jobs=100, cpus=16, memory=2 * 3 * per, amx=False) == (1, None)  # a bigger model
    assert auto_workers(model, jobs=100, cpus=1, memory=plenty) == (1, None)
    # An AMX build holds a repacked copy of the weights too: the same memory fits fewer processes.
    per_amx = AMX_WEIGHT_COPIES * model + WORKER_OVERHEAD_BYTES
    assert auto_workers(model, jobs=100, cpus=16, memory=2 * 3 * per, amx=True) == (2, 8)
    assert auto_workers(model, jobs=100, cpus=16, memory=2 * 3 * per_amx, amx=True) == (3, 5)
    assert auto_workers(model, jobs=100, cpus=16, memory=plenty, amx=True) == (16, 1)


def test_auto_workers_counts_the_amx_copy_of_the_weights_when_the_build_has_amx(monkeypatch):
    from genrec_edge import llama_probe
    from genrec_edge.pool import WORKER_OVERHEAD_BYTES, auto_workers

    model = 138 * MB
    memory = 2 * 3 * (model + WORKER_OVERHEAD_BYTES)  # three plain processes fit, not three with AMX
    for recorded, expected in ((False, 3), (True, 2)):
        monkeypatch.setattr(llama_probe, "amx_recorded", lambda recorded=recorded: recorded)
        assert auto_workers(model, jobs=100, cpus=16, memory=memory)[0] == expected


def test_auto_workers_reads_this_machine(monkeypatch):
    from genrec_edge import pool as pool_mod
    from genrec_edge.cpu_share import usable_cpus
    from genrec_edge.pool import auto_workers, available_memory

    memory = available_memory()
    if sys.platform.startswith("linux"):
        assert memory is not None and memory > 0
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory <= physical

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr(pool_mod, "open", no_proc, raising=False)  # as on macOS: half the physical memory
    assert available_memory() == physical // 2
    monkeypatch.undo()
    count, threads = auto_workers(100 * MB, jobs=1000)
    assert count == auto_workers(100 * MB, jobs=1000, cpus=usable_cpus(), memory=memory)[0]
    assert 1 <= count <= usable_cpus()


@pytest.mark.parametrize("given, expected", [("auto", "auto"), (" AUTO ", "auto"), ("3", 3), (1, 1), (12, 12)])
def test_parse_workers_takes_a_count_or_auto(given, expected):
    from genrec_edge.pool import parse_workers

    assert parse_workers(given) == expected


@pytest.mark.parametrize("given", ["0", "-1", "two", "", "1.5", 0, -2, True, 1.5, None])
def test_parse_workers_refuses_anything_else_in_one_line(given):
    from genrec_edge.pool import parse_workers

    with pytest.raises(UsageError, match=r"^--workers takes a number of processes \(1 or more\) or auto, not "):
        parse_workers(given)


def test_resolve_workers_caps_a_count_by_the_jobs_and_sizes_auto_by_the_model(tmp_path, monkeypatch):
    from genrec_edge import cpu_share, llama_probe
    from genrec_edge import pool as pool_mod

    assert pool_mod.resolve_workers(8, None, jobs=3, threads=None) == (3, None)
    assert pool_mod.resolve_workers(2, None, jobs=10, threads=4) == (2, 4)
    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 4)
    monkeypatch.setattr(llama_probe, "amx_recorded", lambda: False)  # a build without AMX: one copy of the weights
    per = pool_mod.WORKER_OVERHEAD_BYTES
    half = 2 * (per + 400 * MB)  # room for two workers of a 400 MB model
    monkeypatch.setattr(pool_mod, "available_memory", lambda: 2 * half)
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.truncate(400 * MB)  # sparse: its size is what counts
    assert pool_mod.resolve_workers("auto", big, jobs=10, threads=None) == (2, 2)
    # A model not there (or not built yet) counts as UNKNOWN_MODEL_BYTES: three fit.
    assert half // (per + pool_mod.UNKNOWN_MODEL_BYTES) == 3
    assert pool_mod.resolve_workers("auto", tmp_path / "not-built.gguf", jobs=10, threads=None) == (3, 1)
    assert pool_mod.resolve_workers("auto", None, jobs=10, threads=None) == (3, 1)
    # With AMX the 400 MB model is held twice: one worker fits.
    monkeypatch.setattr(llama_probe, "amx_recorded", lambda: True)
    assert pool_mod.resolve_workers("auto", big, jobs=10, threads=None) == (1, None)
