"""The default-model pipeline: a shipped adapter becomes a cached, served GGUF on first use.

Runs the real chain on a tiny random LLaMA: train (a few steps) -> ``default_model.build_level`` (merge ->
convert F16 -> quantize Q8_0, under GENREC_EDGE_HOME) -> ``Recommender`` over the matching database.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY_HISTORIES
from tinymodel import DEFAULT_TITLES, make_tiny_llama

from genrec_edge import default_model
from genrec_edge.convert import read_provenance
from genrec_edge.history import HistoryDB
from genrec_edge.recommend import Recommender
from genrec_edge.train import TrainConfig, train_on_sequences


@pytest.fixture()
def tiny_run(tmp_path, tiny_db):
    base = make_tiny_llama(tmp_path / "base", corpus=DEFAULT_TITLES, hidden_size=256, intermediate_size=256)
    with HistoryDB.open(tiny_db, readonly=True) as db:
        sequences, catalog, dataset = list(db.sequences()), db.catalog(), db.dataset()
    config = TrainConfig(
        base=str(base), history_len=4, max_steps=2, batch_size=4, warmup=0, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, valid_users=2,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    train_on_sequences(sequences, catalog, run_dir, config, dataset=dataset.name, quiet=True)
    return run_dir


def test_adapter_is_built_once_into_a_served_q8_model(tmp_path, tiny_db, tiny_run, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    model = default_model.build_level("Q8_0", adapter=tiny_run, progress=False)
    assert model.name == "model-Q8_0.gguf" and model.is_file()
    assert model.parent.parent == tmp_path / "home" / "models"
    f16 = model.with_name("model-F16.gguf")
    assert f16.is_file()

    run = json.loads((tiny_run / "genrec_run.json").read_text())
    provenance = read_provenance(model)
    assert provenance["catalog_sha256"] == run["catalog_sha256"]
    assert provenance["history_len"] == 4

    # Cached: a second call builds nothing (same files, untouched).
    stamps = (os.stat(model).st_mtime_ns, os.stat(f16).st_mtime_ns)
    assert default_model.build_level("Q8_0", adapter=tiny_run, progress=False) == model
    assert (os.stat(model).st_mtime_ns, os.stat(f16).st_mtime_ns) == stamps

    user = next(u for u, items in TINY_HISTORIES.items() if 3 <= len(items) <= 8)
    with Recommender.open(model, tiny_db, threads=1) as rec:
        recs = rec.recommend(user=user, k=3)
    seen = set(TINY_HISTORIES[user])
    assert len(recs.items) == 3
    assert all(not set(r.item_ids) & seen for r in recs.items)
    assert recs.prior == "none"  # this adapter ships no collaborative prior


def test_the_shipped_prior_follows_the_adapter_next_to_the_model(tmp_path, tiny_db, tiny_run, monkeypatch):
    """A cf-prior beside the adapter is copied beside the built GGUFs (and replaced when re-tuned), not
    baked into the model's cache key: the served model fuses it."""
    from genrec_edge import cf

    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    with HistoryDB.open(tiny_db, readonly=True) as db:
        prior = cf.popularity_prior(list(db.sequences()), db.catalog(), weight=0.5)
    prior.save(tiny_run)
    model = default_model.build_level("Q8_0", adapter=tiny_run, progress=False)
    assert json.loads((model.parent / cf.SIDECAR_JSON).read_text())["weight"] == 0.5
    with Recommender.open(model, tiny_db, threads=1) as rec:
        assert rec.recommend(user=1, k=3).prior == "pop"
    prior.with_weight(2.0).save(tiny_run)  # re-tuned: same model, new λ
    again = default_model.build_level("Q8_0", adapter=tiny_run, progress=False)
    assert again == model and json.loads((model.parent / cf.SIDECAR_JSON).read_text())["weight"] == 2.0


def test_no_shipped_adapter_means_no_build(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model.paths, "DEFAULT_ADAPTER", tmp_path / "nothing-here")
    assert default_model.shipped_adapter() is None


def test_default_model_refuses_another_catalog_before_building(tmp_path, tiny_db, monkeypatch, capsys):
    """The shipped adapter is for ml-latest-small: another database fails in milliseconds, nothing built."""
    from genrec_edge.cli import main

    if default_model.shipped_adapter() is None:
        pytest.skip("this build ships no default adapter")
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    user = next(iter(TINY_HISTORIES))
    assert main(["recommend", "--db", str(tiny_db), "--user", str(user)]) == 8
    assert "the default model was trained for catalog" in capsys.readouterr().err
    assert main(["recommend", "--db", str(tiny_db), "--user", "99999"]) == 4
    assert "unknown user 99999" in capsys.readouterr().err
    assert not (tmp_path / "home" / "models").exists()
