"""scripts/llama_wheel.py: the llama.cpp build key covers every input that shapes the binary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "llama_wheel.py"


@pytest.fixture(scope="module")
def lw():
    spec = importlib.util.spec_from_file_location("llama_wheel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_amx_is_off_unless_asked_for(lw, monkeypatch):
    monkeypatch.setattr(lw, "is_x86", lambda: True)
    cmake, cflags = lw.build_flags("native", amx=False, extra="")
    assert "-DGGML_NATIVE=ON" in cmake and "-DGGML_AMX_INT8=OFF" in cmake
    assert set(cflags) == {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"}
    cmake, cflags = lw.build_flags("native", amx=True, extra="")
    assert not any("AMX" in a for a in cmake) and cflags == []
    cmake, cflags = lw.build_flags("portable", amx=False, extra="")
    assert "-DGGML_NATIVE=OFF" in cmake and "-DGGML_AVX2=ON" in cmake and not any("AMX" in a for a in cmake)


def test_every_input_changes_the_key(lw, monkeypatch):
    base = lw.build_spec("native", False, "")["key"]
    assert lw.build_spec("native", False, "")["key"] == base  # deterministic
    assert lw.build_spec("portable", False, "")["key"] != base
    assert lw.build_spec("native", True, "")["key"] != base
    assert lw.build_spec("native", False, "-DGGML_LTO=ON")["key"] != base
    monkeypatch.setenv("CFLAGS", "-O3")
    assert lw.build_spec("native", False, "")["key"] != base
    monkeypatch.delenv("CFLAGS")
    # What -march=native means on another CPU is part of the key: a wheel built there is never reused here.
    monkeypatch.setattr(lw, "compiler_identity", lambda native: ["cc", "gcc 12", "-march=sapphirerapids", "-mamx-int8"])
    assert lw.build_spec("native", False, "")["key"] != base


def test_native_key_records_what_the_compiler_expands_native_to(lw):
    spec = lw.build_spec("native", False, "")
    if not any(part.startswith(("-march=", "-mcpu=", "-target-cpu")) or part == "-target-cpu" for part in spec["compiler"]):
        pytest.skip(f"compiler did not report its native expansion: {spec['compiler'][:3]}")
    assert spec["machine"] and spec["python"].startswith(sys.implementation.name)


def test_the_installed_llama_cpp_is_the_keyed_build_for_this_machine(lw):
    """`make install` installs the wheel whose key matches this machine's; a wheel from elsewhere does not match."""
    marker = Path(sys.prefix) / lw.MARKER
    if not marker.exists():
        pytest.skip("llama-cpp-python was not installed by `make install` in this environment")
    record = json.loads(marker.read_text())
    import platform

    assert record["machine"] == platform.machine()
    # The CPU-dependent part of the key: what the compiler makes of -march=native here.
    assert record["compiler"] == lw.compiler_identity(native=record["cpu"] == "native"), (
        "the installed llama.cpp was compiled for another CPU (or compiler): run `make install`"
    )


def _can_compile_amx(lw) -> bool:
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc")
    if not cc or not lw.is_x86():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "x.c"
        src.write_text("int main(void){return 0;}\n")
        return subprocess.run([cc, "-mamx-tile", "-mamx-int8", str(src), "-o", str(Path(tmp) / "x")],
                              capture_output=True).returncode == 0


def test_amx_probe_matches_what_this_machine_can_execute(lw):
    """Without AMX in CPUID the probe must fail (the tile instructions are illegal); with it, it runs or says why."""
    if not _can_compile_amx(lw):
        pytest.skip("no x86 C compiler that knows -mamx-int8 here")
    usable, why = lw.amx_usable()
    assert isinstance(usable, bool) and why
    if not lw.cpu_lists("amx_int8"):
        assert not usable, why
    elif not usable:
        assert "signal" in why or "arch_prctl" in why, why


def test_amx_probe_reports_a_faulting_cpu_as_unusable(lw, monkeypatch):
    """A VM that advertises AMX and kills the process on it: the probe survives, says no, and names the signal."""
    if not _can_compile_amx(lw):
        pytest.skip("no x86 C compiler that knows -mamx-int8 here")
    monkeypatch.setattr(lw, "AMX_PROBE_C", "int main(void) { __builtin_trap(); }\n")
    usable, why = lw.amx_usable()
    assert not usable and "signal 4" in why
    monkeypatch.setattr(lw, "AMX_PROBE_C", '#include <stdio.h>\nint main(void) { puts("wrong product"); return 4; }\n')
    usable, why = lw.amx_usable()
    assert not usable and "wrong product" in why


