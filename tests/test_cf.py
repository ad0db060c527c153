"""The collaborative prior (genrec_edge.cf): numpy SASRec = torch SASRec, the sidecar, and the fused
recommender end to end on a tiny GGUF, a real SQLite file and real llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_HISTORIES, TINY_TITLES
from test_evaluate import comparable
from test_recommend import cache_home  # noqa: F401
from tinymodel import DEFAULT_TITLES

from genrec_edge import cf
from genrec_edge.catalog import Catalog
from genrec_edge.cli import main
from genrec_edge.errors import CatalogMismatchError, CorruptModelError, NotFoundError, UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.prompts import Example


@pytest.fixture(scope="module")
def sasrec_model(tiny_movielens_dir, tmp_path_factory):
    from genrec_edge.baselines import train_sasrec
    from genrec_edge.ingest import ingest

    path = tmp_path_factory.mktemp("cf") / "cf.db"
    ingest(path, "movielens-csv", tiny_movielens_dir, progress=False)
    with HistoryDB.open(path, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    model = train_sasrec(sequences, catalog, hidden=16, heads=2, max_len=6, epochs=4, eval_every=2,
                         dropout=0.1, progress=False)
    return model, sequences, catalog


def test_numpy_sasrec_equals_torch(sasrec_model):
    model, sequences, catalog = sasrec_model
    prior = cf.sasrec_prior(model)
    examples = [Example(u, tuple(seq[:-1]), seq[-1]) for u, seq in sequences if len(seq) > 1]
    examples.append(Example(99, tuple(catalog.item_ids[:12]), catalog.item_ids[12]))  # longer than max_len
    torch_scores = model.title_scores(examples).numpy()
    for row, ex in enumerate(examples):
        ours = prior.title_scores(ex.history)
        unseen = np.isfinite(torch_scores[row])
        assert unseen.sum() > 0
        np.testing.assert_allclose(ours[unseen], torch_scores[row][unseen], atol=1e-4, rtol=1e-5)


def test_log_probs_are_a_distribution_over_unseen_titles(sasrec_model):
    model, sequences, catalog = sasrec_model
    prior = cf.sasrec_prior(model)
    seen = np.zeros(len(prior.titles), dtype=bool)
    seen[:5] = True
    logp = prior.log_probs(list(catalog.item_ids[:5]), seen)
    assert np.isneginf(logp[:5]).all()
    assert np.exp(logp[5:]).sum() == pytest.approx(1.0)


def test_sidecar_round_trip_and_refusals(sasrec_model, tmp_path):
    model, sequences, catalog = sasrec_model
    prior = cf.sasrec_prior(model, weight=1.5, variant="max")
    prior.save(tmp_path / "m")
    loaded = cf.CFPrior.load(tmp_path / "m", catalog)
    assert (loaded.kind, loaded.weight, loaded.config.variant) == ("sasrec", 1.5, "max")
    history = list(catalog.item_ids[:4])
    np.testing.assert_array_equal(loaded.title_scores(history), prior.title_scores(history))
    assert json.loads((tmp_path / "m" / cf.SIDECAR_JSON).read_text())["sasrec"]["hidden"] == 16

    other = Catalog.from_pairs([(1, "Something Else (2000)")] + list(TINY_TITLES.items())[1:])
    with pytest.raises(CatalogMismatchError):
        cf.CFPrior.load(tmp_path / "m", other)
    with pytest.raises(NotFoundError):
        cf.CFPrior.load(tmp_path / "nothing", catalog)
    (tmp_path / "m" / cf.SIDECAR_WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptModelError):
        cf.CFPrior.load(tmp_path / "m", catalog)
    (tmp_path / "m" / cf.SIDECAR_JSON).write_text("{not json")
    with pytest.raises(CorruptModelError):
        cf.CFPrior.load(tmp_path / "m", catalog)
    with pytest.raises(UsageError):
        cf.PriorConfig("sasrec", -1.0)
    with pytest.raises(UsageError):
        cf.PriorConfig("knn", 1.0)


def test_sidecar_with_wrong_shapes_is_refused(sasrec_model, tmp_path):
    model, _, catalog = sasrec_model
    prior = cf.sasrec_prior(model)
    prior.weights = dict(prior.weights, **{"item_emb.weight": prior.weights["item_emb.weight"][:-1]})
    prior.save(tmp_path)
    with pytest.raises(CorruptModelError, match="item_emb.weight"):
        cf.CFPrior.load(tmp_path, catalog)


def test_popularity_prior_counts_the_training_part_only(tiny_db):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    prior = cf.popularity_prior(sequences, catalog)
    counts = np.expm1(prior.title_log_counts).round()
    expected = {}
    for seq in TINY_HISTORIES.values():
        for item in seq[: max(0, len(seq) - 2)]:
            expected[TINY_TITLES[item]] = expected.get(TINY_TITLES[item], 0) + 1
    for j, title in enumerate(prior.titles):
        assert counts[j] == expected.get(title, 0)
    prior.save(tmp_path_pop := tiny_db.parent / "pop")
    again = cf.CFPrior.load(tmp_path_pop, catalog)
    np.testing.assert_allclose(again.title_log_counts, prior.title_log_counts)
    assert not (tmp_path_pop / cf.SIDECAR_WEIGHTS).exists()


# ------------------------------------------------------------------------------ fused recommender
@pytest.fixture
def model_with_prior(tiny_model, tiny_db, tmp_path, sasrec_model):  # noqa: F811
    """The tiny GGUF copied next to a SASRec sidecar for the tiny database's catalog."""
    import shutil

    _, _, catalog = sasrec_model
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert db.catalog().sha256 == catalog.sha256
    folder = tmp_path / "fused"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "model.gguf")
    cf.sasrec_prior(sasrec_model[0], weight=2.0).save(folder)
    return folder / "model.gguf"


