"""Build llama-cpp-python for this machine into a folder keyed by everything that shapes the binary.

Why: pip caches a wheel built from an sdist under the sdist's name, not under CMAKE_ARGS/CFLAGS or the CPU
it was built on. A flag change, or a pip cache shared with another machine, silently reinstalls a wheel
compiled for someone else's CPU (an AMX build dies with SIGILL on a VM whose hypervisor hides AMX).
Here the wheel lives in ``~/.cache/genrec-edge/llama-cpp/<version>-<key>/`` (``LLAMA_WHEELHOUSE``) where ``key`` hashes the version, the CMake
arguments, CFLAGS/CXXFLAGS, the machine, the Python tag, the compiler and, for ``native`` builds, what the
compiler expands ``-march=native`` to on *this* CPU. It is built with ``--no-cache-dir`` and installed
from that file, so pip's cache is never consulted; a second run with the same inputs installs nothing.

Usage (the Makefile runs it): ``python scripts/llama_wheel.py --python .venv/bin/python``
Environment: ``LLAMA_CPU=native|portable`` (default native); ``LLAMA_AMX=auto|1|0`` (default auto: AMX
code paths only in a native build on a CPU whose OS lets a child process execute and check an AMX tile
product, since hypervisors may advertise AMX and fault on it; the installed AMX build must then pass the
batched-decode check of ``genrec_edge.llama_probe``, or it is marked failed and replaced by a build without
AMX); ``LLAMA_CMAKE_EXTRA`` appended to the CMake arguments. Standard library only: it runs before anything
else is installed.
"""

from __future__ import annotations

import argparse
import functools
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


