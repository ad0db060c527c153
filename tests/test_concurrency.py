"""Concurrency: 4 threads recommending on one Recommender while other PROCESSES append history through
``genrec-edge history add`` and the HTTP API (served from this process over the same Recommender).

Checks: no errors anywhere, every write present afterwards (count), ``PRAGMA integrity_check`` = ok, and
recommendations see history once it is committed (an item just added is no longer recommended).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from test_serve import http, model_root, running, tiny_model, tiny_model_for  # noqa: F401 (fixtures)

from genrec_edge.history import HistoryDB
from genrec_edge.serve import make_server

N_HTTP_WRITES = 40
N_CLI_WRITES = 4
TIME_BOUND = 25.0  # seconds for the whole concurrent phase

HTTP_WRITER = r"""
import json, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ok = 0
for i in range(n):
    body = json.dumps({"user": 100 + i % 5, "item_id": 10 * (1 + i % 20), "timestamp": 3_000_000_000 + i}).encode()
    req = urllib.request.Request(url + "/history", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=30) as resp:
        assert resp.status == 201, resp.status
        ok += 1
print(ok)
"""


def test_recommend_threads_with_writer_processes(tiny_db, tiny_model):  # noqa: F811
    from genrec_edge.recommend import Recommender

    with HistoryDB.open(tiny_db, readonly=True) as db:
        before = db.count_interactions()
    errors: list[BaseException] = []
    calls = [0] * 4
    stop = threading.Event()

    with Recommender.open(tiny_model, tiny_db, threads=1) as rec, running(
        make_server(tiny_db, recommender=rec, port=0, busy_timeout=10.0)
    ) as server:
        users = [1, 2, 4, 7]

        def worker(n: int) -> None:
            try:
                while not stop.is_set():
                    user = users[n]
                    recs = rec.recommend(user=user, k=3 + n)
                    assert len(recs.items) == 3 + n
                    assert len({r.title for r in recs.items}) == len(recs.items)
                    calls[n] += 1
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        env = dict(os.environ, OMP_WAIT_POLICY="passive")
        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        http_writer = subprocess.Popen([sys.executable, "-c", HTTP_WRITER, server.url, str(N_HTTP_WRITES)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        cli_script = "; ".join(
            f"{sys.executable} -m genrec_edge history add --user 200 --item {10 * (i + 1)} "
            f"--timestamp {4_000_000_000 + i} --db {tiny_db} --busy-timeout 10 || exit 1"
            for i in range(N_CLI_WRITES)
        )
        cli_writer = subprocess.Popen(["/bin/sh", "-c", cli_script], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        try:
            http_out, http_err = http_writer.communicate(timeout=TIME_BOUND)
            cli_out, cli_err = cli_writer.communicate(timeout=max(1.0, TIME_BOUND - (time.monotonic() - started)))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            for p in (http_writer, cli_writer):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        elapsed = time.monotonic() - started
        assert not errors, errors[:3]
        assert http_writer.returncode == 0 and http_out.strip() == str(N_HTTP_WRITES), http_err[-500:]
        assert cli_writer.returncode == 0, cli_err[-500:]
        assert cli_out.count("added item") == N_CLI_WRITES
        assert "Traceback" not in http_err + cli_err
        assert all(c >= 1 for c in calls), calls
        assert elapsed < TIME_BOUND + 5

        # Every write is there, and the file is sound.
        with HistoryDB.open(tiny_db, readonly=True) as db:
            assert db.count_interactions() == before + N_HTTP_WRITES + N_CLI_WRITES
            assert [i.item_id for i in db.history(200)] == [10 * (i + 1) for i in range(N_CLI_WRITES)]
            assert db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # A committed write is seen by the next recommendation: the top item, once added, is excluded.
        top = rec.recommend(user=1, k=5).items[0]
        status, body, _ = http(server.url + "/history", "POST", {"user": 1, "item_id": top.item_ids[0],
                                                                   "timestamp": 4_100_000_000})
        assert status == 201, body
        after = rec.recommend(user=1, k=5)
        assert top.title not in {r.title for r in after.items}
        status, body, _ = http(server.url + "/recommend", "POST", {"user": 1, "k": 5})
        assert status == 200 and top.title not in {r["title"] for r in body["items"]}
        # ... and one written by another process (the CLI) too.
        top2 = after.items[0]
        done = subprocess.run(
            [sys.executable, "-m", "genrec_edge", "history", "add", "--user", "1", "--item", str(top2.item_ids[0]),
             "--timestamp", "4100000001", "--db", str(tiny_db)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert top2.title not in {r.title for r in rec.recommend(user=1, k=5).items}
    print(json.dumps({"recommend_calls": calls, "http_writes": N_HTTP_WRITES, "cli_writes": N_CLI_WRITES,
                      "seconds": round(elapsed, 1)}))
