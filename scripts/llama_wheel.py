"""Build llama-cpp-python for this machine into a folder keyed by everything that shapes the binary.

Why: pip caches a wheel built from an sdist under the sdist's name, not under CMAKE_ARGS/CFLAGS or the CPU
it was built on. A flag change, or a pip cache shared with another machine, silently reinstalls a wheel
compiled for someone else's CPU (an AMX build dies with SIGILL on a VM whose hypervisor hides AMX).
Here the wheel lives in ``~/.cache/genrec-edge/llama-cpp/<version>-<key>/`` (``LLAMA_WHEELHOUSE``) where ``key`` hashes the version, the CMake
arguments, CFLAGS/CXXFLAGS, the machine, the Python tag, the compiler and, for ``native`` builds, what the
compiler expands ``-march=native`` to on *this* CPU. It is built with ``--no-cache-dir`` and installed
from that file, so pip's cache is never consulted; a second run with the same inputs installs nothing.

Usage (the Makefile runs it): ``python scripts/llama_wheel.py --python .venv/bin/python``
Environment: ``LLAMA_CPU=native|portable`` (default native), ``LLAMA_AMX=1`` to allow AMX code paths
(off by default: hypervisors may advertise AMX and not let a guest execute it), ``LLAMA_CMAKE_EXTRA``
appended to the CMake arguments. Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"
# Outside the checkout, so every clone (and CI on the same machine) reuses a build: safe because the key
# says exactly what the binary was compiled for. LLAMA_WHEELHOUSE moves it.
WHEELHOUSE = Path(os.environ.get("LLAMA_WHEELHOUSE") or
                  Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genrec-edge" / "llama-cpp")
MARKER = "llama-cpp-build.json"  # written into the venv: which keyed wheel is installed there

# Everything we do not use is off: 3-4x less to compile.
BASE_CMAKE = [
    "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
]
# ggml ignores GGML_AMX_* when GGML_NATIVE=ON (it passes -march=native), so the compiler flags do the work;
# GCC and clang let an explicit -mno-* win over -march=native whatever the order.
NO_AMX_CMAKE = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
NO_AMX_CFLAGS = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
# x86-64-v3 (Haswell, 2013+; every AMD since Zen): the portable choice, no build-machine detection.
PORTABLE_X86 = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]


def is_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}


def build_flags(cpu: str, amx: bool, extra: str) -> tuple[list[str], list[str]]:
    """(CMake arguments, extra C/C++ compiler flags) for a build kind."""
    if cpu not in {"native", "portable"}:
        raise SystemExit(f"llama_wheel: LLAMA_CPU must be native or portable, not {cpu!r}")
    cflags: list[str] = []
    if cpu == "native":
        cmake = ["-DGGML_NATIVE=ON"]
        if is_x86() and not amx:
            cmake += NO_AMX_CMAKE
            cflags += NO_AMX_CFLAGS
    else:
        cmake = PORTABLE_X86[:] if is_x86() else ["-DGGML_NATIVE=OFF"]
        if is_x86() and amx:
            cmake += ["-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
                      "-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON", "-DGGML_AMX_BF16=ON"]
    return cmake + BASE_CMAKE + extra.split(), cflags


def compiler_identity(native: bool) -> list[str]:
    """The compiler's version and, for native builds, what -march/-mcpu=native means on this CPU."""
    cc = os.environ.get("CC", "cc")
    out = [cc]
    try:
        out.append(subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0])
        if native:
            flag = "-march=native" if is_x86() else "-mcpu=native"
            probe = subprocess.run([cc, "-###", flag, "-x", "c", "-c", os.devnull, "-o", os.devnull],
                                   capture_output=True, text=True, timeout=30)
            # The compiler proper's command line (gcc: cc1 with the expanded -m flags; clang: -cc1 with
            # -target-cpu/-target-feature): everything but paths and temp names.
            line = next((ln for ln in probe.stderr.splitlines() if "cc1" in ln), "")
            out += [t.strip('"') for t in line.split()[1:] if "/" not in t and not t.strip('"').startswith("-dump")]
    except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
        out.append(f"unknown ({exc.__class__.__name__})")
    return out


def build_spec(cpu: str, amx: bool, extra: str) -> dict:
    cmake, cflags = build_flags(cpu, amx, extra)
    env_cflags = os.environ.get("CFLAGS", "").split() + cflags
    env_cxxflags = os.environ.get("CXXFLAGS", "").split() + cflags
    spec = {
        "package": "llama-cpp-python",
        "version": VERSION,
        "cpu": cpu,
        "amx": amx,
        "cmake_args": cmake,
        "cflags": env_cflags,
        "cxxflags": env_cxxflags,
        "machine": platform.machine(),
        "system": platform.system(),
        "python": f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}",
        "compiler": compiler_identity(native=cpu == "native"),
    }
    spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


def wheel_dir(spec: dict) -> Path:
    return WHEELHOUSE / f"{spec['version']}-{spec['key']}"


def find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    return wheels[0] if wheels and (folder / "build.json").exists() else None


def build(spec: dict, python: str) -> Path:
    folder = wheel_dir(spec)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=WHEELHOUSE))
    env = dict(os.environ, CMAKE_ARGS=" ".join(spec["cmake_args"]), CFLAGS=" ".join(spec["cflags"]),
               CXXFLAGS=" ".join(spec["cxxflags"]), PIP_NO_CACHE_DIR="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    print(f"llama_wheel: compiling llama-cpp-python {spec['version']} ({spec['cpu']}, AMX "
          f"{'on' if spec['amx'] else 'off'}) into {folder} — 10-35 min on 2 cores, once",
          flush=True)
    start = time.monotonic()
    cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
           "--wheel-dir", str(staging), f"llama-cpp-python=={spec['version']}"]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(f"llama_wheel: building llama-cpp-python failed (exit {proc.returncode}); see pip's output above")
    spec = dict(spec, built_s=round(time.monotonic() - start, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (staging / "build.json").write_text(json.dumps(spec, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)  # atomic: a half-built folder is never found by find_wheel
    return find_wheel(folder)


def installed_key(python: str) -> str | None:
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True).stdout.strip()
    marker = Path(prefix) / MARKER
    if not marker.exists():
        return None
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        return None
    try:
        return json.loads(marker.read_text()).get("key")
    except (OSError, ValueError):
        return None


def install(spec: dict, wheel: Path, python: str) -> None:
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-cache-dir",
                    str(wheel)], check=True)
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    (Path(prefix) / MARKER).write_text(json.dumps(dict(spec, wheel=str(wheel)), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the venv to install into")
    parser.add_argument("--cpu", default=os.environ.get("LLAMA_CPU", "native"))
    parser.add_argument("--amx", default=os.environ.get("LLAMA_AMX", "0"))
    parser.add_argument("--extra", default=os.environ.get("LLAMA_CMAKE_EXTRA", ""))
    parser.add_argument("--build-only", action="store_true", help="build (or find) the wheel, print its path")
    parser.add_argument("--print-key", action="store_true", help="print the build spec and exit")
    args = parser.parse_args(argv)
    spec = build_spec(args.cpu, args.amx in {"1", "on", "true", "yes"}, args.extra)
    if args.print_key:
        print(json.dumps(spec, indent=2))
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(wheel_dir(spec)) or build(spec, args.python)
    if args.build_only:
        print(wheel)
        return
    if installed_key(args.python) == spec["key"]:
        print(f"llama_wheel: llama-cpp-python {spec['version']} already installed from {wheel}")
        return
    install(spec, wheel, args.python)
    print(f"llama_wheel: installed {wheel}")


if __name__ == "__main__":
    main()
