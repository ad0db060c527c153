"""``genrec-edge doctor`` on real SQLite files and real GGUF files, healthy and broken.

The GGUF files here are written with gguf's own ``GGUFWriter`` (header, metadata and one small tensor):
doctor only reads headers, so a full model is not needed to exercise each check.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from genrec_edge.cli import main
from genrec_edge.doctor import FAIL, OK, WARN, run_checks
from genrec_edge.history import HistoryDB


@pytest.fixture(autouse=True)
def _own_home(tmp_path, monkeypatch):
    """Without --model, doctor checks the default model if it is built: not this machine's, here."""
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))


def catalog_hash(db_path: Path) -> str:
    with HistoryDB.open(db_path, readonly=True) as db:
        return db.catalog().sha256


def write_gguf(path: Path, *, arch: str = "llama", catalog_sha256: str | None = None, tokenizer: bool = True) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["<s>", "</s>", "a", "b"])
    if catalog_sha256 is not None:
        writer.add_string("genrec.catalog_sha256", catalog_sha256)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["doctor", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_healthy_database_and_model(tiny_db, tmp_path, capsys):
    model = write_gguf(tmp_path / "m.gguf", catalog_sha256=catalog_hash(tiny_db))
    checks = run_checks(tiny_db, model)
    assert statuses(checks) == {
        "database": OK, "integrity": OK, "schema": OK, "journal": OK, "catalog": OK,
        "model": OK, "architecture": OK, "tokenizer": OK, "catalog match": OK, "prior": OK,
    }
    rc, out, err = run_cli(capsys, "--db", str(tiny_db), "--model", str(model))
    assert rc == 0, out + err
    lines = out.strip().splitlines()
    # 4 runtime checks (llama.cpp build, cpu features, batched decode, threads) + the 10 above, all ok
    assert len(lines) == 14 and all(line.startswith("ok ") for line in lines)
    assert "ok   prior: none next to the model" in out
    assert [line.split(":")[0].split(maxsplit=1)[1] for line in lines[:4]] == [
        "llama.cpp", "cpu features", "batched decode", "threads"]
    assert "20 items, 9 users" in out
    assert err == ""


@pytest.mark.parametrize(
    ("case", "check", "code", "message"),
    [
        ("other catalog", "catalog match", 8, "model was trained for catalog"),
        ("foreign arch", "architecture", 7, "foreign model (architecture 'gpt2'"),
        ("no tokenizer", "tokenizer", 7, "no tokenizer (tokenizer.ggml.model missing)"),
        ("truncated", "model", 7, "truncated"),
        ("not gguf", "model", 7, "not a GGUF file (bad magic)"),
        ("missing", "model", 4, "no such model file"),
    ],
)
def test_model_problems(tiny_db, tmp_path, capsys, case, check, code, message):
    path = tmp_path / "m.gguf"
    sha = catalog_hash(tiny_db)
    if case == "other catalog":
        write_gguf(path, catalog_sha256="0" * 64)
    elif case == "foreign arch":
        write_gguf(path, arch="gpt2", catalog_sha256=sha)
    elif case == "no tokenizer":
        write_gguf(path, catalog_sha256=sha, tokenizer=False)
    elif case == "truncated":
        data = write_gguf(path, catalog_sha256=sha).read_bytes()
        path.write_bytes(data[: len(data) - 40])
    elif case == "not gguf":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    rc, out, err = run_cli(capsys, "--db", str(tiny_db), "--model", str(path))
    assert rc == code
    assert f"FAIL {check}: " in out
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {check}: ") and message in errors[0]
    assert "ok   integrity" in out  # the database side is still checked and fine
    assert "prior:" not in out  # a broken model has no prior to report ("ok prior: none" read as fine)


def test_model_without_provenance_is_a_warning(tiny_db, tmp_path, capsys):
    model = write_gguf(tmp_path / "base.gguf")
    assert statuses(run_checks(tiny_db, model))["catalog match"] == WARN
    rc, out, _ = run_cli(capsys, "--db", str(tiny_db), "--model", str(model))
    assert rc == 0 and "warn catalog match: model has no genrec.catalog_sha256" in out


@pytest.mark.parametrize(
    ("case", "check", "message"),
    [
        ("missing", "database", "no database at"),
        ("not sqlite", "database", "not a SQLite database"),
        ("directory", "database", "not a SQLite database (a directory)"),
        ("foreign sqlite", "database", "not a genrec-edge database"),
        ("catalog drift", "catalog", "stored catalog hash"),
        ("corrupt page", None, "corrupt"),
    ],
)
def test_database_problems(tiny_db, tmp_path, capsys, case, check, message):
    path = tiny_db
    if case == "missing":
        path = tmp_path / "nope.db"
    elif case == "not sqlite":
        path = tmp_path / "text.db"
        path.write_text("user_id,item_id\n1,2\n" * 200)
    elif case == "directory":
        path = tmp_path / "dir.db"
        path.mkdir()
    elif case == "foreign sqlite":
        path = tmp_path / "other.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.close()
    elif case == "catalog drift":
        with sqlite3.connect(tiny_db) as conn:
            conn.execute("UPDATE items SET title = 'Changed (1995)' WHERE id = 10")
        conn.close()
    elif case == "corrupt page":
        # Overwrite the interior of the last page (a b-tree page of the data) with garbage.
        data = bytearray(tiny_db.read_bytes())
        page = int.from_bytes(data[16:18], "big")
        start = len(data) - page
        data[start : start + page] = b"\xa5" * page
        tiny_db.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, "--db", str(path))
    assert rc == 3, out + err
    fails = [line for line in err.strip().splitlines()]
    assert fails and all(line.startswith("error: ") for line in fails)
    assert any(message in line for line in fails), err
    if check is not None:
        assert any(line.startswith(f"error: {check}: ") for line in fails)


