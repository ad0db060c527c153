"""Recommender API and `genrec-edge recommend` / `grammar export` on real SQLite + real llama.cpp GGUFs."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from conftest import EMPTY_USER, TINY_HISTORIES, TINY_TITLES
from tinymodel import DEFAULT_TITLES

from genrec_edge.catalog import Catalog
from genrec_edge.cli import main
from genrec_edge.errors import (
    CatalogMismatchError,
    CorruptModelError,
    EmptyHistoryError,
    NotFoundError,
    SearchCancelled,
    UsageError,
)
from genrec_edge.history import HistoryDB
from genrec_edge.prompts import PromptTemplate, build_prompt_ids
from genrec_edge.recommend import Recommender


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def rec(tiny_model, tiny_db, cache_home):
    warnings = []
    with Recommender.open(tiny_model, tiny_db, threads=2, warn=warnings.append) as recommender:
        recommender.warnings = warnings
        yield recommender


def convert_with(tiny_model, out, provenance):
    from genrec_edge.convert import convert

    return convert(tiny_model.parent / "hf", out, outtype="f32", provenance=provenance, progress=False)


def test_user_top_k_are_distinct_unseen_catalog_items(rec, tiny_db):
    result = rec.recommend(user=1, k=5)
    items = result.items
    assert [r.rank for r in items] == [1, 2, 3, 4, 5]
    assert len({r.title for r in items}) == 5
    seen = {TINY_TITLES[i] for i in TINY_HISTORIES[1]}
    assert not {r.title for r in items} & seen
    with HistoryDB.open(tiny_db, readonly=True) as db:
        for r in items:
            assert all(TINY_TITLES[i] == r.title for i in r.item_ids)
            item = db.item(r.item_ids[0])
            assert (r.year, r.genres) == (item.year, item.genres)
    scores = [r.score for r in items]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    t = result.timings
    history = [TINY_TITLES[i] for i in TINY_HISTORIES[1]]
    expected_prompt = build_prompt_ids(rec.engine.tokenize, rec.engine.eos_id, history, PromptTemplate())
    assert t.prompt_tokens == len(expected_prompt)
    assert t.prefilled_tokens == len(expected_prompt) - len(rec.prefix)  # the instruction's cells are kept
    assert t.decode_steps >= 1 and t.decoded_tokens >= t.decode_steps
    assert 0 < t.prefill_ms <= t.total_ms and 0 < t.search_ms <= t.total_ms
    assert rec.warnings and "genrec.catalog_sha256" in rec.warnings[0]  # the base-like tiny model


def test_user_and_history_requests_agree_with_rank_titles(rec):
    history = [TINY_TITLES[i] for i in TINY_HISTORIES[4]]
    by_user = rec.recommend(user=4, k=4)
    by_history = rec.recommend(history=history, k=4)
    ranking = rec.rank_titles(history, set(history), 4)
    assert [r.title for r in by_user.items] == [r.title for r in by_history.items] == list(ranking.titles)
    assert [r.score for r in by_user.items] == pytest.approx(list(ranking.scores), abs=1e-9)


def test_k_larger_than_the_unseen_catalog(rec):
    result = rec.recommend(user=7, k=15)  # 12 of 20 titles seen
    assert len(result.items) == 20 - len(set(TINY_HISTORIES[7]))


def test_bad_requests(rec, tiny_db):
    with pytest.raises(NotFoundError, match="unknown user 999"):
        rec.recommend(user=999)
    with pytest.raises(EmptyHistoryError):
        rec.recommend(user=EMPTY_USER)
    with pytest.raises(EmptyHistoryError):
        rec.recommend(history=[])
    with pytest.raises(NotFoundError, match="did you mean 'Heat \\(1995\\)'"):
        rec.recommend(history=["Heat 1995"])
    with pytest.raises(NotFoundError, match="unknown title 'heat' .*did you mean 'Heat \\(1995\\)'"):
        rec.recommend(history=["heat"])  # too short for a close match: the titles it starts
    with pytest.raises(NotFoundError, match=r"unknown title 'zzqx' \(titles must match the catalog exactly\)$"):
        rec.recommend(history=["zzqx"])
    with pytest.raises(UsageError):
        rec.recommend(user=1, history=["Heat (1995)"])
    with pytest.raises(UsageError):
        rec.recommend(user=1, k=0)
    with pytest.raises(UsageError, match="already"):
        rec.recommend(history=list(DEFAULT_TITLES))


def _answer(result):
    return [(r.title, r.item_ids, r.score, r.lm_score) for r in result.items], result.prior, result.prior_weight


def test_the_result_cache_answers_a_repeated_request_as_its_search_does(tiny_model, tiny_db, cache_home):
    with (Recommender.open(tiny_model, tiny_db, threads=2, cache=2, warn=lambda m: None) as rec,
          Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None) as fresh):
        first, again = rec.recommend(user=1, k=5), rec.recommend(user=1, k=5)
        assert (first.cached, again.cached) == (False, True)
        assert _answer(again) == _answer(first) == _answer(fresh.recommend(user=1, k=5))
        t = again.timings
        assert (t.prefill_ms, t.search_ms, t.decode_steps, t.decoded_tokens) == (0, 0, 0, 0) and t.total_ms > 0
        assert t.prompt_tokens == first.timings.prompt_tokens and again.stats is None
        assert again.to_dict()["cached"] is True and "cached" not in first.to_dict()
        # Another k, prior or λ is another search
        assert not rec.recommend(user=1, k=4).cached
        assert not rec.recommend(user=1, k=5, prior="pop", prior_weight=0.5).cached
        assert rec.recommend(user=1, k=5, prior="pop", prior_weight=0.5).cached
        assert not rec.recommend(user=1, k=5, prior="pop", prior_weight=0.25).cached
        assert not any(rec.recommend(user=1, k=5, first_step=True).cached for _ in range(2))  # never kept

        # A new interaction changes the user's search inputs: searched again, the answer of a fresh recommender
        with HistoryDB.open(tiny_db) as db:
            db.add_interaction(2, first.items[0].item_ids[0], timestamp=2_000_000_000)
        before = rec.recommend(user=2, k=5)
        assert not before.cached and first.items[0].title not in {r.title for r in before.items}
        assert _answer(before) == _answer(fresh.recommend(user=2, k=5))
        with HistoryDB.open(tiny_db) as db:
            db.add_interaction(2, before.items[0].item_ids[0], timestamp=2_000_000_001)
        after = rec.recommend(user=2, k=5)
        assert not after.cached and _answer(after) == _answer(fresh.recommend(user=2, k=5)) != _answer(before)

        # Least recently used out first (2 kept): user 2 was just used, so user 3 pushes out the older search
        rec.recommend(user=3, k=5)
        assert rec.recommend(user=2, k=5).cached and rec.recommend(user=3, k=5).cached
        assert not rec.recommend(user=1, k=5, prior="pop", prior_weight=0.25).cached

        # A batch mixes hits and searches; each answer is still the one a search gives
        many = rec.recommend_many([3, 4, [TINY_TITLES[10]]], k=5)
        assert [r.cached for r in many] == [True, False, False]
        assert [_answer(r) for r in many] == [_answer(r) for r in fresh.recommend_many([3, 4, [TINY_TITLES[10]]], k=5)]
        assert len(rec._cache) == 2
    assert not fresh._cache  # cache=0 (the default) keeps nothing


@pytest.mark.parametrize("cache", [-1, True, 1.5])
def test_a_bad_cache_size_is_refused(tiny_model, tiny_db, cache_home, cache):
    with pytest.raises(UsageError, match="result cache"):
        Recommender.open(tiny_model, tiny_db, cache=cache, warn=lambda m: None)


def test_user_who_has_seen_everything(tiny_model, tiny_db, cache_home):
    with HistoryDB.open(tiny_db) as db:
        for n, item_id in enumerate(TINY_TITLES):
            db.add_interaction(42, item_id, timestamp=2_000_000_000 + n)
    with Recommender.open(tiny_model, tiny_db, warn=lambda m: None) as recommender:
        with pytest.raises(UsageError, match="every catalog title"):
            recommender.recommend(user=42)


def test_duplicate_titles_are_one_result_with_all_ids(tiny_model, tiny_db, cache_home):
    conn = sqlite3.connect(tiny_db)
    with conn:
        conn.execute("INSERT INTO items(id, title, year, genres) VALUES (999, 'Heat (1995)', 1995, 'Drama')")
    conn.close()
    with Recommender.open(tiny_model, tiny_db, warn=lambda m: None) as recommender:
        history = [t for t in DEFAULT_TITLES if t not in ("Heat (1995)", "Balto (1995)")]
        result = recommender.recommend(history=history, k=5)
        heat = [r for r in result.items if r.title == "Heat (1995)"]
        assert len(result.items) == 2 and len(heat) == 1 and heat[0].item_ids == (30, 999)
        # A title is seen if any of its ids is: user 1 saw item 30.
        everything_unseen = recommender.recommend(user=1, k=16).items  # user 1 saw item 30 of the pair
        assert len(everything_unseen) == 20 - 5 and "Heat (1995)" not in {r.title for r in everything_unseen}
        # Filters act on titles too: either id excludes the pair, either id allows it.
        assert [r.title for r in recommender.recommend(history=history, k=5, exclude=[999]).items] == ["Balto (1995)"]
        assert [r.item_ids for r in recommender.recommend(history=history, k=5, only=[30]).items] == [(30, 999)]


def test_catalog_provenance_and_prompt_template(tiny_model, tiny_db, tmp_path, cache_home):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        sha = db.catalog().sha256
    foreign = convert_with(tiny_model, tmp_path / "foreign.gguf", {"catalog_sha256": "0" * 64})
    with pytest.raises(CatalogMismatchError):
        Recommender.open(foreign, tiny_db)
    template = {"instruction": "Next:", "history_len": 2, "name": "short"}
    own = convert_with(tiny_model, tmp_path / "own.gguf", {"catalog_sha256": sha, "prompt_template": template})
    warnings = []
    with Recommender.open(own, tiny_db, warn=warnings.append) as recommender:
        assert warnings == []
        assert recommender.template == PromptTemplate.from_dict(template)
        result = recommender.recommend(user=2, k=3)
        last_two = [TINY_TITLES[i] for i in TINY_HISTORIES[2][-2:]]
        expected = build_prompt_ids(recommender.engine.tokenize, recommender.engine.eos_id, last_two,
                                    PromptTemplate.from_dict(template))
        assert result.timings.prompt_tokens == len(expected)
        seen = {TINY_TITLES[i] for i in TINY_HISTORIES[2]}
        assert not {r.title for r in result.items} & seen  # all seen excluded, not only the last two


def test_missing_and_corrupt_models(tiny_db, tiny_model, tmp_path, cache_home):
    with pytest.raises(NotFoundError):
        Recommender.open(tmp_path / "missing.gguf", tiny_db)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CorruptModelError):
        Recommender.open(corrupt, tiny_db)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[:100_000])
    with pytest.raises(CorruptModelError):
        Recommender.open(truncated, tiny_db)


def test_one_instance_is_safe_from_several_threads(rec):
    users = [1, 2, 8]
    serial = {u: [r.title for r in rec.recommend(user=u, k=3).items] for u in users}
    results, errors = {}, []

    def work(user):
        try:
            results[user] = [r.title for r in rec.recommend(user=user, k=3).items]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == serial


def test_sampling_returns_distinct_unseen_catalog_titles(rec):
    result = rec.recommend(user=1, k=2, sample=True, seed=7, max_tries=12)
    titles = [r.title for r in result.items]
    assert 1 <= len(titles) <= 2 and len(set(titles)) == len(titles)
    assert set(titles) <= set(DEFAULT_TITLES) - {TINY_TITLES[i] for i in TINY_HISTORIES[1]}
    assert result.timings.decode_steps >= len(titles)
    again = rec.recommend(user=1, k=2, sample=True, seed=7, max_tries=12)
    assert [r.title for r in again.items] == titles  # seeded
    calls = []
    watched = rec.recommend(user=1, k=2, sample=True, seed=7, max_tries=12, progress=lambda *a: calls.append(a))
    assert [r.title for r in watched.items] == titles  # watching changes nothing
    assert [n for n, _ in calls] == list(range(1, len(calls) + 1)) and 1 <= len(calls) <= 12
    assert calls[-1][1] == len(titles) and all(a[1] <= b[1] for a, b in zip(calls, calls[1:], strict=False))


def test_a_long_sampling_run_does_not_fill_the_context(rec):
    # Each lone-token decode leaves a padding cell; one request of many tries filled the tiny model's context
    # ("llama_decode failed ... the context has N cells") after ~140 tries.
    unseen = len(set(DEFAULT_TITLES) - {TINY_TITLES[i] for i in TINY_HISTORIES[1]})
    tries = rec.engine.n_ctx // 8  # each try decodes ~10 lone tokens: far more than the context has cells
    calls = []
    result = rec.recommend(user=1, k=unseen, sample=True, seed=2, max_tries=tries, temperature=0.3,
                           progress=lambda n, found: calls.append(found))
    assert len(result.items) <= unseen and rec.engine.seq_len(rec.engine.pad_seq) < 64
    assert len(calls) == tries or calls[-1] == unseen


def test_options_that_would_be_ignored_are_refused(rec):
    # Sampling fuses no prior and needs a temperature it can divide by; a weight needs a prior to weigh.
    for kwargs in ({"prior": "none"}, {"prior_weight": 1.0}, {"temperature": 0.0}, {"temperature": float("nan")},
                   {"temperature": float("inf")}, {"temperature": -1.0}):
        with pytest.raises(UsageError):
            rec.recommend(user=1, k=2, sample=True, max_tries=4, **kwargs)
    with pytest.raises(UsageError, match="a prior weight needs a prior"):
        rec.recommend(user=1, k=2, prior="none", prior_weight=0.5)
    with pytest.raises(UsageError, match="a prior weight needs a prior"):  # the tiny model has no prior of its own
        rec.recommend(user=1, k=2, prior_weight=0.5)
    assert rec.recommend(user=1, k=2, prior="none", prior_weight=0.0).prior == "none"


def test_requests_that_are_not_a_user_or_a_list_of_titles(rec):
    title = TINY_TITLES[TINY_HISTORIES[1][0]]
    for call in (lambda: rec.recommend(history=title), lambda: rec.recommend_many([title]),
                 lambda: rec.recommend(history=5), lambda: rec.recommend_many([1, None]),
                 lambda: rec.recommend_many([True])):
        with pytest.raises(UsageError, match="history|user id"):
            call()
    assert [r.title for r in rec.recommend(history=[title], k=2).items] == \
        [r.title for r in rec.recommend_many([[title]], k=2)[0].items]


def test_the_pop_prior_weight_of_one_request_is_not_the_next_ones_default(tiny_model, tiny_db, cache_home):
    # The first "pop" request's λ was stored as the pop prior's own: every later "pop" request got it.
    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as first:
        assert first.recommend(user=1, k=3, prior="pop", prior_weight=0.25).prior_weight == 0.25
        after = first.recommend(user=1, k=3, prior="pop")
    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as fresh:
        alone = fresh.recommend(user=1, k=3, prior="pop")
    assert after.prior_weight == alone.prior_weight == 1.0
    assert [(r.title, r.score) for r in after.items] == [(r.title, r.score) for r in alone.items]


def test_a_closed_recommender_refuses_instead_of_crashing(tiny_model, tiny_db, cache_home):
    rec = Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None)
    rec.close()
    rec.close()  # twice is fine
    for call in (lambda: rec.recommend(user=1, k=2), lambda: rec.recommend_many([1], k=2),
                 lambda: rec.recommend(user=1, k=2, sample=True), lambda: rec.prompt_ids(["x"]),
                 lambda: rec.rank_titles([TINY_TITLES[10]], set(), k=2)):
        with pytest.raises(UsageError, match="closed"):  # it was a segmentation fault: freed llama.cpp memory
            call()


def test_python_arguments_are_checked_like_http_ones(rec):
    import numpy as np

    title = TINY_TITLES[TINY_HISTORIES[1][0]]
    for kwargs in ({"user": "1"}, {"user": 1.0}, {"user": True}, {"history": [1]}, {"history": [None]},
                   {"history": [title.encode()]}, {"user": 1, "k": "3"}, {"user": 1, "k": 2.0},
                   {"user": 1, "prior_weight": True}, {"user": 1, "prior_weight": 1e20},
                   {"user": 1, "sample": True, "max_tries": 0}, {"user": 1, "sample": True, "temperature": True}):
        with pytest.raises(UsageError):
            rec.recommend(**{"k": 2, **kwargs})
    with pytest.raises(UsageError, match="list of requests"):
        rec.recommend_many(1)
    # numpy integers are whole numbers: the same answer as Python ints.
    expected = [r.title for r in rec.recommend(user=1, k=2).items]
    assert [r.title for r in rec.recommend(user=np.int64(1), k=np.int64(2)).items] == expected
    assert [r.title for r in rec.recommend_many([np.int32(1)], k=2)[0].items] == expected
    # A generator history is read once (it was used up before sampling read it: "the history is empty").
    sampled = rec.recommend(history=(t for t in [title]), k=1, sample=True, seed=3, max_tries=8)
    assert [r.title for r in sampled.items] == [r.title for r in rec.recommend(history=[title], k=1, sample=True,
                                                                                seed=3, max_tries=8).items]


def test_a_title_in_decomposed_unicode_is_the_catalog_title(rec, capsys):
    import unicodedata

    amelie = TINY_TITLES[130]
    decomposed = unicodedata.normalize("NFD", amelie)
    assert decomposed != amelie  # the é as e + a combining accent, as macOS pastes it
    assert [r.title for r in rec.recommend(history=[decomposed], k=3).items] == \
        [r.title for r in rec.recommend(history=[amelie], k=3).items]
    assert TINY_TITLES[30] == "Heat (1995)"  # a title copied over a line break is the one-line catalog title
    assert [r.title for r in rec.recommend(history=["Heat\n(1995)"], k=3).items] == \
        [r.title for r in rec.recommend(history=["Heat (1995)"], k=3).items]
    with pytest.raises(NotFoundError, match="looks like an option"):
        rec.recommend(history=["--k"], k=3)


def test_open_arguments_are_checked(tiny_model, tiny_db, cache_home):
    # threads=100_000 segfaulted inside ggml and 10**6 aborted the interpreter (std::bad_alloc)
    for kwargs in ({"batch": "2"}, {"threads": "2"}, {"beam": 3.5}, {"prior_weight": "1"}, {"cache": 1.5},
                   {"threads": 100_000}, {"threads": 513}):
        with pytest.raises(UsageError):
            Recommender.open(tiny_model, tiny_db, warn=lambda m: None, **kwargs)


def test_request_objects_and_numpy_values_are_checked_like_the_rest(rec):
    import numpy as np

    from genrec_edge.recommend import Request

    # Request objects went through unchecked: Request(user=1.5) was searched for user 1, "x" a raw ValueError.
    for bad in (Request(user=1.5), Request(user="1"), Request(user=True), Request(),
                Request(user=1, history=("Heat (1995)",)), Request(history="Heat (1995)"), Request(history=(5,)),
                np.array(["Heat (1995)"])):
        with pytest.raises(UsageError):
            rec.recommend_many([bad], k=2)
    for kwargs in ({"user": np.array([1])}, {"user": 1, "k": np.array([2])}):  # raw TypeErrors before
        with pytest.raises(UsageError):
            rec.recommend(**kwargs)
    for k in (0, -1, 1.5):  # an IndexError, or accepted
        with pytest.raises(UsageError):
            rec.rank_titles(["Heat (1995)"], [], k)
    with pytest.raises(UsageError):
        rec.rank_titles(["Heat (1995)"], [], 2, beam=0)  # returned () silently
    one = [r.title for r in rec.recommend(user=2, k=3, prior="pop", prior_weight=np.float32(2)).items]
    assert one == [r.title for r in rec.recommend(user=2, k=3, prior="pop", prior_weight=2.0).items]
    with pytest.raises(NotFoundError) as err:  # a message quoting a 2 MB title is bounded
        rec.recommend(history=["x" * 2_000_000], k=2)
    assert len(str(err.value)) < 1000


def test_trie_is_cached_on_disk(tiny_model, tiny_db, cache_home):
    with Recommender.open(tiny_model, tiny_db, warn=lambda m: None):
        pass
    files = list((cache_home / "cache").glob("trie-*.npz"))
    assert len(files) == 1
    with Recommender.open(tiny_model, tiny_db, warn=lambda m: None) as again:
        assert again.trie.titles == tuple(Catalog.from_pairs(list(TINY_TITLES.items())).unique_titles)
    assert list((cache_home / "cache").glob("trie-*.npz")) == files


# ------------------------------------------------------------------------------------------ CLI
def test_cli_recommend_json_and_table(tiny_model, tiny_db, cache_home, capsys):
    rc = main(["recommend", "--user", "1", "--k", "3", "--db", str(tiny_db), "--model", str(tiny_model), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    payload = json.loads(out.out)
    assert payload["user"] == 1 and len(payload["items"]) == 3
    assert set(payload["timings"]) == {"prefill_ms", "search_ms", "total_ms", "prompt_tokens", "decode_steps",
                                       "decoded_tokens", "prior_ms", "prefilled_tokens"}
    assert payload["prior"] == "none" and payload["prior_weight"] == 0.0  # the tiny model has no sidecar
    assert all(item["lm_score"] == item["score"] for item in payload["items"])
    rc = main(["recommend", "--history", "Toy Story (1995)", 'Quote "Me" (2001)', "--k", "2",
               "--db", str(tiny_db), "--model", str(tiny_model), "--beam", "4", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "rank" in out.out and "prefill" in out.out and "total" in out.out
    rc = main(["recommend", "--user", "1", "--k", "2", "--sample", "--seed", "7", "--temperature", "0.5",
               "--db", str(tiny_db), "--model", str(tiny_model), "--json"])  # with its progress bar on stderr
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert 1 <= len(json.loads(out.out)["items"]) <= 2


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--user", "999"], 4, "unknown user 999"),
        (["--user", str(EMPTY_USER)], 5, "no history"),
        (["--history", "Nope (1999)"], 4, "unknown title"),
        ([], 2, "either --user or --history"),
        (["--user", "1", "--history", "Heat (1995)"], 2, "either --user or --history"),
        (["Heat (1995)"], 2, "titles go after --history"),
    ],
)
def test_cli_recommend_errors_are_one_line(tiny_model, tiny_db, cache_home, capsys, args, code, message):
    rc = main(["recommend", *args, "--db", str(tiny_db), "--model", str(tiny_model)])
    err = capsys.readouterr().err
    assert rc == code
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in err


def test_cli_missing_model(tiny_db, tmp_path, cache_home, capsys):
    rc = main(["recommend", "--user", "1", "--db", str(tiny_db), "--model", str(tmp_path / "none.gguf")])
    assert rc == NotFoundError.exit_code
    assert "model file not found" in capsys.readouterr().err


def test_cli_grammar_export(tiny_db, tmp_path, capsys):
    from genrec_edge.grammar import grammar_language

    out = tmp_path / "catalog.gbnf"
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(out)]) == 0
    assert grammar_language(out.read_text(encoding="utf-8")) == set(DEFAULT_TITLES)
    assert "20 titles" in capsys.readouterr().out
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(out), "--force"]) == 0
    # --force never writes a grammar over a database (here: the very one it reads); a folder is one line, exit 14.
    before = tiny_db.read_bytes()
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(tiny_db), "--force"]) == 2
    assert "is a SQLite database" in capsys.readouterr().err and tiny_db.read_bytes() == before
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(tmp_path), "--force"]) == 14
    expected = f"error: cannot use {tmp_path}: it is not a file (a folder is there); --out names the .gbnf file"
    assert capsys.readouterr().err.strip() == expected
    assert main(["grammar", "export", "--db", str(tiny_db), "--out", str(tmp_path)]) == 14  # not "use --force"
    assert capsys.readouterr().err.strip() == expected


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_base_model_top10_on_bundled_catalog(tmp_path, cache_home):
    from genrec_edge.ingest import ingest
    from genrec_edge.paths import BUNDLED_DATASET

    db_path = tmp_path / "ml.db"
    ingest(db_path, "movielens-csv", BUNDLED_DATASET)
    history = ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Matrix, The (1999)"]
    with HistoryDB.open(db_path, readonly=True) as db:
        catalog = db.catalog()
    with Recommender.open(None, db_path, threads=2, warn=lambda m: None) as recommender:
        result = recommender.recommend(history=history, k=10)
        titles = [r.title for r in result.items]
        assert len(titles) == 10 == len(set(titles))
        assert set(titles) <= set(catalog.unique_titles) - set(history)
        by_user = recommender.recommend(user=1, k=10)
        assert len({r.title for r in by_user.items}) == 10


@pytest.mark.slow
def test_real_model_jump_forward_and_batching_change_no_result(tmp_path, cache_home):
    """The default model (Q8_0) on 40 real users: the search with forced suffixes decoded ahead, and 8
    requests per search, give the plain step-by-step search's top-10, titles and scores (to 1e-4)."""
    import random

    from genrec_edge.ingest import ingest
    from genrec_edge.paths import BUNDLED_DATASET

    db_path = tmp_path / "ml.db"
    ingest(db_path, "movielens-csv", BUNDLED_DATASET)
    with HistoryDB.open(db_path, readonly=True) as db:
        users = random.Random(7).sample(db.users(), 40)
    quiet = {"threads": 2, "beam": 20, "prior": "none", "warn": lambda m: None}
    with Recommender.open(None, db_path, jump_forward=False, **quiet) as plain:
        expected = [plain.recommend(user=u, k=10) for u in users]
    with Recommender.open(None, db_path, batch=8, **quiet) as fast:
        got = fast.recommend_many(users, k=10)
        assert sum(r.timings.decode_steps for r in got[::8]) < sum(r.timings.decode_steps for r in expected)
    for want, have in zip(expected, got, strict=True):
        assert [r.title for r in have.items] == [r.title for r in want.items]
        assert [r.score for r in have.items] == pytest.approx([r.score for r in want.items], abs=1e-4)


