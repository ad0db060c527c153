"""Popularity and SASRec on tiny synthetic data with known answers; the baseline CLI on the tiny database."""

from __future__ import annotations

import json
import os

import pytest

# Before torch loads (baselines imports it lazily): spin-waiting OpenMP threads collapse under the CPU
# contention of a shared test machine (a 3 s training took 89 s). `make test` exports the same.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from genrec_edge.baselines import (
    SASRecModel,
    popularity,
    split_examples,
    train_sasrec,
    training_part,
)
from genrec_edge.catalog import Catalog
from genrec_edge.cli import main
from genrec_edge.errors import CatalogMismatchError, NotFoundError, UsageError
from genrec_edge.evaluation import evaluate, evaluate_scores, from_rankings, seen_titles

# Items 3 and 4 share the title "Twin".
SMALL_CATALOG = Catalog.from_pairs([(1, "A"), (2, "B"), (3, "Twin"), (4, "Twin"), (5, "C")])
SMALL_SEQUENCES = [(1, [1, 2, 5]), (2, [2, 4, 1]), (3, [3, 2]), (4, [4])]


def test_training_part_holds_out_the_last_one_or_two_items():
    assert training_part(SMALL_SEQUENCES, "test") == [(1, [1, 2]), (2, [2, 4]), (3, [3]), (4, [])]
    assert training_part(SMALL_SEQUENCES, "valid") == [(1, [1]), (2, [2]), (3, []), (4, [])]
    with pytest.raises(UsageError, match="unknown split"):
        training_part(SMALL_SEQUENCES, "train")


def test_popularity_on_the_test_split_by_hand():
    ranker = popularity(SMALL_SEQUENCES, SMALL_CATALOG, split="test")
    # Counted on [1, 2], [2, 4], [3], []: A 1, B 2, Twin 2 (items 4 and 3), C 0 - the test items 5, 1, 2
    # are not counted (C would be 1 otherwise). B and Twin tie: B's item id 2 < Twin's 3.
    assert ranker.counts == {"B": 2, "Twin": 2, "A": 1, "C": 0}
    assert ranker.ranked_titles == ("B", "Twin", "A", "C")
    examples = split_examples(SMALL_SEQUENCES, "test")
    assert [ex.user for ex in examples] == [1, 2, 3]
    # user 1 saw A, B -> [Twin, C], target C at 2; user 2 saw B, Twin -> [A, C], target A at 1;
    # user 3 saw Twin -> [B, A, C], target B at 1. A title is returned as its first item id (Twin -> 3).
    assert [ranker.rank(ex) for ex in examples] == [[3, 5], [1, 5], [2, 1, 5]]
    assert ranker.rank(examples[2], k=2) == [2, 1]
    result = evaluate(ranker, examples, SMALL_CATALOG, ks=(1, 2), progress=False)
    assert result.ranks == (2, 1, 1)
    assert result.hr == {1: pytest.approx(2 / 3), 2: 1.0}
    assert result.mrr == pytest.approx((0.5 + 1 + 1) / 3)


def test_popularity_scores_are_the_counts_in_title_order():
    ranker = popularity(SMALL_SEQUENCES, SMALL_CATALOG, split="test")
    examples = split_examples(SMALL_SEQUENCES, "test")
    scores = ranker.scores(examples)
    assert SMALL_CATALOG.unique_titles == ["A", "B", "Twin", "C"]
    assert scores.shape == (3, 4) and scores.tolist() == [[1, 2, 2, 0]] * 3
    vectorised = evaluate_scores(ranker.scores, examples, SMALL_CATALOG, ks=(1, 2), progress=False)
    assert vectorised.ranks == (2, 1, 1)  # as the per-user path above: B before Twin (ties by item id)


def test_popularity_on_the_valid_split_counts_only_earlier_items():
    ranker = popularity(SMALL_SEQUENCES, SMALL_CATALOG, split="valid")
    assert ranker.ranked_titles == ("A", "B", "Twin", "C")  # counted on [1], [2]: A 1, B 1
    examples = split_examples(SMALL_SEQUENCES, "valid")
    result = evaluate(ranker, examples, SMALL_CATALOG, ks=(1, 2), progress=False)
    # user 1: saw A, target B -> [B, Twin, C] rank 1; user 2: saw B, target 4 ("Twin") -> [A, Twin, C] rank 2
    assert result.users == (1, 2) and result.ranks == (1, 2)


