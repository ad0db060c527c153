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
