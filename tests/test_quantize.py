"""llama.cpp quantization of our GGUF: every level writes a loadable model and reports what it became."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import interrupt_once, start_cli_as_a_shell_would
from tinymodel import tiny_gguf

from genrec_edge.cli import main
from genrec_edge.convert import validate_gguf_header
from genrec_edge.errors import FileAccessError, UsageError
from genrec_edge.quantize import DEFAULT_LEVELS, output_path, parse_levels, quantize

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp is imported (FINDINGS.md)

# Hidden 256 = one K-quant block per row, so K-quant levels really produce K-quant tensors.
WIDE = {"hidden_size": 256, "intermediate_size": 512}
# The ggml type each level's bulk of weights must take (llama.cpp keeps some tensors higher, never lower).
MAIN_TYPE = {
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q4_0": "Q4_0",
    "Q3_K_M": "Q3_K",
    "Q2_K": "Q2_K",
}

MIN_CORRELATION = {"F16": 0.9999, "Q8_0": 0.98, "Q6_K": 0.98, "Q5_K_M": 0.85, "Q5_0": 0.85, "Q4_K_M": 0.85,
                   "Q4_0": 0.8, "Q3_K_M": 0.6, "Q2_K": 0.3}


def _logits(path, ids):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    src = tiny_gguf(tmp_path_factory.mktemp("quant"), outtype="f16", **WIDE)
    return src, quantize(src, ["F16", *DEFAULT_LEVELS], threads=2, progress=False)


def test_every_level_writes_a_loadable_model(quantized):
    src, results = quantized
    assert [r.level for r in results] == ["F16", *DEFAULT_LEVELS]
    ids = [1, 5, 17, 42, 99, 200, 7]
    reference = _logits(src, ids)
    for r in results:
        assert r.path == (src if r.level == "F16" else src.parent / f"model-{r.level}.gguf")
        assert r.size_bytes == r.path.stat().st_size
        info = validate_gguf_header(r.path)
        assert r.bpw == pytest.approx(r.size_bytes * 8 / info.n_params)
        logits = _logits(r.path, ids)
        assert logits.shape == reference.shape and np.isfinite(logits).all(), r.level
        assert not np.allclose(logits, 0.0)
        # Quantization perturbs, it does not scramble: logits stay correlated with F16's, less so at
        # fewer bits (random gaussian weights are a worst case for 2-3 bit levels).
        assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > MIN_CORRELATION[r.level], r.level


def test_reported_types_are_what_the_file_holds(quantized):
    src, results = quantized
    n_tensors = len(validate_gguf_header(src).tensors)
    for r in results[1:]:
        assert sum(r.tensor_types.values()) == n_tensors
        assert r.tensor_types["F32"] == 5  # 2 layers x 2 norms + output norm stay F32
        bulk = max((k for k in r.tensor_types if k != "F32"), key=r.tensor_types.get)
        assert bulk == MAIN_TYPE[r.level], (r.level, r.tensor_types)
    sizes = {r.level: r.bpw for r in results}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q6_K"] > sizes["Q4_0"] > sizes["Q2_K"]


def test_narrow_model_falls_back_from_k_quants(tmp_path):
    # Rows of 64 are not a multiple of the 256-wide K-quant block: llama.cpp silently picks other
    # types, and the report must show it (as for SmolLM2's 576-wide tensors).
    src = tiny_gguf(tmp_path, outtype="f16")
    (result,) = quantize(src, "Q4_K_M", threads=2, progress=False)
    assert not any(t.endswith("_K") for t in result.tensor_types), result.tensor_types
    assert sum(result.tensor_types.values()) == len(validate_gguf_header(src).tensors)


def test_refusals(quantized, tmp_path):
    src, results = quantized
    q8 = next(r.path for r in results if r.level == "Q8_0")
    with pytest.raises(UsageError, match="already exists"):
        quantize(src, "Q8_0", progress=False)
    with pytest.raises(UsageError, match="already quantized"):
        quantize(q8, "Q4_0", out_dir=tmp_path, progress=False)
    (requant,) = quantize(q8, "Q4_0", out_dir=tmp_path, allow_requantize=True, progress=False)
    assert requant.path == tmp_path / "model-Q8_0-Q4_0.gguf" and requant.tensor_types.get("Q4_0")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(FileAccessError, match="a-file is a file, where a folder is needed"):
        quantize(src, "Q4_0", out_dir=a_file / "sub", progress=False)
    (made,) = quantize(src, "Q4_0", out_dir=tmp_path / "new" / "sub", progress=False)  # made, like merge's --out
    assert made.path == tmp_path / "new" / "sub" / "model-Q4_0.gguf" and made.path.is_file()
    for threads in (0, -3):  # was silently "all cores"
        with pytest.raises(UsageError, match="--threads must be >= 1"):
            quantize(src, "Q4_0", out_dir=tmp_path, threads=threads, progress=False)
    with pytest.raises(UsageError, match="unknown quantization level"):
        parse_levels("Q8_0,Q9_9")
    assert parse_levels(" q8_0, Q4_K_M ,q8_0") == ["Q8_0", "Q4_K_M"]


def test_output_names():
    from pathlib import Path

    assert output_path(Path("/m/model-F16.gguf"), "Q4_0") == Path("/m/model-Q4_0.gguf")
    assert output_path(Path("/m/base-f32.gguf"), "Q8_0", Path("/o")) == Path("/o/base-Q8_0.gguf")
    assert output_path(Path("/m/base.gguf"), "Q2_K") == Path("/m/base-Q2_K.gguf")


def test_cli_quantize_prints_the_table(quantized, tmp_path, capsys):
    src, _ = quantized
    local = tmp_path / "model-F16.gguf"
    shutil.copy(src, local)
    capsys.readouterr()
    assert main(["quantize", str(local), "--levels", "Q8_0,Q4_K_M", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "Q4_K×" in out and "bits/weight" in out
    assert (tmp_path / "model-Q8_0.gguf").is_file() and (tmp_path / "model-Q4_K_M.gguf").is_file()
    assert main(["quantize", str(local), "--levels", "Q8_0"]) == UsageError.exit_code
    assert "already exists" in capsys.readouterr().err


def test_progress_bar_reaches_every_tensor_without_a_line_per_tensor(tmp_path, capsys):
    src = tiny_gguf(tmp_path, outtype="f16")
    tensors = len(validate_gguf_header(src).tensors)
    (tmp_path / "q").mkdir()
    quantize(src, "Q8_0", out_dir=tmp_path / "q", threads=2, progress=True)
    err = capsys.readouterr().err
    assert f"{tensors}/{tensors}" in err, err
    # tqdm redraws at most every 0.1 s: a log read through a pipe must not get one line per tensor.
    assert err.count("\r") < tensors, err


def test_ctrl_c_stops_quantize_with_no_output_of_the_level_it_was_on(tmp_path):
    """Ctrl-C lands in llama.cpp's log callback (Python code called from C), where ctypes used to print the
    KeyboardInterrupt and drop it: the quantizer finished every level and exited 0."""
    import subprocess

    src = tiny_gguf(tmp_path / "big", outtype="f16", hidden_size=1024, intermediate_size=4096)  # seconds a level
    out = tmp_path / "out"
    out.mkdir()
    levels = ["Q4_K_M", "Q6_K", "Q5_K_M", "Q4_0"]
    proc = start_cli_as_a_shell_would("quantize", str(src), "--levels", ",".join(levels), "--out-dir", str(out),
                                      "--threads", "1", stderr=subprocess.PIPE, text=True)
    err = interrupt_once(proc, lambda: bool(list(out.glob(".*partial*"))), "quantize")
    assert proc.returncode == 130, err[-500:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted", err[-500:]
    left = sorted(p.name for p in out.iterdir())
    assert len(left) < len(levels) and not [name for name in left if "partial" in name], left