def test_unknown_items_are_a_clear_error():
    with pytest.raises(NotFoundError, match="item id 9"):
        popularity([(1, [1, 9])], SMALL_CATALOG)


# ---------------------------------------------------------------------------------------------- SASRec

N_CHAIN = 40
CHAIN_IDS = [100 + k for k in range(N_CHAIN)]  # ids are not positions


def chain_data():
    """Users walk a cycle: item k is always followed by item k + 1 (mod 40). Two extra items share a title."""
    pairs = [(item, f"Movie {item}") for item in CHAIN_IDS] + [(500, "Extra"), (501, "Extra")]
    sequences = []
    for user in range(80):
        start = (user * 7) % N_CHAIN
        length = 8 + user % 6
        sequences.append((user, [CHAIN_IDS[(start + j) % N_CHAIN] for j in range(length)]))
    return sequences, Catalog.from_pairs(pairs)


TINY_SASREC = dict(
    hidden=32,
    heads=2,
    max_len=16,
    batch_size=32,
    lr=5e-3,
    dropout=0.1,
    epochs=20,
    eval_every=5,
    patience=2,
    seed=0,
)


@pytest.fixture(scope="module")
def chain_model():
    sequences, catalog = chain_data()
    # At most 20 epochs of 3 steps: ~10 s on a quiet 2-core CPU.
    model = train_sasrec(sequences, catalog, progress=False, **TINY_SASREC)
    return model, sequences, catalog


def test_sasrec_learns_the_chain_and_beats_popularity(chain_model):
    model, sequences, catalog = chain_model
    examples = split_examples(sequences, "test")
    sasrec = evaluate(from_rankings(examples, model.rank_many(examples)), examples, catalog, progress=False)
    pop = evaluate(popularity(sequences, catalog), examples, catalog, progress=False)
    # Popularity is near-uniform here (~10 of 30 unseen titles); the next item is fully determined.
    assert pop.hr[10] < 0.6
    assert sasrec.hr[1] >= 0.8, sasrec.summary()
    assert sasrec.hr[10] >= pop.hr[10] + 0.35
    assert model.report.best_valid_hr10 >= 0.8
    assert model.report.best_epoch in model.report.valid_hr10
    report = model.report
    assert report.train_loss[report.epochs_run] < report.train_loss[1] / 2


def test_sasrec_scores_path_ranks_like_a_full_sort(chain_model):
    import math

    import torch

    model, sequences, catalog = chain_model
    examples = list(split_examples(sequences, "test"))
    scores = model.title_scores(examples)  # seen titles at -inf
    values, indices = torch.topk(scores, scores.shape[1], dim=1)
    reference = [[model.title_item[j] for v, j in zip(vals, idx, strict=True) if v != -math.inf]
                 for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)]
    assert model.rank_many(examples) == reference  # no exact ties here: one order
    by_topk = evaluate(from_rankings(examples, reference), examples, catalog, progress=False)
    by_scores = evaluate_scores(model.scores, examples, catalog, progress=False, chunk_users=7)
    assert by_scores.ranks == by_topk.ranks and by_scores.summary() == by_topk.summary()


def test_sasrec_rankings_are_unseen_unique_titles(chain_model):
    model, sequences, catalog = chain_model
    example = split_examples(sequences, "test")[0]
    ranking = model.rank(example)
    titles = [catalog.title_of(i) for i in ranking]
    assert len(titles) == len(set(titles)) == len(catalog.unique_titles) - len(seen_titles(example, catalog))
    assert not set(titles) & seen_titles(example, catalog)
    assert "Extra" in titles and 501 not in ranking  # the duplicate pair appears once, as its first id
    assert model.rank(example, k=5) == ranking[:5]


def test_sasrec_save_load_round_trip(chain_model, tmp_path):
    model, sequences, catalog = chain_model
    examples = split_examples(sequences, "test")[:10]
    saved = model.save(tmp_path / "sasrec")
    loaded = SASRecModel.load(saved, catalog)
    assert loaded.rank_many(examples, k=10) == model.rank_many(examples, k=10)
    assert loaded.config == model.config and loaded.report == model.report
    with pytest.raises(UsageError, match="not an empty directory"):
        model.save(saved)
    other = Catalog.from_pairs([(item, f"Film {item}") for item in catalog.item_ids])
    with pytest.raises(CatalogMismatchError):
        SASRecModel.load(saved, other)
    with pytest.raises(NotFoundError):
        SASRecModel.load(tmp_path / "nothing", catalog)