def test_a_catalog_changed_under_an_open_recommender_is_refused(tiny_model, tiny_db, tmp_path, cache_home):
    """A server kept answering from the catalog it opened after its database file was replaced, or items were
    ingested into it: an item id the new file lacks came back as 404 'unknown item', renamed titles stayed."""
    import os
    import shutil

    from genrec_edge.ingest import ingest

    live = tmp_path / "live.db"
    shutil.copy(tiny_db, live)
    with Recommender.open(tiny_model, live, warn=lambda m: None) as rec:
        before = [r.title for r in rec.recommend(user=2, k=3).items]
        with HistoryDB.open(live) as db:  # history changes: the same catalog, answered as always
            db.add_interaction(2, 10, timestamp=9_999_999_999)
        assert rec.recommend(user=1, k=3).items
        renamed = tmp_path / "renamed.db"
        shutil.copy(live, renamed)
        conn = sqlite3.connect(renamed)
        with conn:
            conn.execute("UPDATE items SET title = 'Heat II (1996)' WHERE id = 30")
        conn.close()  # checkpointed into the file
        for suffix in ("-wal", "-shm"):  # the old file's, not the new one's
            (tmp_path / f"live.db{suffix}").unlink(missing_ok=True)
        os.replace(renamed, live)  # another file at the same path
        with pytest.raises(CatalogMismatchError, match="changed since this model was opened"):
            rec.recommend(user=2, k=3)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"live.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tiny_db, live)
    with Recommender.open(tiny_model, live, warn=lambda m: None) as rec:
        assert [r.title for r in rec.recommend(user=2, k=3).items] == before
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "items.csv").write_text("item_id,title\n5000,New Film (2020)\n")
        (extra / "inter.csv").write_text("user_id,item_id,timestamp\n77,5000,1\n")
        ingest(live, "csv", extra, interactions="inter.csv", items="items.csv", progress=False)  # the same file
        with pytest.raises(CatalogMismatchError, match="changed since this model was opened"):
            rec.recommend(history=[TINY_TITLES[10]], k=3)