def test_non_wal_database_is_a_warning(tiny_db, capsys):
    with sqlite3.connect(tiny_db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    checks = run_checks(tiny_db, None)
    assert statuses(checks)["journal"] == WARN
    assert statuses(checks)["model"] == WARN  # skipped
    rc, out, _ = run_cli(capsys, "--db", str(tiny_db))
    assert rc == 0 and "journal_mode=delete" in out


def test_without_a_model_doctor_checks_the_default_model_once_it_is_built(tiny_db, tmp_path, capsys):
    from genrec_edge import default_model

    rc, out, _ = run_cli(capsys, "--db", str(tiny_db))
    assert rc == 0 and "warn model: skipped (no --model, and the default model is not built yet" in out
    built = default_model.level_path()  # where `recommend` would build it under this GENREC_EDGE_HOME
    assert str(tmp_path / "home") in str(built) and built.name.endswith("-Q8_0.gguf")
    built.parent.mkdir(parents=True)
    write_gguf(built, catalog_sha256="f" * 64)  # built for another catalog
    rc, out, err = run_cli(capsys, "--db", str(tiny_db))
    assert f"ok   model: {built} (GGUF v3" in out
    assert rc == 8 and "error: catalog match: model was trained for catalog" in err
    assert {p.name for p in built.parent.iterdir()} == {built.name}  # nothing built or converted


def test_doctor_never_writes(tiny_db, tmp_path):
    model = write_gguf(tmp_path / "m.gguf", catalog_sha256=catalog_hash(tiny_db))
    before = tiny_db.read_bytes()
    mtime = tiny_db.stat().st_mtime_ns
    run_checks(tiny_db, model)
    assert tiny_db.read_bytes() == before and tiny_db.stat().st_mtime_ns == mtime


def test_json_output(tiny_db, tmp_path, capsys):
    model = write_gguf(tmp_path / "m.gguf", catalog_sha256="f" * 64)
    rc, out, _ = run_cli(capsys, "--db", str(tiny_db), "--model", str(model), "--json")
    assert rc == 8
    report = json.loads(out)
    assert report["ok"] is False
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["catalog match"]["status"] == FAIL and by_name["catalog match"]["exit_code"] == 8
    assert by_name["integrity"]["status"] == OK


def test_doctor_command_is_documented(capsys):
    rc = main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "Example:" in out and "--model" in out


# ------------------------------------------------------------------------------ the llama.cpp build
def test_installed_llama_cpp_has_amx_only_where_its_build_record_says_so():
    """AMX code paths only in a build that scripts/llama_wheel.py made with AMX on purpose (LLAMA_AMX=1, or
    auto after its probe ran an AMX tile product here), and there they are compiled in (issue: SIGILL on VMs)."""
    from genrec_edge import llama_probe

    result = llama_probe.probe()
    assert result.system_info, "the probe printed no llama.cpp system info"
    assert result.features.get("AVX2") or result.features.get("NEON") or result.features.get("SSE3"), result.system_info
    amx = [f for f in llama_probe.AMX_FEATURES if result.features.get(f)]
    record = llama_probe.build_record() or {}  # no record: a wheel from elsewhere, which must not have AMX
    if record.get("amx"):
        assert "AMX_INT8" in amx, f"the build record says AMX, llama.cpp reports {result.system_info}"
    else:
        assert not amx, f"llama.cpp was built with {amx}, its build record says without: {result.system_info}"


def test_the_runtime_probe_passes_here_and_doctor_prints_the_system_info(tiny_db, capsys):
    from genrec_edge import llama_probe

    result = llama_probe.probe()
    assert result.ok, result.detail
    rc = main(["doctor", "--db", str(tiny_db)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ok   llama.cpp: CPU :" in out and "ok   batched decode" in out
    assert "ok   threads: " in out


@pytest.mark.parametrize(("adapt", "spin", "policy", "status", "words"), [
    (True, 3000, "passive", "ok", "fewer while other programs keep cores busy; llama.cpp's threads spin 3000"),
    (False, None, "passive", "ok", "2 of 2 CPUs, fixed; llama.cpp's threads sleep at a barrier"),
    (False, 3000, "passive", "ok", "fixed; llama.cpp's threads spin 3000 times"),
    (False, 30000, "passive", "warn", "GOMP_SPINCOUNT=30000"),
    (False, None, "ACTIVE", "warn", "OMP_WAIT_POLICY=active"),
])
def test_threads_check(adapt, spin, policy, status, words):
    from genrec_edge.doctor import check_threads

    check = check_threads(adapt, spin, policy, threads=2, cpus=2)
    assert check.status == status and words in check.detail and check.ok


@pytest.mark.parametrize("adapt", [True, False])
def test_threads_check_names_no_spin_on_a_build_without_openmp(adapt):
    """ggml's own thread pool ignores GOMP_SPINCOUNT: doctor must not report (or warn about) a spin there."""
    from genrec_edge.doctor import check_threads

    check = check_threads(adapt, 30000, "active", threads=2, cpus=2, openmp=False)
    assert check.status == "ok" and "without OpenMP" in check.detail and "spin" not in check.detail


def test_a_child_killed_by_sigill_becomes_one_failing_check():
    """The probe's parent survives an illegal instruction in the child and names it; doctor fails with 13."""
    import sys

    from genrec_edge import llama_probe
    from genrec_edge.doctor import check_runtime, exit_code

    crash = (
        "import json, os, signal; print(json.dumps({'system_info': 'CPU : AVX2 = 1 | AMX_INT8 = 1 |'}), flush=True);"
        " os.kill(os.getpid(), signal.SIGILL)"
    )
    result = llama_probe.probe(command=[sys.executable, "-c", crash])
    assert not result.ok
    assert "illegal instruction (SIGILL)" in result.detail and "batched llama_decode" in result.detail
    assert result.features == {"AVX2": True, "AMX_INT8": True}
    assert "LLAMA_AMX=0" in result.detail  # an AMX build that crashes: rebuild without AMX
    plain = llama_probe.probe(command=[sys.executable, "-c", crash.replace(" | AMX_INT8 = 1", "")])
    assert not plain.ok and "LLAMA_AMX" not in plain.detail and "cannot execute" in plain.detail
    checks = check_runtime(result)
    failed = [c for c in checks if c.status == FAIL]
    assert failed and failed[-1].name == "batched decode"
    assert exit_code(checks) == 13


def test_a_child_that_dies_before_printing_is_reported_as_a_load_failure():
    import sys

    from genrec_edge import llama_probe

    result = llama_probe.probe(command=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert not result.ok and "in loading llama.cpp" in result.detail and result.system_info is None


def test_compiled_features_missing_from_the_cpu_are_named():
    from genrec_edge import llama_probe

    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 0 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 |"
    features = llama_probe.compiled_features(info)
    assert features["AVX512"] and not features["AVX512_VNNI"] and features["OPENMP"]
    flags = {"pni", "avx2", "avx512f", "amx_int8"}
    assert llama_probe.missing_cpu_features(features, flags) == []
    assert llama_probe.missing_cpu_features(features, flags - {"avx512f", "amx_int8"}) == ["AVX512", "AMX_INT8"]


def test_doctor_fails_on_an_instruction_set_this_cpu_lacks():
    from genrec_edge import llama_probe
    from genrec_edge.doctor import check_runtime

    if llama_probe.linux_cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    # A build made elsewhere with an instruction set no CPU reports under this name.
    info = "CPU : AVX2 = 1 | AMX_TILE = 1 |" if "amx_tile" not in llama_probe.linux_cpu_flags() else "CPU : AVX_VNNI = 1 |"
    fake = llama_probe.ProbeResult(info, True, "ran", llama_probe.compiled_features(info))
    if not llama_probe.missing_cpu_features(fake.features, llama_probe.linux_cpu_flags()):
        pytest.skip("this CPU offers every instruction set the fake build names")
    checks = check_runtime(fake)
    cpu = next(c for c in checks if c.name == "cpu features")
    assert cpu.status == FAIL and "rebuild" in cpu.detail and cpu.exit_code == 13


def test_the_prior_next_to_the_model_is_checked_as_serve_loads_it(tiny_db, tmp_path, capsys):
    # doctor said "ok" for a model whose prior serve and recommend then refused (unreadable, other catalog).
    model = write_gguf(tmp_path / "m.gguf", catalog_sha256=catalog_hash(tiny_db))
    assert main(["prior", "build", "--kind", "pop", "--db", str(tiny_db), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert statuses(run_checks(tiny_db, model))["prior"] == OK
    sidecar = tmp_path / "cf-prior.json"
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    sidecar.write_text(json.dumps({**data, "catalog_sha256": "0" * 64}), encoding="utf-8")
    rc, out, _ = run_cli(capsys, "--db", str(tiny_db), "--model", str(model))
    assert rc == 8 and "FAIL prior: " in out
    sidecar.write_text("{not json", encoding="utf-8")
    rc, out, _ = run_cli(capsys, "--db", str(tiny_db), "--model", str(model))
    assert rc == 7 and "FAIL prior: " in out