def test_fused_recommendation_equals_brute_force_fused_scoring(model_with_prior, tiny_db, cache_home):  # noqa: F811
    from genrec_edge.recommend import Recommender

    n_titles = len(DEFAULT_TITLES)
    with Recommender.open(model_with_prior, tiny_db, beam=n_titles, warn=lambda m: None) as rec:
        assert rec.default_prior == "sasrec"
        fused = rec.recommend(user=4, k=5)
        plain = rec.recommend(user=4, k=5, prior="none")
        everything = rec.recommend(user=4, k=n_titles, prior="none")  # every unseen title's LM score
        prior = rec.priors["sasrec"]
    assert fused.prior == "sasrec" and fused.prior_weight == 2.0 and plain.prior == "none"
    lm = {r.title: r.score for r in everything.items}
    seen = np.zeros(n_titles, dtype=bool)
    user_titles = [TINY_TITLES[i] for i in TINY_HISTORIES[4]]
    seen[[prior.titles.index(t) for t in user_titles]] = True
    logp = prior.log_probs(TINY_HISTORIES[4], seen)
    expected = sorted(lm, key=lambda t: -(lm[t] + 2.0 * logp[prior.titles.index(t)]))[:5]
    assert [r.title for r in fused.items] == expected
    for r in fused.items:
        assert r.lm_score == pytest.approx(lm[r.title], abs=1e-4)
        assert r.score == pytest.approx(lm[r.title] + 2.0 * logp[prior.titles.index(r.title)], abs=1e-4)
    assert [r.title for r in plain.items] == [r.title for r in everything.items[:5]]


def test_fused_recommendation_with_exclude_and_only_equals_brute_force(model_with_prior, tiny_db, cache_home):  # noqa: F811
    """Excluded items, and items outside ``only``, are treated as seen: by the search and by the prior."""
    from genrec_edge.recommend import Recommender

    n_titles = len(DEFAULT_TITLES)
    first_id = {t: min(i for i, title in TINY_TITLES.items() if title == t) for t in set(TINY_TITLES.values())}
    with Recommender.open(model_with_prior, tiny_db, beam=n_titles, warn=lambda m: None) as rec:
        everything = rec.recommend(user=4, k=n_titles, prior="none")
        lm = {r.title: r.score for r in everything.items}
        unseen = list(lm)
        exclude = [first_id[t] for t in unseen[:2]]
        only = [first_id[t] for t in unseen[1::2]]
        fused = rec.recommend(user=4, k=4, exclude=exclude, only=only)
        prior = rec.priors["sasrec"]
    allowed = [t for t in unseen[1::2] if t != unseen[1]]
    seen = np.ones(n_titles, dtype=bool)
    seen[[prior.titles.index(t) for t in allowed]] = False
    logp = prior.log_probs(TINY_HISTORIES[4], seen)
    expected = sorted(allowed, key=lambda t: -(lm[t] + 2.0 * logp[prior.titles.index(t)]))[:4]
    assert [r.title for r in fused.items] == expected
    for r in fused.items:
        assert r.score == pytest.approx(lm[r.title] + 2.0 * logp[prior.titles.index(r.title)], abs=1e-4)


