"""Validated, memory-mapped reading of GGUF v2/v3 files.

GGUF layout (little-endian; spec: ggml-org/ggml ``docs/gguf.md``; writer: gguf-py ``gguf_writer.py``)::

    header   magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv       kv_count x ( key: string | value_type u32 | value )
    infos    tensor_count x ( name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64 )
    padding  up to a multiple of ``general.alignment`` (u32, default 32)
    data     tensor bytes; each tensor at data_start + offset, offset a multiple of the alignment

    string = length u64 | UTF-8 bytes (no terminator)
    array  = item_type u32 | count u64 | count x item   (items may themselves be arrays)

v1 used u32 counts and lengths and is rejected; v2 and v3 have the same layout for little-endian
files (v3 only added big-endian files, which are rejected here with a clear message).

Every count and length is checked against the bytes left in the file *before* anything is
allocated for it, so a tiny hostile file cannot make the reader allocate or loop for long.
Tensor data is never copied: ``GGUFTensor.raw`` is a read-only uint8 view of the file's mmap,
and ``GGUFTensor.array()`` reshapes it the way ``gguf.GGUFReader`` does (typed for F32/F16/I*,
rows of quant blocks otherwise).

Metadata values are plain Python values:

* integer types -> ``int``, FLOAT32/FLOAT64 -> ``float``, BOOL -> ``bool`` (bytes other than
  0/1 are rejected, as the spec asks), STRING -> ``str``;
* string arrays -> ``list[str]`` (e.g. ``tokenizer.ggml.tokens``, ``tokenizer.ggml.merges``);
* numeric/bool arrays shorter than ``NUMPY_ARRAY_MIN_LEN`` (1024) elements -> ``list`` of Python
  scalars (per-layer hyper-parameters stay lists); arrays of at least that many elements ->
  read-only 1-D ``np.ndarray`` in native byte order (e.g. ``tokenizer.ggml.token_type``, ``scores``).
  Code that may see either should use ``np.asarray(value)`` or iterate;
* arrays of arrays -> ``list`` of the above (nesting at most ``MAX_ARRAY_DEPTH`` deep).

Only :class:`gptjax.errors.GGUFError` escapes :func:`read_gguf` for a bad file; its message
starts with the path and names the metadata key or tensor involved.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gptjax.errors import GGUFError

__all__ = ["GGUFTensor", "GGUFFile", "read_gguf", "NUMPY_ARRAY_MIN_LEN", "MAX_ARRAY_DEPTH"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32          # GGUF_DEFAULT_ALIGNMENT (gguf-py constants.py; ggml gguf.h)
GGML_MAX_DIMS = 4               # ggml.h
MAX_ARRAY_DEPTH = 8             # arrays of arrays are legal; deeper nesting is refused
NUMPY_ARRAY_MIN_LEN = 1024      # numeric arrays this long become np.ndarray instead of list
_INT64_MAX = 2**63 - 1          # ggml's ne and nbytes are int64 / size_t
_HEADER_SIZE = 24               # magic 4 + version 4 + tensor_count 8 + kv_count 8
_MIN_KV_SIZE = 8 + 1 + 4 + 1    # key length + 1-byte key + value type + 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length + 1-byte name + n_dims + ne0 + type + offset

# value type -> (struct format, byte size, little-endian numpy dtype)
_SCALARS: dict[int, tuple[str, int, str]] = {
    GGUFValueType.UINT8: ("<B", 1, "<u1"),
    GGUFValueType.INT8: ("<b", 1, "<i1"),
    GGUFValueType.UINT16: ("<H", 2, "<u2"),
    GGUFValueType.INT16: ("<h", 2, "<i2"),
    GGUFValueType.UINT32: ("<I", 4, "<u4"),
    GGUFValueType.INT32: ("<i", 4, "<i4"),
    GGUFValueType.FLOAT32: ("<f", 4, "<f4"),
    GGUFValueType.BOOL: ("<B", 1, "<u1"),
    GGUFValueType.UINT64: ("<Q", 8, "<u8"),
    GGUFValueType.INT64: ("<q", 8, "<i8"),
    GGUFValueType.FLOAT64: ("<d", 8, "<f8"),
}
# ggml types that GGUFReader (and numpy) read as typed arrays rather than bytes
_PLAIN_DTYPES: dict[int, str] = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown({ggml_type})"


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of a GGUF file: where its bytes are and how to read them.

    ``shape`` is the logical numpy shape (outermost first), i.e. ggml's ``ne`` reversed: a matrix
    with ``ne = (in, out)`` has ``shape = (out, in)``. ``raw`` holds ``n_bytes`` bytes laid out
    as ``prod(shape[:-1])`` rows of ``shape[-1] / block_elems * block_bytes`` bytes.
    """

    name: str
    ggml_type: int                 # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]         # logical numpy order = reversed ggml ne
    offset: int                    # absolute byte offset of the data in the file
    n_bytes: int
    raw: np.ndarray = field(repr=False)  # uint8[n_bytes], zero-copy view of the file's mmap

    @property
    def type_name(self) -> str:
        """ggml type name, e.g. ``"Q8_0"``."""
        return _type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml dimension order (ne0 = contiguous, innermost axis first)."""
        return tuple(reversed(self.shape))

    @property
    def block(self) -> tuple[int, int]:
        """(elements per block, bytes per block) from ``gguf.GGML_QUANT_SIZES``."""
        return GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]

    def array(self) -> np.ndarray:
        """Zero-copy view of the data in the layout ``gguf.GGUFReader`` gives.

        F32/F16/F64/I8/I16/I32/I64: that dtype with ``shape``. Every other type (BF16 included):
        uint8 ``[*shape[:-1], shape[-1] / block_elems * block_bytes]``, one row of blocks per
        innermost row, which is what ``gguf.quants.dequantize`` and ``gptjax.quant.dequantize`` take.
        """
        dtype = _PLAIN_DTYPES.get(self.ggml_type)
        if dtype is not None:
            return self.raw.view(dtype).reshape(self.shape)
        block_elems, block_bytes = self.block
        return self.raw.reshape(*self.shape[:-1], self.shape[-1] // block_elems * block_bytes)


_MISSING = object()


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """A validated GGUF file: metadata, tensor table and memory-mapped tensor bytes.

    Beyond the contract fields: ``data_offset`` (absolute start of the data section),
    ``metadata_types`` (key -> ``gguf.GGUFValueType`` as stored) and ``array_item_types``
    (array key -> item ``GGUFValueType``), so a value can be re-serialized or shown exactly.
    The mmap stays open as long as any ``GGUFTensor.raw`` view is alive.
    """

    path: str
    version: int                   # 2 or 3
    metadata: dict[str, Any]       # see the module docstring for the value types
    tensors: dict[str, GGUFTensor]  # in file order
    alignment: int
    data_offset: int = 0           # absolute offset of the data section
    metadata_types: dict[str, int] = field(default_factory=dict, repr=False)  # key -> GGUFValueType
    array_item_types: dict[str, int] = field(default_factory=dict, repr=False)  # array key -> item type

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, types: type | tuple[type, ...] = object) -> Any:
        """The value of ``key``; GGUFError naming the file and key if absent or of the wrong type.

        ``bool`` values do not satisfy ``int`` (ask for ``bool`` explicitly). When ``float`` is
        accepted and the value is an ``int``, it is returned as ``float``.
        """
        value = self.metadata.get(key, _MISSING)
        if value is _MISSING:
            raise GGUFError(f"{self.path}: required metadata key '{key}' is missing")
        types_t = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types_t and object not in types_t:
            ok = False
        else:
            ok = isinstance(value, types_t)
        if not ok and float in types_t and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            want = " or ".join(t.__name__ for t in types_t)
            raise GGUFError(
                f"{self.path}: metadata key '{key}' has type {type(value).__name__}, expected {want}"
            )
        return value


class _Parser:
    """Bounded sequential reads over the mmap; every read checks the bytes left first."""

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, where: str, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {where}: {msg}")

    def need(self, n: int, where: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                where,
                f"needs {n} bytes at offset {self.pos} but the file has {self.size - self.pos} left "
                f"(truncated or corrupt file)",
            )

    def u32(self, where: str) -> int:
        self.need(4, where)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, where: str) -> int:
        self.need(8, where)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, where: str) -> str:
        n = self.u64(where + " (string length)")
        self.need(n, where + f" (string of {n} bytes)")
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(where, f"string at offset {start} is not valid UTF-8 ({e.reason})") from None

    def value(self, vtype: int, where: str, depth: int = 0) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            fmt, size, _ = scalar
            self.need(size, where)
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += size
            if vtype == GGUFValueType.BOOL:
                if v > 1:
                    raise self.fail(where, f"bool value must be 0 or 1, got {v}")
                return bool(v)
            return v
        if vtype == GGUFValueType.STRING:
            return self.string(where)
        if vtype == GGUFValueType.ARRAY:
            return self.array(where, depth)
        raise self.fail(where, f"unknown value type {vtype} (expected 0..12, see gguf.GGUFValueType)")

    def array(self, where: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(where, f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        itype = self.u32(where + " (array item type)")
        count = self.u64(where + " (array length)")
        scalar = _SCALARS.get(itype)
        if scalar is not None:
            item_size = scalar[1]
        elif itype == GGUFValueType.STRING:
            item_size = 8
        elif itype == GGUFValueType.ARRAY:
            item_size = 12
        else:
            raise self.fail(where, f"unknown array item type {itype} (expected 0..12, see gguf.GGUFValueType)")
        # Bound the count by the bytes left before allocating anything for it.
        if count > (self.size - self.pos) // item_size:
            raise self.fail(
                where,
                f"array of {count} items of at least {item_size} bytes does not fit in the "
                f"{self.size - self.pos} bytes left at offset {self.pos}",
            )
        if scalar is not None:
            return self.numeric_array(itype, count, where)
        if itype == GGUFValueType.STRING:
            return self.string_array(count, where)
        return [self.array(f"{where}[{i}]", depth + 1) for i in range(count)]

    def numeric_array(self, itype: int, count: int, where: str) -> Any:
        _, size, dtype = _SCALARS[itype]
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * size
        if itype == GGUFValueType.BOOL:
            if count and int(arr.max()) > 1:
                bad = int(np.argmax(arr > 1))
                raise self.fail(f"{where}[{bad}]", f"bool value must be 0 or 1, got {int(arr[bad])}")
            arr = arr.astype(np.bool_)
        else:
            arr = arr.astype(arr.dtype.newbyteorder("="))  # copy: nothing keeps the mmap alive
        if count < NUMPY_ARRAY_MIN_LEN:
            return arr.tolist()
        arr.flags.writeable = False
        return arr

    def string_array(self, count: int, where: str) -> list[str]:
        # Hot loop for tokenizer vocabularies (~450k merges): keep it free of per-item calls.
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        pos = self.pos
        out: list[Any] = [None] * count
        i = 0
        try:
            for i in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"{where}[{i}] (string length)")
                (n,) = unpack(buf, pos)
                pos += 8
                end = pos + n
                if end > size:
                    self.pos = pos
                    self.need(n, f"{where}[{i}] (string of {n} bytes)")
                out[i] = str(buf[pos:end], "utf-8")
                pos = end
        except UnicodeDecodeError as e:
            raise self.fail(f"{where}[{i}]", f"string at offset {pos} is not valid UTF-8 ({e.reason})") from None
        self.pos = pos
        return out


def _open_mmap(path: str) -> tuple[mmap.mmap, int]:
    if os.path.isdir(path):
        raise GGUFError(f"{path}: is a directory, expected a .gguf file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{path}: file is empty, expected a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except GGUFError:
        raise
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot open ({e.strerror or e})") from None
    except ValueError as e:  # mmap refuses some special files
        raise GGUFError(f"{path}: cannot memory-map ({e})") from None
    return buf, size


def _read_header(p: _Parser) -> tuple[int, int, int]:
    p.need(4, "header (magic)")
    magic = bytes(p.buf[0:4])
    if magic != GGUF_MAGIC:
        raise p.fail("header", f"bad magic {magic!r}, expected b'GGUF' (not a GGUF file)")
    p.pos = 4
    version = p.u32("header (version)")
    if version == 1:
        raise p.fail("header", "GGUF version 1 is not supported (32-bit counts); expected version 2 or 3 "
                               "(re-convert the model with a current llama.cpp)")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in (1, 2, 3):
            raise p.fail("header", f"big-endian GGUF (version {version >> 24}) is not supported; "
                                   "expected a little-endian file")
        raise p.fail("header", f"unsupported GGUF version {version}, expected 2 or 3")
    n_tensors = p.u64("header (tensor count)")
    n_kv = p.u64("header (metadata count)")
    left = p.size - p.pos
    if n_kv > left // _MIN_KV_SIZE:
        raise p.fail("header", f"metadata count {n_kv} cannot fit in the {left} bytes after the header")
    if n_tensors > left // _MIN_TENSOR_INFO_SIZE:
        raise p.fail("header", f"tensor count {n_tensors} cannot fit in the {left} bytes after the header")
    return version, n_tensors, n_kv


def _read_metadata(p: _Parser, n_kv: int) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    item_types: dict[str, int] = {}
    for i in range(n_kv):
        key = p.string(f"metadata entry #{i} key")
        if not key:
            raise p.fail(f"metadata entry #{i}", "empty key")
        if key in metadata:
            raise p.fail(f"metadata key '{key}'", f"duplicate key (entry #{i})")
        vtype = p.u32(f"metadata key '{key}' (value type)")
        start = p.pos
        metadata[key] = p.value(vtype, f"metadata key '{key}'")
        types[key] = vtype
        if vtype == GGUFValueType.ARRAY:  # value() has read (and validated) the item type at `start`
            item_types[key] = _U32.unpack_from(p.buf, start)[0]
    return metadata, types, item_types


def _read_alignment(p: _Parser, metadata: dict[str, Any], types: dict[str, int]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata[key]
    if types[key] != GGUFValueType.UINT32:
        raise p.fail(f"metadata key '{key}'", f"must be UINT32, got {GGUFValueType(types[key]).name}")
    if value <= 0 or value & (value - 1):
        raise p.fail(f"metadata key '{key}'", f"alignment {value} is not a positive power of two")
    return value


_RawInfo = tuple[str, tuple[int, ...], int, int]  # name, ne (ggml order), ggml type, relative offset


def _read_tensor_infos(p: _Parser, n_tensors: int) -> list[_RawInfo]:
    if n_tensors > (p.size - p.pos) // _MIN_TENSOR_INFO_SIZE:
        raise p.fail("tensor table", f"tensor count {n_tensors} cannot fit in the {p.size - p.pos} bytes "
                                     f"left at offset {p.pos}")
    infos: list[_RawInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = p.string(f"tensor #{i} name")
        where = f"tensor '{name}'"
        if not name:
            raise p.fail(f"tensor #{i}", "empty tensor name")
        if name in seen:
            raise p.fail(where, f"duplicate tensor name (tensor #{i})")
        seen.add(name)
        n_dims = p.u32(where + " (n_dims)")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise p.fail(where, f"n_dims {n_dims} out of range, expected 1..{GGML_MAX_DIMS}")
        ne = tuple(p.u64(where + f" (ne{j})") for j in range(n_dims))
        ggml_type = p.u32(where + " (type)")
        offset = p.u64(where + " (offset)")
        infos.append((name, ne, ggml_type, offset))
    return infos


def _build_tensors(p: _Parser, infos: list[_RawInfo], data_offset: int, alignment: int,
                   buf_u8: np.ndarray) -> dict[str, GGUFTensor]:
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ggml_type, rel in infos:
        where = f"tensor '{name}'"
        for j, d in enumerate(ne):
            if d <= 0 or d > _INT64_MAX:
                raise p.fail(where, f"dimension ne{j} = {d} must be in 1..2^63-1")
        n_elements = 1
        for d in ne:
            n_elements *= d
        if n_elements > _INT64_MAX:
            raise p.fail(where, f"ne={ne} has {n_elements} elements, more than 2^63-1")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise p.fail(where, f"unknown ggml type id {ggml_type} (see gguf.GGMLQuantizationType)") from None
        if ne[0] % block_elems:
            raise p.fail(where, f"first dimension ne0 = {ne[0]} is not a multiple of the {qtype.name} "
                                f"block size {block_elems}")
        n_bytes = n_elements // block_elems * block_bytes
        if rel % alignment:
            raise p.fail(where, f"data offset {rel} is not a multiple of the alignment {alignment}")
        start = data_offset + rel
        if n_bytes > p.size or start > p.size - n_bytes:
            raise p.fail(where, f"data [{start}, {start + n_bytes}) ({qtype.name}, ne={ne}, {n_bytes} bytes) "
                                f"extends past the end of the file ({p.size} bytes)")
        tensors[name] = GGUFTensor(
            name=name,
            ggml_type=int(qtype),
            shape=tuple(reversed(ne)),
            offset=start,
            n_bytes=n_bytes,
            raw=buf_u8[start:start + n_bytes],
        )
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.n_bytes > b.offset:
            raise p.fail(f"tensor '{b.name}'", f"data at offset {b.offset} overlaps tensor '{a.name}' "
                                               f"[{a.offset}, {a.offset + a.n_bytes})")
    return tensors


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read and validate a GGUF v2/v3 file; tensor bytes stay memory-mapped (zero copy).

    Raises GGUFError (message starting with the path and naming the key or tensor) for a
    missing, empty, truncated, malformed or inconsistent file. Nothing is allocated for a
    count or length before it has been checked against the remaining file size.
    """
    path = os.fspath(path)
    buf, size = _open_mmap(path)
    p = _Parser(path, buf, size)
    try:
        version, n_tensors, n_kv = _read_header(p)
        metadata, types, item_types = _read_metadata(p, n_kv)
        alignment = _read_alignment(p, metadata, types)
        infos = _read_tensor_infos(p, n_tensors)
        data_offset = -(-p.pos // alignment) * alignment
        if infos and data_offset > size:
            raise p.fail("tensor data", f"data section starts at {data_offset} (aligned to {alignment}) "
                                        f"past the end of the file ({size} bytes)")
        buf_u8 = np.frombuffer(buf, dtype=np.uint8)
        tensors = _build_tensors(p, infos, data_offset, alignment, buf_u8)
    except GGUFError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError, MemoryError, UnicodeError, TypeError) as e:
        # Safety net: every check above should fire first; never let a raw error escape.
        raise GGUFError(f"{path}: malformed GGUF near offset {p.pos} ({type(e).__name__}: {e})") from None
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors,
                    alignment=alignment, data_offset=data_offset, metadata_types=types,
                    array_item_types=item_types)