def test_a_recommender_left_to_the_garbage_collector_frees_llama_cpps_memory(tiny_model, tiny_db, cache_home):
    # Without close(), llama.cpp's model and context stayed allocated: ~300 MB per forgotten default model.
    import gc

    rec = Recommender.open(tiny_model, tiny_db, warn=lambda m: None)
    rec.recommend(user=2, k=3)
    freed = rec.engine._free
    assert freed.alive
    del rec
    gc.collect()
    assert not freed.alive  # the finalizer ran: llama_free and llama_model_free were called
    with Recommender.open(tiny_model, tiny_db, warn=lambda m: None) as rec:  # closing still frees once
        finalizer = rec.engine._free
    assert not finalizer.alive


def test_a_forked_child_is_told_to_use_one_thread_instead_of_hanging(tiny_model, tiny_db, cache_home):
    """OpenMP's thread team does not survive os.fork(): a child of a process that decoded on 2 threads hung
    for ever in GOMP_parallel (multiprocessing's default start method on Linux is fork)."""
    import os
    import signal

    with Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None) as rec:
        expected = [r.title for r in rec.recommend(user=2, k=3).items]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang is a failure, not a stuck test run
            signal.alarm(30)
            try:
                with Recommender.open(tiny_model, tiny_db, threads=2, warn=lambda m: None) as child:
                    child.recommend(user=2, k=3)
                code = 2
            except UsageError as exc:
                if "do not survive os.fork()" in str(exc):
                    with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as child:
                        titles = [r.title for r in child.recommend(user=2, k=3).items]
                    os.write(write, json.dumps(titles).encode())
                    code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        done = os.waitpid(pid, 0)
    status = done[1]
    answer = os.read(read, 65536)
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and json.loads(answer) == expected


