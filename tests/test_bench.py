"""``make bench`` end to end on the tiny random LLaMA and the tiny catalog: real quantizer, real llama.cpp in a
child process per level, real transformers beam search, real SASRec training (2 epochs)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from tinymodel import tiny_gguf

from bench.run import BenchConfig, main, prepare_levels, run_bench

LEVELS = ("F16", "Q8_0")  # the tiny model's 64-wide rows rule out the K-quants (256-element blocks)


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    # No provenance: a zero-shot model, served for any catalog (the tiny_db's hash is per test).
    return tiny_gguf(tmp_path_factory.mktemp("bench-model"), outtype="f16")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _config(tiny_f16, tiny_db, tmp_path, **overrides) -> BenchConfig:
    settings = dict(
        levels=LEVELS, users=5, seed=1, threads=2, model_f16=tiny_f16, db=tiny_db, out_dir=tmp_path / "out",
        work_dir=tmp_path / "work", hf_users=2, pp=32, tg=8, reps=2, sasrec_epochs=2, progress=False,
    )
    settings.update(overrides)
    return BenchConfig(**settings)


def _drop_user(db_path, user: int) -> None:
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM interactions WHERE user_id = ?", (user,))


def test_bench_end_to_end(tiny_f16, tiny_db, tmp_path, home, capsys):
    # User 7 has seen 11 of the 20 titles: fewer than k=10 unseen ones, so top-10 overlap (|A ∩ B| / k) is
    # below 1 even between identical lists. Every other test user has >= 10 unseen titles.
    _drop_user(tiny_db, 7)
    report = run_bench(_config(tiny_f16, tiny_db, tmp_path))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(LEVELS)

    # Every column of every level is filled, and consistent.
    for row in rows.values():
        for key, value in row.items():
            assert value is not None and not (isinstance(value, float) and math.isnan(value)), (row["name"], key)
        assert row["users"] == 5 and row["threads"] == 2
        assert row["pp_ts"] > 0 and row["tg_ts"] > 0 and row["load_s"] > 0
        # The child's own peak (this pytest process, with torch loaded, is several hundred MB: a child whose
        # reading inherited the parent's high-water mark would show it).
        assert 10 < row["peak_rss_mb"] < 250
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        for key in ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@10", "overlap@10"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["HR@5"] <= row["HR@10"] and row["NDCG@5"] <= row["NDCG@10"] <= row["HR@10"]
        assert -1.0 <= row["rho@10"] <= 1.0 and row["kl_first"] >= 0.0
    f16, q8 = rows["F16"], rows["Q8_0"]
    assert f16["overlap@10"] == 1.0 and f16["rho@10"] == 1.0 and f16["kl_first"] == 0.0
    # Every quality cell carries its 95% interval; each level is compared with F16 on the same users.
    for row in list(rows.values()) + report["peers"] + report["hf_side_by_side"]:
        for key in ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@10"):
            assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"], (row["name"], key)
    assert (f16["ΔHR@10"], f16["ΔHR@10_lo"], f16["ΔHR@10_hi"]) == (0.0, 0.0, 0.0)
    for key in ("HR@10", "NDCG@10", "MRR@10"):
        assert q8[f"Δ{key}"] == pytest.approx(q8[key] - f16[key], abs=1e-12)
        assert q8[f"Δ{key}_lo"] <= q8[f"Δ{key}"] <= q8[f"Δ{key}_hi"]
    assert q8["size_mb"] < f16["size_mb"] and q8["bpw"] < f16["bpw"]
    assert 15 < f16["bpw"] < 17.5 and 8 < q8["bpw"] < 10  # F32 norms and metadata add a little
    assert report["levels"]["Q8_0"]["first_top1_agreement"] <= 1.0
    assert report["meta"]["model_kind"] == "zero-shot base"

    # Every level ranked the same users, k distinct unseen titles each (the tiny catalog has 20).
    levels = report["levels"]
    assert levels["F16"]["users"] == levels["Q8_0"]["users"] == report["meta"]["sample"]["user_ids"]
    for ranking in levels["F16"]["rankings"]:
        assert len(ranking) == len(set(ranking)) >= 1

    # Peers: quality on the sample and on every test user; their metrics are the project's metric code.
    peers = {r["name"]: r for r in report["peers"]}
    assert set(peers) == {"popularity (sample)", "popularity (all)", "SASRec (sample)", "SASRec (all)"}
    assert peers["popularity (sample)"]["users"] == 5 and peers["popularity (all)"]["users"] == 6
    from genrec_edge.baselines import popularity, split_examples
    from genrec_edge.evaluation import evaluate
    from genrec_edge.history import HistoryDB

    with HistoryDB.open(tiny_db, readonly=True) as db:
        catalog, sequences = db.catalog(), list(db.sequences())
    pop = popularity(sequences, catalog)
    direct = evaluate(lambda ex: pop.rank(ex, 10), split_examples(sequences, "test"), catalog, k_max=10,
                      progress=False)
    assert peers["popularity (all)"]["HR@10"] == direct.hr[10]
    assert peers["popularity (all)"]["MRR@10"] == direct.mrr

    # transformers' beam search on the same F16 over the same trie finds the same titles as ours.
    hf_rows = {r["name"]: r for r in report["hf_side_by_side"]}
    ours, theirs = hf_rows["llama.cpp F16 (ours)"], hf_rows["transformers F16 beam"]
    assert ours["users"] == theirs["users"] == 2
    assert theirs["p50_ms"] > 0 and theirs["peak_rss_mb"] > 0
    assert theirs["overlap@10"] >= 0.8, report["transformers"]["rankings"]

    # Files: markdown (also on stdout), CSV, JSON, PNG.
    files = {ext: tmp_path / "out" / f"{report['meta']['date'][:10]}-tiny-ml.{ext}" for ext in ("md", "csv", "json", "png")}
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0, path
    text = files["md"].read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert "| F16 |" in text and "| Q8_0 |" in text and "pp32 t/s" in text and "zero-shot base" in text
    assert "## Quality vs F16, paired on the same users" in text and "ΔHR@10 vs F16" in text
    users = report["meta"]["sample"]["users"]
    assert users < 200 and f"**Noise at this size**: {users} users is a small sample" in text
    assert f"{f16['HR@10']:.3f} [{f16['HR@10_lo']:.3f}, {f16['HR@10_hi']:.3f}]" in text
    with open(files["csv"], encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table][:2] == ["F16", "Q8_0"] and len(table) == 2 + 4 + 2
    assert float(table[1]["size_mb"]) == pytest.approx(q8["size_mb"])
    assert float(table[1]["ΔNDCG@10_hi"]) == pytest.approx(q8["ΔNDCG@10_hi"])
    assert {r["sample_seed"] for r in table} == {"1"} and all("llama-cpp-python=" in r["versions"] for r in table)
    saved = json.loads(files["json"].read_text(encoding="utf-8"))
    assert saved["meta"]["versions"]["llama-cpp-python"] and saved["meta"]["cpu"]
    assert saved["meta"]["sample"]["seed"] == 1 and saved["meta"]["threads"] == 2
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_step_is_the_prompts_log_softmax_at_the_trie_root(tiny_f16, tiny_db, home):
    """Recommendations.first_step (what the bench's KL column reads) equals log-probs computed from scratch."""
    import numpy as np

    from genrec_edge.engine import Engine, log_softmax
    from genrec_edge.prompts import build_prompt_ids
    from genrec_edge.recommend import Recommender

    history = ["Toy Story (1995)", "Heat (1995)", "Matrix, The (1999)"]
    with Recommender.open(tiny_f16, tiny_db, threads=2, warn=lambda m: None) as rec:
        first = rec.recommend(history=history, k=5, first_step=True).first_step
        tokens, nodes = rec.trie.children(0)
        allowed = rec.trie.unseen_counts([rec.title_index[t] for t in history])[nodes] > 0
        template = rec.template
    with Engine.open(tiny_f16, n_ctx=512, n_seq_max=1, threads=2) as engine:
        prompt = build_prompt_ids(engine.tokenize, engine.eos_id, history, template)
        engine.decode_sequence(prompt, 0, 0)
        expected = log_softmax(engine.logits(-1))[tokens]
    np.testing.assert_array_equal(first.tokens, tokens)
    np.testing.assert_allclose(first.log_probs, expected, atol=1e-4)
    np.testing.assert_array_equal(first.allowed, allowed)
    assert not first.allowed.all()  # the history's titles are masked where they are a branch of their own


def test_quantized_files_are_reused(tiny_f16, tmp_path):
    first = prepare_levels(tiny_f16, ["F16", "Q8_0"], tmp_path / "work", threads=2, progress=False)
    assert first["F16"] == tiny_f16  # the source already is F16
    stamp = first["Q8_0"].stat().st_mtime_ns
    second = prepare_levels(tiny_f16, ["F16", "Q8_0"], tmp_path / "work", threads=2, progress=False)
    assert second == first and second["Q8_0"].stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--levels", "Q9_9"], "unknown quantization level"),
        (["--users", "0"], "--users must be >= 1"),
        (["--hf-users", "-1"], "--hf-users must be >= 0"),
        (["--db", "/nonexistent/x.db", "--levels", "F16"], "database not found"),
        # Refused at once: they failed only after the levels were measured (SASRec refuses NaN / inf) or
        # segfaulted each level's child (llama.cpp's 512 threads).
        (["--db", "/nonexistent/x.db", "--sasrec-seconds", "nan"], "--sasrec-seconds must be a finite number"),
        (["--db", "/nonexistent/x.db", "--sasrec-seconds", "inf"], "--sasrec-seconds must be a finite number"),
        (["--db", "/nonexistent/x.db", "--threads", "100000"], "--threads must be 1..512"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys, home):
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error:") and message in err and "\n" not in err


def test_bad_model_is_one_line(tiny_db, tmp_path, capsys, home):
    bad = tmp_path / "model-F16.gguf"
    bad.write_bytes(b"not a gguf at all")
    code = main(["--levels", "F16", "--model-f16", str(bad), "--db", str(tiny_db), "--no-progress",
                 "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--out-dir", "--work-dir"])
def test_a_folder_that_cannot_be_written_is_one_line_before_any_work(option, tiny_f16, tiny_db, tmp_path, capsys,
                                                                     home):
    """--out-dir under a file was a FileNotFoundError traceback after every level was measured (--work-dir:
    before quantizing); now one line, exit 14, before quantizing anything."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folders = {"--out-dir": tmp_path / "out", "--work-dir": tmp_path / "work", option: blocker / "sub"}
    code = main(["--levels", "F16,Q8_0", "--model-f16", str(tiny_f16), "--db", str(tiny_db), "--no-progress",
                 "--skip-peers", "--users", "2", "--out-dir", str(folders["--out-dir"]),
                 "--work-dir", str(folders["--work-dir"])])
    err = capsys.readouterr().err.strip()
    assert code == 14 and err.startswith(f"error: {option}: cannot use {blocker / 'sub'}") and "\n" not in err, err
    assert not list((tmp_path / "work").glob("*Q8_0*"))  # nothing quantized, nothing measured


def test_model_for_another_catalog_is_refused(tiny_db, tmp_path, capsys, home):
    other = tiny_gguf(tmp_path / "m", outtype="f16", provenance={"catalog_sha256": "ab" * 32})
    capsys.readouterr()  # building the model may warn
    code = main(["--levels", "F16", "--model-f16", str(other), "--db", str(tiny_db), "--no-progress",
                 "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 8 and err.startswith("error:") and "catalog" in err and "\n" not in err


def test_levels_only_run(tiny_f16, tiny_db, tmp_path, home):
    """--skip-peers: the levels table alone (no popularity, SASRec or transformers), one level."""
    report = run_bench(_config(tiny_f16, tiny_db, tmp_path, levels=("F16",), skip_peers=True, users=3))
    assert [r["name"] for r in report["rows"]] == ["F16"]
    assert report["peers"] == [] and report["hf_side_by_side"] == [] and report["transformers"] is None
    assert report["rows"][0]["users"] == 3 and report["rows"][0]["kl_first"] == 0.0
    assert (tmp_path / "out" / f"{report['meta']['date'][:10]}-tiny-ml.png").is_file()


def test_a_prior_beside_the_f16_is_not_used(tiny_f16, tiny_db, tmp_path, home):
    """The default model's folder holds cf-prior.json: F16 was ranked with it, the quantized files (work dir,
    no sidecar) without, so overlap / ρ / Δ vs F16 compared the prior, not the quantization (Q8_0 overlap@10
    0.08 on ml-latest-small). Every level ranks with the language model alone."""
    import shutil

    from bench.run import load_inputs
    from genrec_edge import cf
    from genrec_edge.history import HistoryDB
    from genrec_edge.recommend import Recommender

    folder = tmp_path / "model"
    folder.mkdir()
    model = Path(shutil.copy(tiny_f16, folder / "model-F16.gguf"))
    with HistoryDB.open(tiny_db, readonly=True) as db:
        sequences, catalog = list(db.sequences()), db.catalog()
    cf.popularity_prior(sequences, catalog, weight=50.0).save(folder)
    report = run_bench(_config(model, tiny_db, tmp_path, skip_peers=True))
    sample = load_inputs(tiny_db, 5, False, 1).sample
    histories = [[catalog.title_of(i) for i in e.history] for e in sample]
    with Recommender.open(model, tiny_db, threads=2, prior="none", warn=lambda m: None) as plain, \
            Recommender.open(model, tiny_db, threads=2, warn=lambda m: None) as fused:
        alone = [[r.title for r in plain.recommend(history=h, k=10).items] for h in histories]
        with_prior = [[r.title for r in fused.recommend(history=h, k=10).items] for h in histories]
    assert alone != with_prior  # the sidecar does change the ranking: the test can tell them apart
    levels = report["levels"]
    assert levels["F16"]["users"] == [e.user for e in sample]
    assert levels["F16"]["rankings"] == alone
    assert report["meta"]["prior"] == "none"
    assert "collaborative prior: none" in Path(report["meta"]["files"]["md"]).read_text(encoding="utf-8")


def test_an_interrupt_while_the_files_are_written_leaves_none(tiny_f16, tiny_db, tmp_path, home, monkeypatch):
    """Ctrl-C while the plot was drawn left md, csv and json without the png (a result that looks whole, and
    the next run named itself -2); the four files are renamed into place together, or not at all."""
    import bench.plot

    def interrupted(report, path):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.plot, "plot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_config(tiny_f16, tiny_db, tmp_path, levels=("F16",), skip_peers=True, users=2))
    assert list((tmp_path / "out").iterdir()) == []


def test_sigterm_stops_the_child_and_cleans_up(tiny_f16, tiny_db, tmp_path, home):
    """SIGTERM to the bench alone (`kill PID`) killed it without cleanup: its bench.measure child ran on for
    nobody and the temporary folder stayed. Now the child is stopped, the folder removed, exit 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    prelude = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
               "runpy.run_module('bench.run', run_name='__main__')")
    proc = subprocess.Popen(
        [sys.executable, "-c", prelude, "--levels", "F16", "--model-f16", str(tiny_f16), "--db", str(tiny_db),
         "--users", "5", "--skip-peers", "--pp", "4096", "--tg", "512", "--reps", "50", "--no-progress",
         "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp), OMP_WAIT_POLICY="passive"))
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not children.read_text().split():
            time.sleep(0.05)
        child = int(children.read_text().split()[0])
        time.sleep(1.0)  # the child is measuring
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "error: terminated", err
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert list(tmp.iterdir()) == []  # the children's examples and results
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_progress_shows_an_eta():
    """The bars showed the elapsed time only: a run of several minutes gave no idea of its end. The whole run's
    bar counts recommendations (users × levels) and both bars show an ETA once users are timed."""
    import io
    import time

    from rich.console import Console

    from bench.run import Progress

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    with Progress(True, 2 * 4, console=console) as progress:
        for level in ("F16", "Q8_0"):
            progress.start(level)
            for done in range(3):
                progress.event({"event": "users", "done": done, "total": 4})
                time.sleep(0.05)
        tasks = {task.id: task for task in progress.bar.tasks}
        assert tasks[progress.jobs].completed == 4 and tasks[progress.jobs].total == 8
        assert tasks[progress.jobs].time_remaining is not None and tasks[progress.users].time_remaining is not None
        out = Console(file=io.StringIO(), width=160)
        out.print(progress.bar.make_tasks_table(progress.bar.tasks))
    rows = out.file.getvalue().splitlines()
    assert all("ETA 0:00:0" in row for row in rows[:2]), rows


def test_the_plot_shows_intervals_and_the_small_sample_note(tiny_f16, tiny_db, tmp_path, home):
    """The HR@k panel drew bare points: F16 at 0.10 and Q8_0 at 0.00 on 10 users read as a ranking of the levels,
    while the tables call those columns noise. It draws each level's 95% interval and says it is noise."""
    from matplotlib.container import ErrorbarContainer

    from bench.plot import figure

    report = run_bench(_config(tiny_f16, tiny_db, tmp_path, skip_peers=True, users=3))
    fig = figure(report)
    ax_q = fig.axes[0]
    bars = [c for c in ax_q.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    segments = bars[0].lines[2][0].get_segments()
    rows = report["rows"]
    assert [tuple(seg[:, 1]) for seg in segments] == [(r["HR@10_lo"], r["HR@10_hi"]) for r in rows]
    assert "3 users: noise" in ax_q.get_title()


def test_the_plot_s_level_names_overlap_neither_each_other_nor_the_points():
    """Names staggered by index alone collided where levels crowd (Q6_K's over Q8_0's in the 2026-12-03 run):
    each name now goes where its drawn box overlaps no other name and no other level's point."""
    from bench.plot import _POINT_RADIUS_PX, figure

    # The 2026-12-03 run's sizes and latencies, and HR@10 values that put several levels on one spot.
    levels = [("F16", 258.3, 4869, 0.017), ("Q8_0", 138.1, 3042, 0.017), ("Q6_K", 132.0, 2807, 0.050),
              ("Q5_K_M", 106.9, 5184, 0.050), ("Q5_0", 100.1, 3808, 0.033), ("Q4_K_M", 100.6, 3840, 0.017),
              ("Q4_0", 87.5, 3105, 0.017), ("Q3_K_M", 89.2, 3192, 0.017), ("Q2_K", 84.1, 3317, 0.017)]
    rows = [{"name": n, "size_mb": mb, "p50_ms": p50, "p95_ms": p50 * 1.2, "HR@10": hr, "HR@10_lo": 0.0,
             "HR@10_hi": hr + 0.05} for n, mb, p50, hr in levels]
    meta = {"k": 10, "sample": {"users": 60, "test_users": 610, "seed": 0}, "threads": 2, "dataset": "synthetic",
            "model_kind": "fine-tuned", "date": "2026-12-03", "versions": {}, "model_f16": "model-F16.gguf",
            "model_f16_sha256": "0" * 64, "cpu": "a CPU"}
    fig = figure({"meta": meta, "rows": rows, "peers": [], "hf_side_by_side": []})
    renderer = fig.canvas.get_renderer()
    for ax, key in zip(fig.axes[:2], ("HR@10", "p50_ms"), strict=True):
        texts = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        assert sorted(texts) == sorted(n for n, *_ in levels)
        names = list(texts)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not texts[a].overlaps(texts[b]), (key, a, b)
        for row in rows:
            cx, cy = ax.transData.transform((row["size_mb"], row[key]))
            for name, box in texts.items():
                if name != row["name"]:
                    assert not (box.x0 - _POINT_RADIUS_PX < cx < box.x1 + _POINT_RADIUS_PX
                                and box.y0 - _POINT_RADIUS_PX < cy < box.y1 + _POINT_RADIUS_PX), (key, name, row)
