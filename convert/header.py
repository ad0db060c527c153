"""A bounded GGUF header parser, run before any other parser touches a file we did not write.

Why our own: gguf 0.19's ``GGUFReader`` never returns on a 49-byte file that declares a 2^63-element array
and accepts string lengths past the end of the file, and llama.cpp has had GGUF-parsing CVEs. Here every
count and length is checked against the bytes that are really left before anything is allocated or looped
over, so the work done is proportional to the file size and a bad file fails fast with one line.

Layout (GGUF v2/v3, little-endian)::

    "GGUF" u32 version  u64 n_tensors  u64 n_kv
    n_kv      x  (string key, u32 value_type, value)
    n_tensors x  (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment, then tensor data (offsets relative to that point)

A string is ``u64 length`` + UTF-8 bytes; an array is ``u32 element_type, u64 count`` + elements.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from genrec_edge.errors import CorruptModelError, FileAccessError, NotFoundError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_KEY_BYTES = 65_535
# Arrays longer than this (the vocabulary, merges, scores) are skipped: only their length is recorded.
MAX_KEPT_ARRAY = 64
_U64 = struct.Struct("<Q")
GENREC_PREFIX = "genrec."

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# Smallest encoding of one KV pair (empty key, u32 type, 1-byte value) and of one tensor info
# (empty name, n_dims, type, offset): they bound the declared counts by the file size.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] (the contiguous row length) first
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeaderInfo:
    path: Path
    version: int
    alignment: int
    file_size: int
    data_offset: int
    metadata: dict[str, Any]  # small values only; see array_lengths for the skipped big arrays
    array_lengths: dict[str, int] = field(default_factory=dict)  # every array KV -> its element count
    tensors: tuple[TensorInfo, ...] = ()

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """File size * 8 / parameters: the effective bits per weight, metadata and F32 norms included."""
        return self.file_size * 8 / max(self.n_params, 1)

    def tensor_type_counts(self) -> dict[str, int]:
        """How many tensors each ggml type holds, e.g. ``{"Q8_0": 14, "F32": 5}``."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _Cursor:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, size: int, label: str):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.label = label

    def fail(self, problem: str) -> CorruptModelError:
        return CorruptModelError(f"{self.label}: {problem}")

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated at byte {self.size} (needed {n} more bytes at offset {self.pos})")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def string(self, what: str, max_bytes: int | None = None) -> str:
        start = self.pos
        length = self.u64()
        if max_bytes is not None and length > max_bytes:
            raise self.fail(f"{what} at byte {start} is {length} bytes long (limit {max_bytes})")
        if length > self.size - self.pos:
            raise self.fail(f"{what} at byte {start} declares {length} bytes, past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8") from None

    def skip_strings(self, count: int, key: str) -> None:
        """Skip ``count`` strings of array ``key`` with the checks of :meth:`string` (not their UTF-8). A
        tokenizer's vocabulary and merges are ~100k strings: one tight loop, messages built only on failure."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            (length,) = unpack(buf, pos)
            if length > size - pos - 8:
                raise self.fail(f"element {i} of {key!r} at byte {pos} declares {length} bytes, past the end of the file")
            pos += 8 + length
        self.pos = pos

    def value_type(self, what: str) -> GGUFValueType:
        start = self.pos
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} at byte {start} has unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str, array_lengths: dict[str, int]) -> Any:
    if vtype in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[vtype])
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    # ARRAY
    elem_type = cur.value_type(f"element type of {key!r}")
    if elem_type == GGUFValueType.ARRAY:
        raise cur.fail(f"{key!r} is a nested array (not supported)")
    count_at = cur.pos
    count = cur.u64()
    min_elem = 8 if elem_type == GGUFValueType.STRING else struct.calcsize(_SCALAR_FORMATS[elem_type])
    remaining = cur.size - cur.pos
    if count > remaining // min_elem:
        raise cur.fail(
            f"array {key!r} at byte {count_at} declares {count} elements but only {remaining} bytes remain"
        )
    array_lengths[key] = count
    keep = count <= MAX_KEPT_ARRAY
    if elem_type == GGUFValueType.STRING:
        if not keep:
            cur.skip_strings(count, key)
            return None
        return [cur.string(f"element {i} of {key!r}") for i in range(count)]
    n_bytes = count * min_elem
    cur.need(n_bytes)
    if keep:
        fmt = "<" + _SCALAR_FORMATS[elem_type][1] * count
        values = list(struct.unpack_from(fmt, cur.buf, cur.pos))
    else:
        values = None
    cur.pos += n_bytes
    return values


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[0] % block_size:
        raise cur.fail(f"tensor {name!r}: row length {shape[0]} is not a multiple of {ggml_type.name}'s block {block_size}")
    n = 1
    for d in shape:
        n *= d
        if n > cur.size * block_size:  # cannot fit in the file whatever the type: stop multiplying early
            raise cur.fail(f"tensor {name!r}: shape {list(shape)} is larger than the file")
    return n // block_size * type_size


def validate_gguf_header(path: str | Path) -> GGUFHeaderInfo:
    """Parse and check a GGUF file's header with bounded reads; raise CorruptModelError on any problem.

    Checks magic, version (2 or 3), tensor and KV counts against the file size, every KV type, string and
    array length, and every tensor info (name, n_dims <= 4, positive dims, known ggml type, aligned
    offsets laid out back to back as llama.cpp expects, data inside the file).
    """
    path = Path(path)
    label = str(path)
    if path.is_dir():
        raise FileAccessError(f"{label} is a directory, not a GGUF model file")
    if not path.is_file():
        raise NotFoundError(f"{label}: no such model file")
    size = path.stat().st_size
    if size < 4:
        raise CorruptModelError(f"{label}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as fh:
        # mmap reads only the pages the header touches, however large the tensor data is.
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, size, label), path)


def _parse(cur: _Cursor, path: Path) -> GGUFHeaderInfo:
    if cur.u32() != GGUF_MAGIC:
        raise cur.fail("not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    remaining = cur.size - cur.pos
    if n_kv > remaining // _MIN_KV_BYTES:
        raise cur.fail(f"declares {n_kv} metadata entries but the file has only {remaining} bytes left")
    if n_tensors > remaining // _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"declares {n_tensors} tensors but the file has only {remaining} bytes left")

    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}", max_bytes=MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.value_type(f"metadata {key!r}")
        metadata[key] = _read_value(cur, vtype, key, array_lengths)

    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"{Keys.General.ALIGNMENT} is {alignment!r}, not a power of two")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", max_bytes=MAX_KEY_BYTES)
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        shape = tuple(cur.u64() for _ in range(n_dims))
        if any(d <= 0 for d in shape):
            raise cur.fail(f"tensor {name!r} has a non-positive dimension {list(shape)}")
        type_at = cur.pos
        raw_type = cur.u32()
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise cur.fail(f"tensor {name!r} at byte {type_at} has unknown ggml type {raw_type}") from None
        if ggml_type not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has unsupported ggml type {ggml_type.name}")
        offset = cur.u64()
        infos.append((name, shape, ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    data_size = cur.size - data_offset
    tensors = []
    expected_offset = 0
    for name, shape, ggml_type, offset in infos:
        nbytes = _tensor_nbytes(cur, name, shape, ggml_type)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        # llama.cpp requires tensors back to back in header order; checking the same keeps us in step.
        if offset != expected_offset:
            raise cur.fail(f"tensor {name!r} has offset {offset}, expected {expected_offset}")
        if nbytes > data_size - offset:
            raise cur.fail(
                f"truncated at byte {cur.size}: tensor {name!r} needs bytes up to "
                f"{data_offset + offset + nbytes}"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
        expected_offset = offset + -(-nbytes // alignment) * alignment

    return GGUFHeaderInfo(
        path=path,
        version=version,
        alignment=alignment,
        file_size=cur.size,
        data_offset=data_offset,
        metadata=metadata,
        array_lengths=array_lengths,
        tensors=tuple(tensors),
    )


def require_llama(info: GGUFHeaderInfo) -> GGUFHeaderInfo:
    """Refuse a GGUF whose ``general.architecture`` is not llama (a foreign model for our runtime)."""
    arch = info.architecture
    if arch != "llama":
        shown = "missing" if arch is None else repr(arch)
        raise CorruptModelError(f"{info.path}: foreign model (architecture {shown}, expected 'llama')")
    return info


def provenance_of(info: GGUFHeaderInfo) -> dict[str, Any]:
    """The ``genrec.*`` keys of a validated header, without the prefix.

    ``prompt_template`` is decoded from JSON to a dict; ``history_len`` is an int. An empty dict means a
    model without provenance (e.g. the zero-shot base).
    """
    out: dict[str, Any] = {}
    for key, value in info.metadata.items():
        if key.startswith(GENREC_PREFIX):
            out[key[len(GENREC_PREFIX) :]] = value
    if isinstance(out.get("prompt_template"), str):
        try:
            out["prompt_template"] = json.loads(out["prompt_template"])
        except json.JSONDecodeError:
            raise CorruptModelError(f"{info.path}: genrec.prompt_template is not valid JSON") from None
    return out


def read_provenance(gguf_path: str | Path) -> dict[str, Any]:
    """:func:`provenance_of` a GGUF file, after validating its header."""
    return provenance_of(validate_gguf_header(gguf_path))