def test_a_cancelled_search_stops_at_any_check_and_the_next_search_is_exact(tiny_model, tiny_db, cache_home):
    """``cancel`` is asked once the lock is ours, before each prefill and before each search step's decode.
    Stopped at any of those, nothing is cached and the next answer is the uncancelled one to the bit."""
    with Recommender.open(tiny_model, tiny_db, threads=2, batch=2, cache=4, warn=lambda m: None) as rec:
        asked: list[int] = []
        whole = rec.recommend_many([2, 5], k=5, cancel=lambda: asked.append(1) is not None)  # never True
        answers = [_answer(r) for r in whole]
        assert answers == [_answer(rec.recommend(user=u, k=5)) for u in (2, 5)]
        # the lock, two prefills, and at least one per search step: a check mid-search
        assert len(asked) >= 3 + 2 and whole[0].stats.search_steps >= 2, (len(asked), whole[0].stats)
        for stop_at in range(1, len(asked) + 1):
            count = 0

            def cancel(n=stop_at) -> bool:
                nonlocal count
                count += 1
                return count >= n

            rec._cache.clear()
            with pytest.raises(SearchCancelled):
                rec.recommend_many([2, 5], k=5, cancel=cancel)
            assert count == stop_at  # stopped at the first True: no search past it
            assert not rec._cache, "a cancelled search is not cached"
            again = rec.recommend_many([2, 5], k=5)
            assert [r.cached for r in again] == [False, False] and [_answer(r) for r in again] == answers
        # Cancelled before anything: nothing searched, one clear error
        with pytest.raises(SearchCancelled, match="no longer wanted"):
            rec.recommend_many([2], k=5, cancel=lambda: True)


