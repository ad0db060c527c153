"""Can this machine run the llama.cpp we were built with? A probe meant to run in a *child* process.

``-march=native`` trusts CPUID; a VM may advertise instructions its hypervisor does not let a guest
execute (AMX on some Xeon VMs: ``tilezero`` faults although ``arch_prctl(ARCH_REQ_XCOMP_PERM)``
succeeds), and a wheel built elsewhere may use instructions this CPU lacks. Either way the first
batched ``llama_decode`` dies with SIGILL. Run here, in a child, the same death becomes a message for
``genrec-edge doctor`` instead of a dead parent.

What the child does (``python -m genrec_edge.llama_probe``, JSON on stdout, one object per line):

1. ``{"system_info": ...}``: ``llama_print_system_info()``, the instruction sets compiled in;
2. writes a small random LLaMA GGUF (no tokenizer training, no torch: gguf-py writes it, Q8_0 weights
   with rows a multiple of 32 so ggml's repacked and AMX kernels are eligible);
3. decodes a 64-token prompt in one batch, copies it to 3 more sequences and decodes one token in each
   (the beam search's pattern), checks the logits are finite: ``{"decode": "ok"}``.

The parent (:func:`probe`) reports the exit status: a signal (SIGILL, SIGSEGV) is named, not raised.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PROBE_TIMEOUT_S = 120

# llama_print_system_info() name -> /proc/cpuinfo flag (Linux x86). Names not listed are not instruction
# sets (LLAMAFILE, OPENMP, REPACK, ...) or have no single flag.
X86_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
    "AMX_BF16": "amx_bf16",
    "AMX_TILE": "amx_tile",
}
AMX_FEATURES = ("AMX_INT8", "AMX_BF16", "AMX_TILE")
BUILD_MARKER = "llama-cpp-build.json"  # written into the venv by scripts/llama_wheel.py


@dataclass(frozen=True)
class ProbeResult:
    system_info: str | None
    ok: bool
    detail: str
    features: dict[str, bool] = field(default_factory=dict)


def compiled_features(system_info: str) -> dict[str, bool]:
    """``"CPU : SSE3 = 1 | AVX = 1 | ..."`` -> ``{"SSE3": True, "AVX": True, ...}`` (every ``NAME = v`` pair)."""
    return {name: value != "0" for name, value in re.findall(r"([A-Z0-9_]+) = (\w+)", system_info)}


def missing_cpu_features(features: dict[str, bool], cpu_flags: set[str]) -> list[str]:
    """Instruction sets compiled in that the CPU (as the OS reports it) does not offer."""
    return [name for name, on in features.items() if on and name in X86_FLAGS and X86_FLAGS[name] not in cpu_flags]


def linux_cpu_flags() -> set[str] | None:
    """The ``flags`` of the first CPU in /proc/cpuinfo (the kernel hides what it does not enable); None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else None


def build_record() -> dict | None:
    """What scripts/llama_wheel.py recorded about the installed build (flags, AMX and why), if it built it."""
    try:
        return json.loads((Path(sys.prefix) / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


def amx_recorded() -> bool:
    """Did scripts/llama_wheel.py build AMX in on purpose (``LLAMA_AMX=1``, or ``auto`` after its AMX probe)?"""
    record = build_record()
    return bool(record and record.get("amx"))


# ---------------------------------------------------------------------------------------- the child
def write_probe_model(path: Path, hidden: int = 256, layers: int = 2, vocab: int = 320) -> Path:
    """A random LLaMA GGUF with Q8_0 matrices and a byte-level SentencePiece-style vocabulary."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<pad{i}>" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.UNUSED] * (len(tokens) - 259)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(name: str, rows: int, cols: int) -> None:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(w, Q.Q8_0), raw_dtype=Q.Q8_0)

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _emit(**payload) -> None:
    print(json.dumps(payload), flush=True)


def child_main() -> int:
    import llama_cpp
    import numpy as np

    _emit(system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip())
    from .engine import Engine

    with tempfile.TemporaryDirectory(prefix="genrec-probe-") as tmp:
        path = write_probe_model(Path(tmp) / "probe-Q8_0.gguf")
        with Engine.open(path, n_ctx=512, n_seq_max=4, threads=min(4, os.cpu_count() or 1)) as engine:
            prompt = [1] + [3 + (7 * i) % 256 for i in range(63)]
            engine.decode_sequence(prompt, 0, 0)
            for seq in (1, 2, 3):
                engine.seq_copy(0, seq, -1, -1)
            engine.decode([10, 20, 30, 40], [len(prompt)] * 4, [0, 1, 2, 3], [True] * 4)
            rows = np.stack([engine.logits(i) for i in range(4)])
            if not np.isfinite(rows).all():
                _emit(decode="non-finite logits")
                return 1
    _emit(decode="ok")
    return 0


# ---------------------------------------------------------------------------------------- the parent
def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def probe(timeout: float = PROBE_TIMEOUT_S, command: list[str] | None = None) -> ProbeResult:
    """Run the child (``command`` overrides it, for tests) and describe how it ended."""
    command = command or [sys.executable, "-m", "genrec_edge.llama_probe"]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return ProbeResult(None, False, f"the llama.cpp probe did not finish in {timeout:.0f} s")
    info, decode = None, None
    for line in proc.stdout.splitlines():
        try:
            payload = json.loads(line)
        except ValueError:
            continue
        info = payload.get("system_info", info)
        decode = payload.get("decode", decode)
    features = compiled_features(info or "")
    if proc.returncode < 0:
        name = signal_name(proc.returncode)
        what = "an illegal instruction" if name == "SIGILL" else name
        stage = "loading llama.cpp" if info is None else "a batched llama_decode"
        if features.get("AMX_INT8"):  # a VM that faults on AMX, or AMX code miscompiled (FINDINGS.md)
            advice = "it was built with AMX: rebuild it without with `make install LLAMA_AMX=0`"
        else:
            advice = ("it was built with instructions this CPU/OS cannot execute; rebuild it for this machine "
                      "with `make install` (or LLAMA_CPU=portable)")
        return ProbeResult(info, False, f"llama.cpp died of {what} ({name}) in {stage}: {advice}", features)
    if proc.returncode != 0 or decode != "ok":
        last = (proc.stderr.strip().splitlines() or [decode or "no output"])[-1]
        return ProbeResult(info, False, f"the llama.cpp probe failed (exit {proc.returncode}): {last[:200]}", features)
    return ProbeResult(info, True, "batched decode of a Q8_0 model ran", features)


if __name__ == "__main__":
    sys.exit(child_main())