def test_prior_choices_through_the_cli(model_with_prior, tiny_db, cache_home, capsys):  # noqa: F811
    base = ["recommend", "--user", "4", "--k", "3", "--db", str(tiny_db), "--model", str(model_with_prior), "--json"]
    for args, kind, weight in [([], "sasrec", 2.0), (["--prior", "none"], "none", 0.0),
                               (["--prior", "pop", "--prior-weight", "0.5"], "pop", 0.5),
                               (["--prior-weight", "1"], "sasrec", 1.0)]:
        assert main(base + args) == 0
        payload = json.loads(capsys.readouterr().out)
        assert (payload["prior"], payload["prior_weight"]) == (kind, weight)
    assert main(base + ["--prior", "knn"]) == 2
    assert "unknown prior" in capsys.readouterr().err


def test_an_evaluation_all_in_its_log_opens_no_model_and_names_runs_as_before(
        model_with_prior, tiny_db, tmp_path, cache_home, capsys, monkeypatch):  # noqa: F811
    """A rerun over a complete log takes every result from it without loading the model: the runs keep the names
    the opened model gave them (its default prior, or the one asked for), and the report is the same."""
    from genrec_edge import pool, recommend

    log = tmp_path / "results.jsonl"
    base = ["evaluate", "--db", str(tiny_db), "--out", str(log), "--model", str(model_with_prior), "--users", "all",
            "--json"]
    runs = {"LLM model +sasrec": [], "LLM model +pop λ=0.5": ["--prior", "pop", "--prior-weight", "0.5"]}
    first = {}
    for name, args in runs.items():
        assert main([*base, *args, "--workers", "1"]) == 0
        first[name] = json.loads(capsys.readouterr().out)
        assert list(first[name]["recommenders"]) == [name]
    opened = []
    monkeypatch.setattr(recommend.Recommender, "open", classmethod(lambda cls, *a, **kw: opened.append(a)))
    monkeypatch.setattr(pool.RecommenderPool, "open", classmethod(lambda cls, *a, **kw: opened.append(a)))
    for name, args in runs.items():
        assert main([*base, *args]) == 0
        again = json.loads(capsys.readouterr().out)
        assert opened == []
        assert list(again["recommenders"]) == [name]
        assert again["recommenders"][name]["resumed"] == len(again["users"]) > 0
        assert comparable(again) == comparable(first[name])


def test_a_resumed_batch_compares_the_prior_it_resolves_to(
        model_with_prior, tiny_db, tmp_path, cache_home, capsys):  # noqa: F811
    users = tmp_path / "users.txt"
    users.write_text("4\n", encoding="utf-8")
    out = tmp_path / "recs.jsonl"
    base = ["recommend", "--users-file", str(users), "--out", str(out), "--k", "3", "--db", str(tiny_db),
            "--model", str(model_with_prior)]
    assert main(base) == 0
    # Restating the default (the model's sasrec prior at its λ = 2) is the same run: it resumes.
    users.write_text("4\n2\n", encoding="utf-8")
    assert main(base + ["--prior", "sasrec", "--prior-weight", "2"]) == 0
    assert "1 already there" in capsys.readouterr().out
    # A prior directory whose files change between two runs is another prior: no mixing in one file.
    pop_dir = tmp_path / "pop"
    pop_dir.mkdir()
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(pop_dir)]) == 0
    other = tmp_path / "pop.jsonl"
    users.write_text("4\n", encoding="utf-8")
    assert main([*base, "--out", str(other), "--prior", str(pop_dir)]) == 0
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(pop_dir), "--force",
                 "--weight", "5"]) == 0
    users.write_text("4\n2\n", encoding="utf-8")
    capsys.readouterr()
    assert main([*base, "--out", str(other), "--prior", str(pop_dir)]) == 2
    assert "(prior differ)" in capsys.readouterr().err