def test_llama_amx_auto_builds_with_amx_only_where_it_was_seen_to_work(lw, monkeypatch, tmp_path):
    monkeypatch.setattr(lw, "WHEELHOUSE", tmp_path)
    monkeypatch.setattr(lw, "is_x86", lambda: True)
    assert lw.resolve_amx("1", "portable", "")[0] and not lw.resolve_amx("0", "native", "")[0]
    with pytest.raises(SystemExit, match="auto, 1 or 0"):
        lw.resolve_amx("maybe", "native", "")
    probed = []
    monkeypatch.setattr(lw, "amx_usable", lambda: probed.append(1) or (True, "ran"))
    monkeypatch.setattr(lw, "cpu_lists", lambda flag: False)
    assert lw.resolve_amx("auto", "native", "") == (False, "LLAMA_AMX=auto: this CPU does not list amx_int8")
    monkeypatch.setattr(lw, "cpu_lists", lambda flag: flag == "amx_int8")
    assert not lw.resolve_amx("auto", "portable", "")[0]  # a portable build never takes this CPU's extras
    assert lw.resolve_amx("auto", "native", "") == (True, "LLAMA_AMX=auto: ran") and probed == [1]
    monkeypatch.setattr(lw, "amx_usable", lambda: (False, "the AMX probe died with signal 4"))
    assert lw.resolve_amx("auto", "native", "") == (False, "LLAMA_AMX=auto: the AMX probe died with signal 4")
    # An AMX build that failed the batched-decode check here is not tried again (until its key changes).
    monkeypatch.setattr(lw, "amx_usable", lambda: (True, "ran"))
    failed = lw.wheel_dir(lw.build_spec("native", True, ""))
    failed.mkdir(parents=True)
    (failed / lw.FAILED_CHECK).write_text("{}")
    usable, why = lw.resolve_amx("auto", "native", "")
    assert not usable and "failed its check" in why
    assert lw.resolve_amx("auto", "native", "-DGGML_LTO=ON")[0]


def test_amx_builds_carry_the_source_patch_in_their_key(lw, monkeypatch):
    monkeypatch.setattr(lw, "is_x86", lambda: True)
    assert "source_patches" not in lw.build_spec("native", False, "")
    with_patch = lw.build_spec("native", True, "")
    monkeypatch.setattr(lw, "AMX_SOURCE_PATCHES", [("a.cpp", "x", "y")])
    other = lw.build_spec("native", True, "")
    assert with_patch["source_patches"] != other["source_patches"] and with_patch["key"] != other["key"]


def test_source_patches_apply_once_or_stop_the_build(lw, tmp_path):
    """The AMX patch rewrites the tile-config code it was written for, and refuses any other version of it."""
    rel, old, new = lw.AMX_SOURCE_PATCHES[0]
    src = tmp_path / "llama_cpp_python-0.3.36" / rel
    src.parent.mkdir(parents=True)
    src.write_text("static void f() {\n" + old + "\n}\n")
    lw.apply_patches(src.parents[len(Path(rel).parts) - 1], lw.AMX_SOURCE_PATCHES)
    assert src.read_text() == "static void f() {\n" + new + "\n}\n" and '"m"(tc)' in new
    with pytest.raises(SystemExit, match="0 matches"):  # already patched, or upstream changed the code
        lw.apply_patches(src.parents[len(Path(rel).parts) - 1], lw.AMX_SOURCE_PATCHES)


def test_an_amx_build_that_fails_its_check_is_replaced_by_one_without(lw, monkeypatch, tmp_path, capsys):
    """`make install` with LLAMA_AMX=auto: when the installed AMX build fails the batched-decode check, the
    same run builds and installs the wheel without AMX (compiling is stubbed: this is the script's flow)."""
    monkeypatch.setattr(lw, "WHEELHOUSE", tmp_path)
    monkeypatch.setattr(lw, "resolve_amx", lambda value, cpu, extra: (value != "0", "test"))
    installed, checked = [], []

    def fake_build(spec, python):
        folder = lw.wheel_dir(spec)
        folder.mkdir(parents=True)
        (folder / "build.json").write_text("{}")
        (folder / "llama_cpp_python-0.3.36-py3-none-any.whl").write_text("")
        return lw.find_wheel(folder)

    monkeypatch.setattr(lw, "build", fake_build)
    monkeypatch.setattr(lw, "installed_key", lambda python: None)
    monkeypatch.setattr(lw, "install", lambda spec, wheel, python: installed.append(spec["amx"]))
    monkeypatch.setattr(lw, "verified", lambda python, spec: checked.append(spec["amx"]) or False)
    lw.main(["--amx", "auto", "--cpu", "native"])
    assert checked == [True] and installed == [True, False]
    assert "without AMX" in capsys.readouterr().out
    installed.clear(), checked.clear()
    lw.main(["--amx", "1", "--cpu", "native"])  # asked for AMX outright: installed as asked, no fallback
    assert checked == [] and installed == [True]


def test_a_patch_that_does_not_apply_stops_the_build_and_leaves_no_half_made_folders(lw, monkeypatch, tmp_path):
    monkeypatch.setattr(lw, "WHEELHOUSE", tmp_path)

    def stale(version, folder, python, env):
        (folder / "llama_cpp_python-0.3.36").mkdir()
        raise SystemExit("llama_wheel: ... is not the code the AMX patch expects (0 matches); build without AMX")

    monkeypatch.setattr(lw, "patched_sources", stale)
    spec = dict(lw.build_spec("native", False, ""), source_patches="x")
    with pytest.raises(SystemExit, match="LLAMA_AMX=0|build without AMX"):
        lw.build(spec, sys.executable)
    assert list(tmp_path.iterdir()) == []