def test_batched_requests_wider_than_a_slot_get_the_width_of_batch_one(tmp_path, cache_home):
    """With batch >= 2 a slot holds 20 beams (batch=1: 40), so a k > 10 (beam 2k) was searched narrower in a
    group and could rank differently from the same request alone. Such requests are now searched one at a
    time with every slot's beams: the answers of batch=1, for any k; k <= 10 still shares the decode."""
    import csv

    from tinymodel import tiny_gguf

    from genrec_edge.ingest import ingest

    words = ["Red", "Blue", "Green", "Night", "Day", "River", "Stone", "Glass", "Iron", "Silver"]
    titles = [f"The {a} {b} ({1950 + i})" for i, (a, b) in enumerate((a, b) for a in words for b in words[::-1])
              if a != b][:80]
    folder = tmp_path / "ml"
    folder.mkdir()
    with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows([i + 1, t, "Drama"] for i, t in enumerate(titles))
    with open(folder / "ratings.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        for user in range(1, 7):
            for pos in range(5):
                writer.writerow([user, 1 + (user * 7 + pos * 11) % len(titles), "4.0", 1_000_000 + pos])
    db = tmp_path / "wide.db"
    ingest(db, "movielens-csv", folder, progress=False)
    from genrec_edge.quantize import quantize

    # Q8_0: batching is exact to the bit there; F32 weights can move a score by ~1e-7 (docs/FINDINGS.md)
    model = quantize(tiny_gguf(tmp_path / "model", corpus=titles, seed=11), ["Q8_0"], progress=False)[0].path
    users = list(range(1, 7))
    with (Recommender.open(model, db, threads=2, warn=lambda m: None) as one,
          Recommender.open(model, db, threads=2, batch=3, warn=lambda m: None) as three,
          HistoryDB.open(db, readonly=True) as history):
        resolved = [one._resolve_history(history, u, None) for u in users]  # (prompt titles, seen titles, items)
        assert (one.capacity, three.capacity, three.lone_capacity) == (40, 20, 40)
        for k in (5, 15, 30):
            alone = [_answer(one.recommend(user=u, k=k)) for u in users]
            assert [_answer(r) for r in three.recommend_many(users, k=k)] == alone, k
            ranked = three.rank_many(resolved, k)
            assert [list(zip(r.titles, r.scores, strict=True)) for r in ranked] == [
                [(title, score) for title, _, score, _ in a[0]] for a in alone], k
        # k <= 10 still searches 3 requests per llama_decode; k = 15 one at a time
        assert three._group_size(10, None) == 3 and three._group_size(15, None) == 1
        # The width mattered on this catalog: 20 beams (a slot's) rank k = 30 otherwise for some user.
        with three._engine():
            narrow = [three._rank_group([r + (None,)], 30, 20)[0] for r in resolved]
        wide = [[title for title, *_ in a[0]] for a in alone]
        assert any(list(n.titles) != w for n, w in zip(narrow, wide, strict=True))


def test_exclude_and_only_are_the_exact_search_over_what_is_left(tiny_model, tiny_db, cache_home):
    """With a beam as wide as the catalog the search is exact, so its answer with ``exclude`` / ``only`` is the
    unfiltered ranking of every unseen title with those items dropped, scores included."""
    n_titles = len(DEFAULT_TITLES)
    first_id = {t: min(i for i, title in TINY_TITLES.items() if title == t) for t in set(TINY_TITLES.values())}
    with Recommender.open(tiny_model, tiny_db, threads=1, beam=n_titles, warn=lambda m: None) as rec:
        everything = [(r.title, r.score) for r in rec.recommend(user=4, k=n_titles).items]
        unfiltered_top = [t for t, _ in everything[:3]]
        excluded = [first_id[t] for t in unfiltered_top[:2]]
        got = rec.recommend(user=4, k=5, exclude=excluded)
        expected = [(t, s) for t, s in everything if t not in unfiltered_top[:2]][:5]
        assert [r.title for r in got.items] == [t for t, _ in expected]
        assert [r.score for r in got.items] == pytest.approx([s for _, s in expected], abs=1e-6)
        # only: the ranking restricted to those items; fewer than k left gives what is left
        allowed = [t for t, _ in everything[::3]]
        got = rec.recommend(user=4, k=len(allowed) + 2, only=[first_id[t] for t in allowed])
        assert [r.title for r in got.items] == allowed
        assert [r.score for r in got.items] == pytest.approx([s for t, s in everything if t in allowed], abs=1e-6)
        # an allowed title the user has seen stays out; both filters together
        seen_id = TINY_HISTORIES[4][0]
        got = rec.recommend(user=4, k=n_titles, only=[seen_id, first_id[allowed[0]], first_id[allowed[1]]],
                            exclude=[first_id[allowed[0]]])
        assert [r.title for r in got.items] == [allowed[1]]
        # an ad-hoc history and sampling honour them too
        history = [TINY_TITLES[i] for i in TINY_HISTORIES[4]]
        assert [r.title for r in rec.recommend(history=history, k=5, exclude=excluded).items] == [t for t, _ in expected]
        drawn = rec.recommend(user=4, k=3, sample=True, seed=1).items  # what this seed draws unfiltered
        sampled = rec.recommend(user=4, k=3, sample=True, seed=1, exclude=[i for r in drawn for i in r.item_ids])
        assert drawn and sampled.items and not {r.title for r in sampled.items} & {r.title for r in drawn}
        # the sampler draws from the whole catalog: it would rarely find a title of a short allow-list
        with pytest.raises(UsageError, match="drop only"):
            rec.recommend(user=4, k=3, sample=True, only=[first_id[t] for t in allowed[:3]])


def test_exclude_and_only_with_the_default_beam_batches_and_the_cache(tiny_model, tiny_db, cache_home):
    from genrec_edge.recommend import Request

    with Recommender.open(tiny_model, tiny_db, threads=1, batch=3, cache=8, warn=lambda m: None) as rec:
        top = rec.recommend(user=1, k=5)
        drop = sorted({i for r in top.items[:3] for i in r.item_ids})
        filtered = rec.recommend(user=1, k=5, exclude=drop)
        assert not filtered.cached, "a request with other exclusions is not the cached answer"
        assert len(filtered.items) == 5 and not {i for r in filtered.items for i in r.item_ids} & set(drop)
        again = rec.recommend(user=1, k=5, exclude=list(reversed(drop)) + drop[:1])  # the same set of ids
        assert again.cached and [r.title for r in again.items] == [r.title for r in filtered.items]
        requests = [Request(user=1, exclude=tuple(drop)), Request(user=1), Request(user=2, only=tuple(range(10, 120, 10)))]
        alone = []
        with Recommender.open(tiny_model, tiny_db, threads=1, warn=lambda m: None) as single:
            for r in requests:
                alone.append(single.recommend(user=r.user, k=4, exclude=r.exclude, only=r.only))
        together = rec.recommend_many(requests, k=4)
    for a, b in zip(alone, together, strict=True):
        assert [(r.title, r.score) for r in a.items] == [(r.title, r.score) for r in b.items]
    assert all(i in range(10, 120, 10) for r in together[2].items for i in r.item_ids)


def test_bad_exclude_and_only(rec):
    assert rec.recommend(user=1, k=3, exclude=None).items == rec.recommend(user=1, k=3).items  # None: nothing
    with pytest.raises(NotFoundError, match="unknown item 999 in exclude"):
        rec.recommend(user=1, exclude=[999])
    with pytest.raises(NotFoundError, match="unknown item 999 in only"):
        rec.recommend(user=1, only=[10, 999])
    np = pytest.importorskip("numpy")
    for bad in ("12", [1.5], [True], 3, np.array(10), {10: 1}):
        with pytest.raises(UsageError):
            rec.recommend(user=1, exclude=bad)
    with pytest.raises(UsageError, match="nothing left to recommend"):
        rec.recommend(user=1, only=TINY_HISTORIES[1][:2])  # only seen items
    with pytest.raises(UsageError, match="nothing left to recommend"):
        rec.recommend(user=1, only=[])


def test_cli_recommend_exclude_and_only(tiny_model, tiny_db, cache_home, capsys, tmp_path):
    base = ["recommend", "--user", "1", "--k", "3", "--db", str(tiny_db), "--model", str(tiny_model), "--json"]
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)
    drop = first["items"][0]["item_ids"][0]
    assert main([*base, "--exclude", str(drop)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exclude"] == [drop] and out["only"] is None
    assert drop not in {i for r in out["items"] for i in r["item_ids"]}
    assert main([*base, "--exclude", "999"]) == NotFoundError.exit_code
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: unknown item 999 in exclude: not in this model's catalog"
    assert main([*base, "--sample", "--only", str(drop)]) == 2
    assert "--only does not apply to --sample" in capsys.readouterr().err
    # The files: ids one per line, joined with the options' ids.
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# shown yesterday\n{drop}\n", encoding="utf-8")
    assert main([*base, "--exclude-file", str(ids)]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == out["items"]
    allowed = [first["items"][1]["item_ids"][0], first["items"][2]["item_ids"][0]]
    ids.write_text(f"{allowed[0]}\n", encoding="utf-8")
    assert main([*base, "--only-file", str(ids), "--only", str(allowed[1])]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["only"] == sorted(allowed) and [r["title"] for r in got["items"]] == [
        r["title"] for r in first["items"][1:3]]
    assert main([*base, "--sample", "--only-file", str(ids)]) == 2
    assert "--only-file does not apply to --sample" in capsys.readouterr().err
    ids.write_text("# nothing in stock\n", encoding="utf-8")
    assert main([*base, "--only-file", str(ids)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: the items file {ids} lists no item"
    assert main([*base, "--only-file", str(ids), "--only", str(allowed[1])]) == 0  # --only gives one
    assert [r["title"] for r in json.loads(capsys.readouterr().out)["items"]] == [first["items"][2]["title"]]
    assert main([*base, "--exclude-file", str(ids)]) == 0  # no item to exclude is not an error
    assert json.loads(capsys.readouterr().out)["items"] == first["items"]
    ids.write_text("10\nten\n", encoding="utf-8")
    assert main([*base, "--exclude-file", str(ids)]) == 6
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {ids}:2: not an item id: 'ten'"
    # An unknown id from a file is named with the file and the line it is first on; from an option, plainly.
    ids.write_text(f"{allowed[0]}\n# gone\n999\n999\n", encoding="utf-8")
    for option, name in (("--exclude-file", "exclude"), ("--only-file", "only")):
        assert main([*base, option, str(ids)]) == NotFoundError.exit_code
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: unknown item 999 in {name}: not in this model's catalog ({ids}:3)")
    assert main([*base, "--exclude-file", str(ids), "--exclude", "999"]) == NotFoundError.exit_code
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("not in this model's catalog")
