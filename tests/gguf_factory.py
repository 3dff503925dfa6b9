"""Write small, valid GGUF files for tests, with the ``gguf`` package's own ``GGUFWriter``.

Import it from any test (pytest puts ``tests/`` on ``sys.path``)::

    from gguf_factory import write_gguf, Typed
    from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

    path = write_gguf(
        tmp_path / "tiny.gguf", "llama",
        metadata={
            "llama.block_count": 2,                        # int    -> UINT32 (see _infer)
            "llama.rope.freq_base": 10000.0,               # float  -> FLOAT32
            "tokenizer.ggml.tokens": ["a", "b", "<s>"],    # list[str] -> ARRAY of STRING
            "tokenizer.ggml.token_type": [1, 1, 3],        # list[int] -> ARRAY of INT32
            "tokenizer.ggml.scores": np.zeros(3, np.float32),  # ndarray -> ARRAY of its dtype
            "some.u64": Typed(7, VT.UINT64),               # explicit type
        },
        tensors={
            "token_embd.weight": np.ones((3, 32), np.float32),    # F32, logical shape (V, D)
            "blk.0.attn_q.weight": (q8_bytes, Q.Q8_0, (32, 32)),  # raw bytes, type, logical shape
        },
    )

Tensor shapes are logical numpy order (outermost first); the file stores ggml ``ne`` = reversed
shape, which is what :func:`gptjax.formats.gguf.read_gguf` reverses again. Raw bytes are laid out
as ``prod(shape[:-1])`` rows of ``shape[-1] / block_elems * block_bytes`` bytes
(``gguf.GGML_QUANT_SIZES``), exactly as ggml stores them.

Metadata inference (no ``Typed``): ``bool`` -> BOOL; ``int`` -> UINT32 if 0 <= v < 2**32,
INT32 if negative and fits, else INT64 / UINT64; ``float`` -> FLOAT32; ``str`` -> STRING;
numpy scalar -> its dtype; 1-D ``np.ndarray`` -> ARRAY of its dtype; ``list`` -> ARRAY whose item
type comes from the items (all str -> STRING, all bool -> BOOL, all int -> INT32 if they fit else
INT64, numbers -> FLOAT32, all lists/arrays -> nested ARRAY, each inner list inferred on its own).
Empty arrays need an explicit item type: ``Typed([], VT.ARRAY, VT.INT32)``.
Note: the writer stores FLOAT32, so floats read back rounded to float32.

``version=2`` writes a GGUF v2 file: v2 and v3 have the same little-endian layout (the GGUF spec's
version history, ggml ``docs/gguf.md``: v2 made counts and lengths 64-bit, v3 only added
big-endian files), so the factory patches the version field after writing.

The low-level ``pack_*`` helpers build deliberately broken files byte by byte.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

__all__ = ["Typed", "write_gguf", "pack_string", "pack_value", "pack_kv", "pack_tensor_info",
           "pack_header", "NP_TO_VT"]


class Typed(NamedTuple):
    """A metadata value with an explicit GGUF value type (and item type for arrays)."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


NP_TO_VT: dict[np.dtype, GGUFValueType] = {
    np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}

_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def _int_type(v: int) -> GGUFValueType:
    if 0 <= v < 2**32:
        return GGUFValueType.UINT32
    if -(2**31) <= v < 0:
        return GGUFValueType.INT32
    if -(2**63) <= v < 2**63:
        return GGUFValueType.INT64
    return GGUFValueType.UINT64


