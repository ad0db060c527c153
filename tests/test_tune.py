"""Choosing λ (genrec_edge.tune, `genrec-edge prior build|tune|show`) on the tiny GGUF and database."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from conftest import TINY_TITLES
from test_recommend import cache_home  # noqa: F401

from genrec_edge import cf
from genrec_edge.baselines import split_examples
from genrec_edge.cli import main
from genrec_edge.history import HistoryDB
from genrec_edge.recommend import Recommender
from genrec_edge.tune import tune_weight


@pytest.fixture
def model_dir(tiny_model, tmp_path):  # noqa: F811
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "model.gguf")
    return folder


def test_score_titles_is_the_exact_lm_score(tiny_model, tiny_db, cache_home):  # noqa: F811
    history = [TINY_TITLES[10], TINY_TITLES[20]]
    titles = list(TINY_TITLES.values())
    with Recommender.open(tiny_model, tiny_db, beam=len(titles), prior="none", warn=lambda m: None) as rec:
        everything = rec.rank_titles(history, set(), k=len(titles))  # nothing excluded: every title's score
        truth = dict(zip(everything.titles, everything.lm_scores, strict=True))
    with Recommender.open(tiny_model, tiny_db, beam=4, prior="none", warn=lambda m: None) as narrow:
        got = narrow.score_titles(history, titles[3:14])  # 11 titles in groups of the capacity (4)
    assert list(got) == titles[3:14]
    for title, score in got.items():
        assert score == pytest.approx(truth[title], abs=1e-4)


def test_tune_extremes_are_the_lm_and_the_prior_alone(tiny_model, tiny_db, cache_home):  # noqa: F811
    with HistoryDB.open(tiny_db, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    examples = split_examples(sequences, "valid")
    prior = cf.popularity_prior(sequences, catalog)
    with Recommender.open(tiny_model, tiny_db, beam=40, prior="none", warn=lambda m: None) as rec:
        result = tune_weight(rec, prior, examples, catalog, weights=(0, 1e6), n_lm=20, n_cf=20, progress=False)
        lm_hits = []
        for ex in examples:
            history = [catalog.title_of(i) for i in ex.history]
            top = rec.rank_titles(history, set(history), k=10).titles
            lm_hits.append(catalog.title_of(ex.item) in top)
    assert result.n_users == len(examples) and result.weights == (0.0, 1e6)
    assert result.hr10[0.0] == pytest.approx(np.mean(lm_hits))
    pop_hits = []
    for ex in examples:
        seen = {catalog.title_of(i) for i in ex.history}
        ranked = [t for t in sorted(prior.titles, key=lambda t: (-prior.title_log_counts[prior.titles.index(t)],
                                                                 prior.titles.index(t))) if t not in seen]
        pop_hits.append(catalog.title_of(ex.item) in ranked[:10])
    assert result.hr10[1e6] == pytest.approx(np.mean(pop_hits))
    assert result.best_weight in (0.0, 1e6) and 0 <= result.candidates_hold_target <= 1


def test_prior_build_tune_show_cli(model_dir, tiny_db, cache_home, capsys):  # noqa: F811
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(model_dir)]) == 0
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(model_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    model = model_dir / "model.gguf"
    rc = main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--users", "all",
               "--weights", "0,0.5,2"])
    out = capsys.readouterr().out
    assert rc == 0 and "validation users" in out
    assert "is a small sample" in out and "close to a guess" in " ".join(out.split())
    saved = json.loads((model_dir / cf.SIDECAR_JSON).read_text())
    assert saved["weight"] in (0.0, 0.5, 2.0) and saved["tuned"]["split"] == "valid"
    assert [row["weight"] for row in saved["tuned"]["table"]] == [0.0, 0.5, 2.0]
    assert main(["prior", "show", "--model", str(model)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "pop" and "title_counts" not in shown["trained_on"]
    # The tiny model's ranking within the prior's top 7 is the same for λ 0.5 and 9: a tie is no choice, and
    # the smallest λ it used to write could switch the prior off. Nothing is written.
    before = (model_dir / cf.SIDECAR_JSON).read_bytes()
    rc = main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--users", "all", "--weights", "0.5,9",
               "--variant", "rerank", "--n-cf", "7"])
    assert rc == 2 and "every λ scored the same on these 6 users" in capsys.readouterr().err
    assert (model_dir / cf.SIDECAR_JSON).read_bytes() == before
    rc = main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--users", "all", "--weights", "0,1000",
               "--variant", "rerank", "--n-cf", "7"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((model_dir / cf.SIDECAR_JSON).read_text())
    assert (saved["variant"], saved["candidates"]) == ("rerank", 7) and saved["weight"] in (0.0, 1000.0)
    assert "re-ranked" in saved["tuned"]["metric"]
    assert main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--variant", "best"]) == 2
    assert main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--weights", "a,b"]) == 2
    assert main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--users", "-3"]) == 2
    capsys.readouterr()
    for grid, message in (("nan", "nan is not a λ"), ("1,inf", "inf is not a λ"), ("-1,1", "-1 is not a λ"),
                          ("2", "two or more different λ"), ("2,2.0", "two or more different λ")):
        started = time.perf_counter()
        assert main(["prior", "tune", "--model", str(model), "--db", str(tiny_db), "--weights", grid]) == 2
        assert message in capsys.readouterr().err and time.perf_counter() - started < 5  # before the tuning
    # Options that would be ignored: SASRec's training options for a counted prior; two places for one prior.
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(model_dir), "--force",
                 "--epochs", "0", "--seed", "9"]) == 2
    assert "--epochs, --seed apply to --kind sasrec" in capsys.readouterr().err
    assert main(["prior", "show", "--model", str(model), "--prior-dir", str(model_dir)]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("users", ["abc", "0", "-3", "1.5"])
@pytest.mark.parametrize("command", [["prior", "tune"], ["evaluate", "--pop"]])
def test_users_option_is_checked_the_same_way_everywhere(tiny_db, capsys, command, users):
    assert main([*command, "--db", str(tiny_db), "--users", users]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --users ") and err.count("\n") == 1, err


def test_a_dry_run_marks_no_lambda_when_every_lambda_ties(model_dir, tiny_db, cache_home, capsys):  # noqa: F811
    """--dry-run starred the smallest λ of a tie as the choice, the choice the real run refuses to write."""
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(model_dir)]) == 0
    capsys.readouterr()
    rc = main(["prior", "tune", "--model", str(model_dir / "model.gguf"), "--db", str(tiny_db), "--users", "all",
               "--weights", "0.5,9", "--variant", "rerank", "--n-cf", "7", "--dry-run"])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "0.5" in out and "*" not in out.replace("(* marks a choice)", "")
    assert "every λ scored the same on these 6 users: none is chosen" in out