def test_sasrec_is_deterministic_for_a_seed():
    sequences, catalog = chain_data()
    settings = {**TINY_SASREC, "epochs": 3, "eval_every": 3}
    first = train_sasrec(sequences, catalog, progress=False, **settings)
    second = train_sasrec(sequences, catalog, progress=False, **settings)
    assert first.report.train_loss == second.report.train_loss
    with pytest.raises(UsageError, match="heads"):
        train_sasrec(sequences, catalog, progress=False, hidden=30, heads=4)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_pop_json_on_the_tiny_database(tiny_db, capsys):
    rc = main(["baseline", "pop", "--db", str(tiny_db), "--split", "test", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    # Tiny histories: users 1-5, 7, 8 have >= 2 items -> 7 test examples (user 6 has one item).
    assert data["baseline"] == "popularity" and data["n_users"] == 7
    assert set(data["hr"]) == {"1", "5", "10"} and 0.0 <= data["mrr"] <= 1.0
    intervals = data["intervals"]
    assert set(intervals) == {"HR@1", "HR@5", "HR@10", "NDCG@1", "NDCG@5", "NDCG@10", "MRR"}
    assert intervals["HR@10"]["low"] <= data["hr"]["10"] <= intervals["HR@10"]["high"]
    assert intervals["MRR"]["low"] <= data["mrr"] <= intervals["MRR"]["high"]
    assert data["interval"]["confidence"] == 0.95
    assert main(["baseline", "pop", "--db", str(tiny_db)]) == 0  # the table says 7 users are a small sample
    assert "note: 7 users is a small sample" in " ".join(capsys.readouterr().out.split())


def test_cli_sasrec_trains_scores_and_saves(tiny_db, tmp_path, capsys):
    save = tmp_path / "model"
    rc = main(
        [
            "baseline",
            "sasrec",
            "--db",
            str(tiny_db),
            "--epochs",
            "2",
            "--eval-every",
            "1",
            "--hidden",
            "16",
            "--max-len",
            "8",
            "--seed",
            "1",
            "--save",
            str(save),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert data["baseline"] == "SASRec" and data["n_users"] == 7 and data["epochs_run"] == 2
    assert (save / "config.json").is_file() and (save / "model.pt").is_file()


def test_cli_errors_are_one_line(tmp_path, tiny_db, capsys):
    rc = main(["baseline", "pop", "--db", str(tmp_path / "missing.db")])
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    rc = main(["baseline", "pop", "--db", str(tiny_db), "--split", "train"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown split" in err and len(err.strip().splitlines()) == 1


def test_nothing_to_score_or_count_and_a_nonsense_time_limit_are_errors(tmp_path, tiny_db, capsys):
    # A catalog without interactions: metrics of 0 on 0 users, or a prior counted from nothing, said exit 0.
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (tmp_path / "ml" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    empty = tmp_path / "empty.db"
    assert main(["data", "ingest", "movielens-csv", str(tmp_path / "ml"), "--db", str(empty)]) == 0
    capsys.readouterr()
    for argv, message in ((["baseline", "pop", "--db", str(empty), "--json"], "no user has a test example"),
                          (["prior", "build", "--kind", "pop", "--db", str(empty), "--out", str(tmp_path / "p")],
                           "nothing to count")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()
    for limit in ("nan", "-5", "0"):  # NaN was no limit at all, and "NaN" in the saved config.json
        assert main(["baseline", "sasrec", "--db", str(tiny_db), "--max-seconds", limit, "--epochs", "1"]) == 2
        assert "max_seconds=" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["FILE", "FILE/model"])
def test_sasrec_save_under_a_file_is_refused_before_training(tiny_db, tmp_path, capsys, where):
    """--save FILE/model trained and scored SASRec, then failed to save it (the run was lost)."""
    (tmp_path / "FILE").write_text("not a folder\n", encoding="utf-8")
    rc = main(["baseline", "sasrec", "--db", str(tiny_db), "--epochs", "1", "--hidden", "16", "--max-len", "8",
               "--save", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert rc == 14 and "is a file, where a folder is needed" in err, err
    assert "SASRec" not in err  # refused before its training's progress bar
