"""Batch recommendation on a real local Ray instance (the `cluster` extra): the same lines as the local run."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HISTORIES
from tinymodel import DEFAULT_TITLES, tiny_gguf

from genrec_edge.batch import read_records, recommend_users

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # Ray's own

K = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cached = tmp_path_factory.getbasetemp() / "runtime-tiny-gguf-db" / "model-F32.gguf"  # test_recommend's model
    if not cached.exists():
        tiny_gguf(cached.parent, corpus=DEFAULT_TITLES, seed=5)
    return cached


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))


def run(tiny_model, db, out, **options):
    return recommend_users(db, out, model=tiny_model, k=K, threads=1, batch=4, progress=False,
                           warn=lambda m: None, **options)


def header(path):
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])


def test_ray_run_writes_the_local_run_lines(local_ray, tiny_model, tiny_db, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run(tiny_model, tiny_db, local)
    report = run(tiny_model, tiny_db, remote, ray=True, actors=2)
    assert (report.users, report.written, report.errors) == (len(TINY_HISTORIES), len(TINY_HISTORIES), 0)
    assert header(remote) == header(local)  # one run may resume the other
    records = read_records(remote)
    assert sorted(records) == sorted(TINY_HISTORIES)
    assert records == read_records(local)  # every title, item id and score, to the bit
    assert all(len(r["items"]) == K for r in records.values())


def test_ray_with_a_popularity_prior_and_the_model_shipped(local_ray, tiny_model, tiny_db, tmp_path):
    # The prior is counted from the database on the driver; the actors get it, and the model's bytes,
    # through the object store.
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    users = [6, 2, 8, 1, 7]
    run(tiny_model, tiny_db, local, users=users, prior="pop", prior_weight=0.5)
    run(tiny_model, tiny_db, remote, users=users, prior="pop", prior_weight=0.5, ray=True, actors=1,
        ship_model=True)
    assert read_records(remote) == read_records(local)
    plain = tmp_path / "plain.jsonl"
    run(tiny_model, tiny_db, plain, users=users)
    assert read_records(plain) != read_records(local)  # the prior did change the rankings


def test_ray_applies_exclude_and_only_as_the_local_run_does(local_ray, tiny_model, tiny_db, tmp_path):
    # The filters go to the actors with the model; a user they leave nothing for (user 1 has seen 10..50,
    # and 90 is excluded) gets the local run's error line.
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    users = [6, 2, 1, 8]
    filters = {"exclude": [20, 90, 160], "only": [10, 20, 30, 40, 50, 90]}
    run(tiny_model, tiny_db, local, users=users, **filters)
    report = run(tiny_model, tiny_db, remote, users=users, ray=True, actors=2, **filters)
    assert header(remote) == header(local)
    records = read_records(remote)
    assert records == read_records(local)
    assert report.errors == 1 and "nothing left to recommend" in records[1]["error"]
    shown = {i for r in records.values() for item in r["items"] for i in item["item_ids"]}
    assert shown and shown <= set(filters["only"]) - set(filters["exclude"])
    # Users' own filters (a users file's JSON lines) travel with their histories, on top of the run's.
    own = {2: {"exclude": [10]}, 8: {"only": [30, 40, 50, 60]}, 6: {"only": [20]}}  # 6: 20 is excluded
    local, remote = tmp_path / "own-local.jsonl", tmp_path / "own-ray.jsonl"
    run(tiny_model, tiny_db, local, users=users, user_filters=own, **filters)
    report = run(tiny_model, tiny_db, remote, users=users, ray=True, actors=2, user_filters=own, **filters)
    records = read_records(remote)
    assert records == read_records(local) and header(remote) == header(local)
    assert report.errors == 2 and "error" in records[6] and "error" in records[1]
    assert {i for item in records[8]["items"] for i in item["item_ids"]} <= {30, 40, 50}
    assert 10 not in {i for item in records[2]["items"] for i in item["item_ids"]}


def test_evaluate_on_ray_equals_the_local_evaluation(local_ray, tiny_model, tiny_db, tmp_path):
    """`evaluate --ray`: the LLM's searches on the actor pool, the same per-user results and metrics."""
    from genrec_edge.evalruns import RecommenderSpec, evaluate_recommenders

    specs = [RecommenderSpec("llm", tiny_model, "pop", 0.5)]
    local = evaluate_recommenders(specs, db=tiny_db, split="valid", k=K, out=tmp_path / "local.jsonl", threads=1,
                                  batch=2, progress=False, warn=lambda m: None)
    remote = evaluate_recommenders(specs, db=tiny_db, split="valid", k=K, out=tmp_path / "ray.jsonl", threads=1,
                                   batch=2, progress=False, warn=lambda m: None, ray="auto")
    assert list(local.runs) == list(remote.runs)
    name = next(iter(local.runs))
    assert local.runs[name]["key"] == remote.runs[name]["key"]  # one log may serve the other
    tops = {}
    for path in (tmp_path / "local.jsonl", tmp_path / "ray.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        tops[path.name] = {r["user"]: (r["rank"], r["top"]) for r in lines if "user" in r}
    assert tops["local.jsonl"] == tops["ray.jsonl"] and len(tops["ray.jsonl"]) == len(local.users)
    assert local.summary["recommenders"][name] == remote.summary["recommenders"][name]