def test_asking_for_a_prior_the_model_does_not_have(tiny_model, tiny_db, cache_home, capsys):  # noqa: F811
    rc = main(["recommend", "--user", "4", "--db", str(tiny_db), "--model", str(tiny_model), "--prior", "sasrec"])
    err = capsys.readouterr().err
    assert rc == 4 and "no sasrec prior" in err and "Traceback" not in err


@pytest.mark.parametrize("candidates", [5, 40])
def test_rerank_scores_the_priors_top_titles_exactly(model_with_prior, tiny_db, cache_home, candidates):  # noqa: F811
    """variant rerank: the prior's top candidates, ranked by exact LM score + λ log P_CF."""
    from dataclasses import replace

    from genrec_edge.recommend import Recommender

    n_titles = len(DEFAULT_TITLES)
    folder = model_with_prior.parent
    prior = cf.CFPrior.load(folder, cf_catalog(tiny_db))
    cf.CFPrior(replace(prior.config, variant="rerank", candidates=candidates), prior.titles, prior.item_title,
               prior.item_index, prior.weights).save(folder)
    with Recommender.open(model_with_prior, tiny_db, beam=n_titles, warn=lambda m: None) as rec:
        got = rec.recommend(user=4, k=3)
        everything = rec.recommend(user=4, k=n_titles, prior="none")
    lm = {r.title: r.score for r in everything.items}
    seen = np.zeros(n_titles, dtype=bool)
    seen[[prior.titles.index(TINY_TITLES[i]) for i in TINY_HISTORIES[4]]] = True
    logp = prior.log_probs(TINY_HISTORIES[4], seen)
    pool = [prior.titles[j] for j in np.argsort(-logp, kind="stable")[:candidates] if np.isfinite(logp[j])]
    expected = sorted(pool, key=lambda t: -(lm[t] + 2.0 * logp[prior.titles.index(t)]))[:3]
    assert [r.title for r in got.items] == expected
    for r in got.items:
        assert r.lm_score == pytest.approx(lm[r.title], abs=1e-4)
        assert r.score == pytest.approx(lm[r.title] + 2.0 * logp[prior.titles.index(r.title)], abs=1e-4)


def cf_catalog(db):
    with HistoryDB.open(db, readonly=True) as history:
        return history.catalog()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\udcff"], ids=["not-json", "a-list", "not-utf8"])
def test_every_json_object_file_refuses_bad_content_with_one_line(tmp_path, capsys, content):
    """Prior sidecar, `prior show`, a training run's config and a `train --config` file share one reader:
    each bad file is its error class and one line naming the file, never an internal error."""
    from genrec_edge.runs import RUN_CONFIG, read_run_config
    from genrec_edge.train.config import resolve_config

    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("utf-8", "surrogateescape"))
    (tmp_path / cf.SIDECAR_JSON).write_bytes(bad.read_bytes())
    (tmp_path / RUN_CONFIG).write_bytes(bad.read_bytes())
    catalog = Catalog.from_pairs(list(TINY_TITLES.items()))
    for call, error in ((lambda: cf.CFPrior.load(tmp_path, catalog), CorruptModelError),
                        (lambda: read_run_config(tmp_path), CorruptModelError),
                        (lambda: resolve_config(bad), UsageError)):
        with pytest.raises(error) as info:
            call()
        assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert main(["prior", "show", "--prior-dir", str(tmp_path)]) == CorruptModelError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: collaborative prior ") and err.count("\n") == 1, err