# What the OS and hypervisor let a process execute, not what CPUID claims: a C program that asks Linux for the
# tile state, configures one tile palette, multiplies two int8 tiles (TDPBSSD, what ggml's Q8_0 kernel uses)
# and checks the product. It runs in a child: a VM that advertises AMX and faults on it kills only the child.
AMX_PROBE_C = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
struct cfg { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed));
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        puts("arch_prctl refused"); return 3;
    }
    struct cfg c; memset(&c, 0, sizeof c); c.palette = 1;
    for (int t = 0; t < 3; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    int8_t a[16][64], b[16][64]; int32_t out[16][16];
    for (int i = 0; i < 16; i++) for (int j = 0; j < 64; j++) { a[i][j] = (int8_t)(i - j % 7); b[i][j] = (int8_t)(j % 5 - 2); }
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, out, 64);
    _tile_release();
    /* B is read as 16 rows of 4-byte groups: out[i][n] = sum_k sum_g a[i][4k+g] * b[k][4n+g] */
    for (int i = 0; i < 16; i++) for (int n = 0; n < 16; n++) {
        int32_t want = 0;
        for (int k = 0; k < 16; k++) for (int g = 0; g < 4; g++) want += a[i][4 * k + g] * b[k][4 * n + g];
        if (out[i][n] != want) { printf("wrong product at %d,%d\n", i, n); return 4; }
    }
    puts("amx ok");
    return 0;
}
"""


def amx_usable() -> tuple[bool, str]:
    """(can this process execute AMX-INT8 here, why): compile and run :data:`AMX_PROBE_C` in a child."""
    if not is_x86() or platform.system() != "Linux":
        return False, f"not x86 Linux ({platform.system()} {platform.machine()})"
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(prefix="amx-probe-") as tmp:
        src, exe = Path(tmp) / "amx.c", Path(tmp) / "amx"
        src.write_text(AMX_PROBE_C)
        try:
            built = subprocess.run([cc, "-O1", "-mamx-tile", "-mamx-int8", str(src), "-o", str(exe)],
                                   capture_output=True, text=True, timeout=60)
            if built.returncode != 0:
                return False, f"{cc} cannot compile AMX code: {(built.stderr.strip().splitlines() or ['?'])[-1]}"
            ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"probe failed to run ({exc.__class__.__name__})"
    if ran.returncode == 0 and ran.stdout.strip() == "amx ok":
        return True, "a child process executed and checked an AMX-INT8 tile product"
    if ran.returncode < 0:
        return False, f"the AMX probe died with signal {-ran.returncode} (CPUID lists AMX; the OS or hypervisor does not let a process run it)"
    return False, f"the AMX probe failed: {ran.stdout.strip() or f'exit {ran.returncode}'}"


# Source patches for builds with AMX (applied to the sdist; their text is part of the key). llama.cpp in
# llama-cpp-python 0.3.36 fills its AMX tile configuration on the stack, and GCC 12 drops every store to it
# but the first 32 bytes (it does not see `ldtilecfg` read all 64): rows and column widths are stack garbage,
# so the first batched decode of a Q8_0 model dies of a general-protection fault (SIGSEGV) in
# `ggml_backend_amx_mul_mat` (seen 2026-12-03; llama.cpp PR #26954 proposes a constant config instead).
# An empty asm that reads the whole struct makes the compiler write it first.
AMX_SOURCE_PATCHES = [
    ("vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp",
     "tc.colsb[7] = 64;\n\n    _tile_loadconfig(&tc);",
     "tc.colsb[7] = 64;\n\n"
     '    __asm__ __volatile__("" : : "m"(tc) : "memory");  // genrec-edge: ldtilecfg reads all 64 bytes\n'
     "    _tile_loadconfig(&tc);"),
]
FAILED_CHECK = "check-failed.json"  # in a wheel's folder: that build failed the batched-decode check here


def cpu_lists(flag: str) -> bool:
    """Does /proc/cpuinfo list ``flag`` (what CPUID claims, not what the OS lets a process run)?"""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in line.split(":", 1)[-1].split() for line in text.splitlines() if line.startswith("flags"))


def resolve_amx(value: str, cpu: str, extra: str) -> tuple[bool, str]:
    """(build with AMX, why) for ``LLAMA_AMX``: 1/0 as told; ``auto`` only where it was seen to work here."""
    value = value.strip().lower()
    if value in {"1", "on", "true", "yes"}:
        return True, "LLAMA_AMX=1"
    if value in {"0", "off", "false", "no"}:
        return False, "LLAMA_AMX=0"
    if value != "auto":
        raise SystemExit(f"llama_wheel: LLAMA_AMX must be auto, 1 or 0, not {value!r}")
    if cpu != "native" or not is_x86():
        return False, f"LLAMA_AMX=auto: AMX only in a native x86 build (this is {cpu}, {platform.machine()})"
    if not cpu_lists("amx_int8"):
        return False, "LLAMA_AMX=auto: this CPU does not list amx_int8"
    failed = wheel_dir(build_spec(cpu, True, extra)) / FAILED_CHECK
    if failed.exists():
        return False, f"LLAMA_AMX=auto: the AMX build failed its check here before ({failed})"
    usable, why = amx_usable()
    return usable, f"LLAMA_AMX=auto: {why}"


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
    return list(_compiler_identity(os.environ.get("CC", "cc"), native))


@functools.cache  # one install asks for several specs (the AMX one, its fallback): run the compiler once
def _compiler_identity(cc: str, native: bool) -> tuple[str, ...]:
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
    return tuple(out)


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
    if amx and is_x86():
        spec["source_patches"] = hashlib.sha256(json.dumps(AMX_SOURCE_PATCHES).encode()).hexdigest()[:16]
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
    target = f"llama-cpp-python=={spec['version']}"
    sources = Path(tempfile.mkdtemp(prefix=".sources-", dir=WHEELHOUSE)) if spec.get("source_patches") else None
    try:
        if sources is not None:
            target = str(patched_sources(spec["version"], sources, python, env))
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
               "--wheel-dir", str(staging), target]
        proc = subprocess.run(cmd, env=env)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if sources is not None:
            shutil.rmtree(sources, ignore_errors=True)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(f"llama_wheel: building llama-cpp-python failed (exit {proc.returncode}); see pip's output above")
    spec = dict(spec, built_s=round(time.monotonic() - start, 1), built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (staging / "build.json").write_text(json.dumps(spec, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)  # atomic: a half-built folder is never found by find_wheel
    return find_wheel(folder)


def patched_sources(version: str, folder: Path, python: str, env: dict) -> Path:
    """Download llama-cpp-python's sdist into ``folder``, unpack it and apply :data:`AMX_SOURCE_PATCHES`."""
    import tarfile

    got = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(folder), f"llama-cpp-python=={version}"], env=env)
    archives = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode != 0 or not archives:
        raise SystemExit(f"llama_wheel: could not download llama-cpp-python {version}'s sources (exit {got.returncode})")
    with tarfile.open(archives[0]) as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Python before 3.11.4 / 3.10.12: no extraction filters (the sdist is PyPI's)
            tar.extractall(folder)
    root = folder / archives[0].name[: -len(".tar.gz")]
    apply_patches(root, AMX_SOURCE_PATCHES)
    return root


def apply_patches(root: Path, patches: list[tuple[str, str, str]]) -> None:
    """Replace each patch's text, which must occur exactly once, in the unpacked sources at ``root``."""
    for rel, old, new in patches:
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if text.count(old) != 1:
            raise SystemExit(f"llama_wheel: {rel} in {root.name} is not the code the AMX patch expects "
                             f"({text.count(old)} matches); build without AMX (LLAMA_AMX=0)")
        path.write_text(text.replace(old, new))


def venv_marker(python: str) -> Path:
    """The build record in ``python``'s environment (sys.prefix): which keyed wheel is installed there."""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return Path(prefix) / MARKER


def installed_key(python: str) -> str | None:
    marker = venv_marker(python)
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
    venv_marker(python).write_text(json.dumps(dict(spec, wheel=str(wheel)), indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the venv to install into")
    parser.add_argument("--cpu", default=os.environ.get("LLAMA_CPU", "native"))
    parser.add_argument("--amx", default=os.environ.get("LLAMA_AMX") or "auto")
    parser.add_argument("--extra", default=os.environ.get("LLAMA_CMAKE_EXTRA", ""))
    parser.add_argument("--build-only", action="store_true", help="build (or find) the wheel, print its path")
    parser.add_argument("--print-key", action="store_true", help="print the build spec and exit")
    args = parser.parse_args(argv)
    amx, why = resolve_amx(args.amx, args.cpu, args.extra)
    spec = build_spec(args.cpu, amx, args.extra)
    if args.print_key:
        print(json.dumps(dict(spec, amx_reason=why), indent=2))
        return
    print(f"llama_wheel: AMX {'on' if amx else 'off'} ({why})", flush=True)
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    wheel = find_wheel(wheel_dir(spec)) or build(spec, args.python)
    if args.build_only:
        print(wheel)
        return
    if installed_key(args.python) != spec["key"]:
        install(spec, wheel, args.python)
        print(f"llama_wheel: installed {wheel}")
    else:
        print(f"llama_wheel: llama-cpp-python {spec['version']} already installed from {wheel}")
    if amx and args.amx.strip().lower() == "auto" and not verified(args.python, spec):
        fallback = build_spec(args.cpu, False, args.extra)
        wheel = find_wheel(wheel_dir(fallback)) or build(fallback, args.python)
        install(fallback, wheel, args.python)
        print(f"llama_wheel: installed {wheel} (without AMX)")


def verified(python: str, spec: dict) -> bool:
    """Run genrec_edge's batched-decode check on the installed AMX build, once; False (and the build marked
    failed, so ``auto`` leaves AMX out from now on) if it fails. True when the check cannot run yet
    (genrec_edge not installed: the Makefile's second pass runs it)."""
    marker = venv_marker(python)
    record = json.loads(marker.read_text())
    if record.get("checked"):
        return True
    checkout = Path(__file__).resolve().parent.parent
    ready = subprocess.run([python, "-c", "import gguf, numpy, genrec_edge.engine, genrec_edge.llama_probe"],
                           capture_output=True, cwd=checkout)
    if ready.returncode != 0:
        print("llama_wheel: the AMX build's batched-decode check runs once genrec-edge is installed", flush=True)
        return True
    code = ("import json; from genrec_edge import llama_probe as p; r = p.probe(); "
            "print(json.dumps({'ok': r.ok, 'detail': r.detail}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=checkout)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = {"ok": False, "detail": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    if result["ok"]:
        marker.write_text(json.dumps(dict(record, checked=result["detail"]), indent=2) + "\n")
        print(f"llama_wheel: the AMX build passed its check ({result['detail']})", flush=True)
        return True
    (wheel_dir(spec) / FAILED_CHECK).write_text(json.dumps(result, indent=2) + "\n")
    print(f"llama_wheel: the AMX build failed its check ({result['detail']}); building without AMX", flush=True)
    return False


if __name__ == "__main__":
    main()