def _infer(value: Any) -> Typed:
    """Typed tree for ``value``; arrays hold plain items, or Typed items for nested arrays."""
    if isinstance(value, Typed):
        if value.vtype == GGUFValueType.ARRAY:
            items = list(value.value)
            if value.sub_type == GGUFValueType.ARRAY:
                items = [_infer(v) for v in items]
            return Typed(items, GGUFValueType.ARRAY, value.sub_type)
        return value
    if isinstance(value, np.generic):
        return Typed(value.item(), NP_TO_VT[value.dtype])
    if isinstance(value, bool):
        return Typed(value, GGUFValueType.BOOL)
    if isinstance(value, int):
        return Typed(value, _int_type(value))
    if isinstance(value, float):
        return Typed(value, GGUFValueType.FLOAT32)
    if isinstance(value, str):
        return Typed(value, GGUFValueType.STRING)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"metadata arrays must be 1-D, got shape {value.shape}")
        return Typed(value.tolist(), GGUFValueType.ARRAY, NP_TO_VT[value.dtype])
    if isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            raise ValueError("empty metadata array: give its item type with Typed([], VT.ARRAY, item_type)")
        if all(isinstance(v, str) for v in items):
            return Typed(items, GGUFValueType.ARRAY, GGUFValueType.STRING)
        if all(isinstance(v, bool) for v in items):
            return Typed(items, GGUFValueType.ARRAY, GGUFValueType.BOOL)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            fits = all(-(2**31) <= v < 2**31 for v in items)
            return Typed(items, GGUFValueType.ARRAY, GGUFValueType.INT32 if fits else GGUFValueType.INT64)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return Typed([float(v) for v in items], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        if all(isinstance(v, (list, tuple, np.ndarray, Typed)) for v in items):
            return Typed([_infer(v) for v in items], GGUFValueType.ARRAY, GGUFValueType.ARRAY)
        raise ValueError(f"cannot infer one GGUF item type for the mixed list {items[:4]!r}...")
    raise ValueError(f"cannot store {type(value).__name__} as GGUF metadata")


class _Writer(GGUFWriter):
    """GGUFWriter that also packs nested ``Typed`` items and empty arrays (it refuses both)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, Typed):
            val, vtype, sub_type = val.value, val.vtype, val.sub_type
        if vtype == GGUFValueType.ARRAY and len(val) == 0:
            if sub_type is None:
                raise ValueError("empty metadata array needs an item type")
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _tensor_bytes(name: str, spec: Any) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """(array for GGUFWriter.add_tensor, raw ggml type or None for plain numpy dtypes)."""
    if isinstance(spec, tuple):
        raw, ggml_type, shape = spec
        qtype = GGMLQuantizationType(ggml_type)
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in shape)
        if not shape or shape[-1] % block_elems:
            raise ValueError(f"{name}: last logical dim of {shape} must be a multiple of {block_elems} ({qtype.name})")
        raw_u8 = np.frombuffer(bytes(raw), np.uint8) if isinstance(raw, (bytes, bytearray)) else np.asarray(raw)
        if raw_u8.dtype != np.uint8:
            raise ValueError(f"{name}: raw bytes must be uint8, got {raw_u8.dtype}")
        byte_shape = (*shape[:-1], shape[-1] // block_elems * block_bytes)
        if raw_u8.size != int(np.prod(byte_shape)):
            raise ValueError(f"{name}: {qtype.name} {shape} needs {int(np.prod(byte_shape))} bytes, got {raw_u8.size}")
        return np.ascontiguousarray(raw_u8.reshape(byte_shape)), qtype
    arr = np.ascontiguousarray(spec)
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16 (comes with jax): store as BF16 bytes
        return _tensor_bytes(name, (arr.view(np.uint8), GGMLQuantizationType.BF16, arr.shape))
    if arr.dtype not in (np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64):
        raise ValueError(f"{name}: dtype {arr.dtype} needs the (raw uint8, ggml_type, shape) form")
    return arr, None


def write_gguf(path: str | Path, arch: str = "llama", metadata: dict[str, Any] | None = None,
               tensors: dict[str, Any] | None = None, *, alignment: int | None = None,
               version: int = 3) -> Path:
    """Write a GGUF file with ``general.architecture = arch``, then ``metadata``, then ``tensors``.

    ``tensors`` maps name -> numpy array (F32, F16, F64, I8..I64, or ml_dtypes bfloat16 -> BF16)
    or ``(raw uint8 bytes/array, ggml_type, logical_shape)`` for any ggml type. Insertion order
    is file order. ``alignment`` writes ``general.alignment`` (UINT32). ``version`` 2 or 3.
    Returns the path.
    """
    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3, got {version}")
    path = Path(path)
    w = _Writer(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value in (metadata or {}).items():
        t = _infer(value)
        w.add_key_value(key, t.value, t.vtype, t.sub_type)
    for name, spec in (tensors or {}).items():
        arr, qtype = _tensor_bytes(name, spec)
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))
    return path


# ---- low-level byte builders for hand-made (often hostile) files -------------------------------

def pack_string(s: str | bytes, length: int | None = None) -> bytes:
    """GGUF string: u64 length (default: the real length) then the bytes."""
    data = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(data) if length is None else length) + data


def pack_value(vtype: int, value: Any, sub_type: int | None = None, count: int | None = None) -> bytes:
    """Value bytes without the leading type (arrays: item type, count (default len), items)."""
    if vtype in _SCALAR_FMT:
        return struct.pack(_SCALAR_FMT[GGUFValueType(vtype)], value)
    if vtype == GGUFValueType.STRING:
        return pack_string(value)
    if vtype == GGUFValueType.ARRAY:
        assert sub_type is not None
        items = b"".join(pack_value(sub_type, v) if sub_type != GGUFValueType.ARRAY else pack_value(*v)
                         for v in value)
        return struct.pack("<IQ", sub_type, len(value) if count is None else count) + items
    raise ValueError(f"unknown value type {vtype}")


def pack_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry: key string, u32 value type, already packed value bytes."""
    return pack_string(key) + struct.pack("<I", vtype) + payload


def pack_header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def pack_tensor_info(name: str | bytes, ne: tuple[int, ...], ggml_type: int, offset: int,
                     n_dims: int | None = None) -> bytes:
    """Tensor-table entry; ``ne`` in ggml order (ne0 first), ``offset`` relative to the data start."""
    return (pack_string(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", ggml_type, offset))