@pytest.mark.parametrize("bad, says", [
    (["--variant", "Max"], "unknown prior variant 'Max'"),
    (["--weight", "2000"], "prior weight must be a number from 0 to 1000"),
    (["--out", "FILE"], "where a folder is needed"),
])
def test_prior_build_checks_its_options_before_sasrec_trains(tiny_db, tmp_path, capsys, bad, says):
    """A typo in --variant or --weight, or a file as --out, was found only when the trained SASRec was saved:
    after minutes of training at the default recipe."""
    (tmp_path / "FILE").write_text("not a folder\n", encoding="utf-8")
    args = ["prior", "build", "--kind", "sasrec", "--epochs", "1", "--db", str(tiny_db), "--out",
            str(tmp_path / "p")] + [str(tmp_path / "FILE") if a == "FILE" else a for a in bad]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc in (2, 14) and says in err, err
    assert "SASRec" not in err  # no training (its progress bar) before the refusal
    assert not (tmp_path / "p").exists()


def test_prior_pop_is_the_prior_that_prior_build_counts(tiny_model, tiny_db, tmp_path, cache_home):  # noqa: F811
    """--prior pop on a model without a pop sidecar counted the 'sum' variant, while `prior build --kind pop`
    writes 'max' (the default's): the same words, λ and counts searched differently (other titles)."""
    import shutil

    from genrec_edge.recommend import Recommender

    folder = tmp_path / "pop"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "model.gguf")
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(folder)]) == 0
    with Recommender.open(tiny_model, tiny_db, beam=1, warn=lambda m: None) as counted, \
            Recommender.open(folder / "model.gguf", tiny_db, beam=1, warn=lambda m: None) as built:
        for user in TINY_HISTORIES:
            a, b = counted.recommend(user=user, k=1, prior="pop"), built.recommend(user=user, k=1)
            assert [(r.title, r.score) for r in a.items] == [(r.title, r.score) for r in b.items], user


SCORE_SCRIPT = """
import sys
import numpy as np
from genrec_edge.cf import sasrec_item_scores
data = np.load(sys.argv[1])
weights = {k: data[k] for k in data.files}
config = {"max_len": 50, "hidden": 64, "heads": 2, "blocks": 2}
out = [sasrec_item_scores(weights, config, list(range(n))) for n in (50, 7, 0)]
sys.stdout.buffer.write(b"".join(o.tobytes() for o in out))
"""


def test_sasrec_scores_do_not_depend_on_the_blas_thread_count(tmp_path):
    """A Ray worker runs with one BLAS thread, a laptop with all cores; OpenBLAS split the prior's matrix
    products between them, and a fused score moved in its last bits (~1e-6): a Ray batch file was not the
    local one. The shapes are the shipped prior's (ml-latest-small), where OpenBLAS does use its threads."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    d, items, max_len = 64, 9742, 50
    weights = {"item_emb.weight": rng.standard_normal((items + 1, d)), "pos_emb.weight": rng.standard_normal((max_len, d)),
               "final_norm.weight": rng.random(d) + 0.5, "final_norm.bias": rng.standard_normal(d) * 0.1}
    for b in range(2):
        p = f"blocks.{b}."
        weights |= {p + "attn_norm.weight": rng.random(d) + 0.5, p + "attn_norm.bias": rng.standard_normal(d) * 0.1,
                    p + "qkv.weight": rng.standard_normal((3 * d, d)) / 8, p + "qkv.bias": rng.standard_normal(3 * d) * 0.1,
                    p + "attn_out.weight": rng.standard_normal((d, d)) / 8, p + "attn_out.bias": rng.standard_normal(d) * 0.1,
                    p + "ffn_norm.weight": rng.random(d) + 0.5, p + "ffn_norm.bias": rng.standard_normal(d) * 0.1,
                    p + "ffn.0.weight": rng.standard_normal((d, d)) / 8, p + "ffn.0.bias": rng.standard_normal(d) * 0.1,
                    p + "ffn.3.weight": rng.standard_normal((d, d)) / 8, p + "ffn.3.bias": rng.standard_normal(d) * 0.1}
    np.savez(tmp_path / "w.npz", **{k: v.astype(np.float32) for k, v in weights.items()})
    outputs = []
    for threads in ("1", "2", "4"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", SCORE_SCRIPT, str(tmp_path / "w.npz")], env=env,
                              capture_output=True, check=True)
        outputs.append(done.stdout)
    assert len(outputs[0]) == 3 * items * 4
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
