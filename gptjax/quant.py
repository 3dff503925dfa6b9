"""GGML tensor types: exact dequantizers in JAX and the MXFP4 layout conversion.

Every dequantizer takes the file's bytes grouped in blocks, ``uint8[..., nb, bytes_per_block]``, and
returns ``float32[..., nb * elements_per_block]``.  They are plain ``jnp``/``lax`` code, vectorised
over blocks with static shapes, so they run under ``jax.jit`` on any backend (and later inside the
matmul that consumes packed weights).  The oracle is ``gguf.quants.dequantize`` (numpy): results
are bit-identical to it (NaN payloads aside), on CPU and under jit.

Why bit-exactness is robust to XLA's rewriting.  Each decoder reproduces the order of float
operations of gguf-py ``quants.py`` (e.g. Q4_K: ``(d * sc) * q - dmin * m``), but more importantly
every *product* involved is exact in float32: an f16 scale has 11 significant bits, a sub-block
scale at most 7 (Q6_K's int8) and a quant at most 6 (Q6_K's ``q - 32``), so ``d * sc * q`` needs at
most 24 bits, and no product can overflow or come near the f32 denormal range (the smallest
nonzero f16 is 2^-24).  Hence at most one rounding happens (the final ``+ m`` / ``- dmin * m``),
and fusing ``a * b + c`` into an FMA or re-associating the products gives the very same float32
bits.  (This matters: XLA's CPU backend does contract ``a * b + c`` into an FMA -- checked with
jax 0.10.2, where ``jit(lambda a, b, c: a * b + c)`` matches the fused result, not numpy's, on
~23% of random inputs.)

MXFP4 is different: its results *do* reach the f32 denormal range (scale byte 0 or 1 gives
``2^-128`` / ``2^-127``), and XLA's CPU backend runs with flush-to-zero / denormals-are-zero
(checked: ``bitcast(0x00200000) * 12`` gives 0 under XLA CPU, ``jnp.exp2(-128.)`` gives 0).  So
:func:`dequantize_mxfp4` builds the float32 bit patterns with integer arithmetic instead of
multiplying (see :func:`_ldexp_bits`); it is exact for every code and every scale byte.

Packed weights (pytree leaves holding these bytes) and the ``linear`` / ``embed`` that decode them
inside the jitted computation live in :mod:`gptjax.packed`; their names are re-exported here
(lazily, since gptjax.packed imports this module), so ``quant.linear is packed.linear``.

ggml type ids, block sizes and layouts: gguf-py ``constants.py`` (``GGML_QUANT_SIZES``) and
``quants.py``; ggml ``ggml-common.h`` / ``ggml-quants.c``; MODEL_FORMATS.md §3 and §8.
All multi-byte fields in GGUF are little-endian; they are assembled byte by byte here, so the
result does not depend on the host's byte order.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as _T
from jax import lax

from gptjax.errors import UnsupportedModelError, WeightsError

__all__ = [
    "QUANT_BLOCK",
    "dequantize",
    "dequantize_blocks",
    "check_raw",
    "row_bytes",
    "ggml_type_name",
    "dequantize_f32",
    "dequantize_f16",
    "dequantize_bf16",
    "dequantize_q8_0",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q5_0",
    "dequantize_q5_1",
    "dequantize_q4_k",
    "dequantize_q5_k",
    "dequantize_q6_k",
    "dequantize_mxfp4",
    "mxfp4_ggml_to_openai",
    "mxfp4_openai_to_ggml",
]

QK_K = 256  # elements per K-quant super-block

#: ggml type id -> (elements per block, bytes per block), for every type :func:`dequantize`
#: supports.  Same numbers as gguf-py ``GGML_QUANT_SIZES`` (tests check it).
QUANT_BLOCK: dict[int, tuple[int, int]] = {
    _T.F32: (1, 4),
    _T.F16: (1, 2),
    _T.BF16: (1, 2),
    _T.Q8_0: (32, 2 + 32),
    _T.Q4_0: (32, 2 + 16),
    _T.Q4_1: (32, 2 + 2 + 16),
    _T.Q5_0: (32, 2 + 4 + 16),
    _T.Q5_1: (32, 2 + 2 + 4 + 16),
    _T.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    _T.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    _T.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    _T.MXFP4: (32, 1 + 16),
}


def ggml_type_name(ggml_type: int) -> str:
    """``"Q8_0"`` for 8, ``"type 99"`` for an id gguf does not know."""
    try:
        return _T(int(ggml_type)).name
    except ValueError:
        return f"type {int(ggml_type)}"


# ---------------------------------------------------------------------------------------------
# Byte-level helpers (all little-endian, built from single bytes)
# ---------------------------------------------------------------------------------------------

def _u16(b: jax.Array) -> jax.Array:
    """uint8[..., 2] -> uint16[...], little-endian."""
    b = b.astype(jnp.uint16)
    return b[..., 0] | (b[..., 1] << 8)


def _u32(b: jax.Array) -> jax.Array:
    """uint8[..., 4] -> uint32[...], little-endian."""
    b = b.astype(jnp.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _f16(b: jax.Array) -> jax.Array:
    """uint8[..., 2] (an IEEE half) -> float32[...].  Exact (f16 denormals are f32 normals)."""
    return lax.bitcast_convert_type(_u16(b), jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """uint8[..., n] -> uint8[..., 2n]: all low nibbles, then all high nibbles.

    This is the element order of Q4_0/Q4_1/Q5_0/Q5_1 and MXFP4 (byte j holds elements j and
    j + n) and of each 32-byte group of Q4_K/Q5_K.
    """
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _flat(x: jax.Array) -> jax.Array:
    """[..., nb, k] -> [..., nb * k]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Float types (one element per "block")
# ---------------------------------------------------------------------------------------------

def dequantize_f32(blocks: jax.Array) -> jax.Array:
    """uint8[..., n, 4] -> f32[..., n]: a bit cast, so denormals and NaN payloads survive."""
    return lax.bitcast_convert_type(_u32(blocks), jnp.float32)


def dequantize_f16(blocks: jax.Array) -> jax.Array:
    """uint8[..., n, 2] -> f32[..., n] (IEEE half -> float conversion, exact)."""
    return _f16(blocks)


def dequantize_bf16(blocks: jax.Array) -> jax.Array:
    """uint8[..., n, 2] -> f32[..., n]: bf16 is the upper half of an f32, ``bits << 16``."""
    return lax.bitcast_convert_type(_u16(blocks).astype(jnp.uint32) << 16, jnp.float32)


# ---------------------------------------------------------------------------------------------
# 32-element block types
# ---------------------------------------------------------------------------------------------

def dequantize_q8_0(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 34] -> f32[..., nb*32].  Block ``[f16 d][int8 q[32]]``, ``w = q * d``."""
    d = _f16(blocks[..., 0:2])[..., None]                                   # [..., nb, 1]
    q = lax.bitcast_convert_type(blocks[..., 2:34], jnp.int8).astype(jnp.float32)
    return _flat(q * d)


def dequantize_q4_0(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 18] -> f32[..., nb*32].  ``[f16 d][16 B]``, ``w = d * (q - 8)``.

    Byte j: low nibble = element j, high nibble = element j + 16.
    """
    d = _f16(blocks[..., 0:2])[..., None]
    q = _nibbles(blocks[..., 2:18]).astype(jnp.int8) - 8
    return _flat(d * q.astype(jnp.float32))


def dequantize_q4_1(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 20] -> f32[..., nb*32].  ``[f16 d][f16 m][16 B]``, ``w = d * q + m``."""
    d = _f16(blocks[..., 0:2])[..., None]
    m = _f16(blocks[..., 2:4])[..., None]
    q = _nibbles(blocks[..., 4:20]).astype(jnp.float32)
    return _flat(d * q + m)


def _q5_bits(qh4: jax.Array, qs16: jax.Array) -> jax.Array:
    """5-bit quants of a Q5_0/Q5_1 block: uint8[..., 4] (qh) and [..., 16] (qs) -> uint8[..., 32].

    Element j = nibble j (low nibbles 0..15, high 16..31) | bit j of the little-endian u32 qh << 4.
    """
    qh = _u32(qh4)[..., None] >> jnp.arange(32, dtype=jnp.uint32)        # [..., 32]
    hi = (qh & 1).astype(jnp.uint8) << 4
    return _nibbles(qs16) | hi


def dequantize_q5_0(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 22] -> f32[..., nb*32].  ``[f16 d][u32 qh][16 B]``, ``w = d * (q - 16)``."""
    d = _f16(blocks[..., 0:2])[..., None]
    q = _q5_bits(blocks[..., 2:6], blocks[..., 6:22]).astype(jnp.int8) - 16
    return _flat(d * q.astype(jnp.float32))


def dequantize_q5_1(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 24] -> f32[..., nb*32].  ``[f16 d][f16 m][u32 qh][16 B]``, ``w = d*q + m``."""
    d = _f16(blocks[..., 0:2])[..., None]
    m = _f16(blocks[..., 2:4])[..., None]
    q = _q5_bits(blocks[..., 4:8], blocks[..., 8:24]).astype(jnp.float32)
    return _flat(d * q + m)


# ---------------------------------------------------------------------------------------------
# K-quants (256-element super-blocks)
# ---------------------------------------------------------------------------------------------

def _k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 12 packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins (uint8[..., 8]).

    Byte layout (gguf-py ``Q4_K.get_scale_min``, ggml ``get_scale_min_k4``), sub-blocks a..h:
    bytes 0-3 ``EEAAAAAA`` (scale a..d low 6 bits; top 2 bits = high bits of scale e..h),
    bytes 4-7 ``eeaaaaaa`` (the same for the mins), bytes 8-11 ``eeeeEEEE`` (low nibble = low 4
    bits of scale e..h, high nibble = low 4 bits of min e..h).
    """
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_groups(qs: jax.Array) -> jax.Array:
    """uint8[..., 128] -> nibbles uint8[..., 8, 32]: 4 groups of 32 bytes; the low nibbles of
    group g are sub-block 2g, the high nibbles sub-block 2g + 1."""
    g = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> jnp.array([0, 4], jnp.uint8)[:, None]
    return (g & 0x0F).reshape(*qs.shape[:-1], 8, 32)


def _k_dequant(blocks: jax.Array, q: jax.Array) -> jax.Array:
    """Shared Q4_K/Q5_K tail: ``w = (d * sc_j) * q - dmin * m_j`` per sub-block j of 32."""
    d = _f16(blocks[..., 0:2])[..., None]                                   # [..., nb, 1]
    dmin = _f16(blocks[..., 2:4])[..., None]
    sc, mn = _k_scale_min(blocks[..., 4:16])                                # [..., nb, 8]
    dl = (d * sc.astype(jnp.float32))[..., None]                            # [..., nb, 8, 1]
    ml = (dmin * mn.astype(jnp.float32))[..., None]
    w = dl * q.astype(jnp.float32) - ml                                     # [..., nb, 8, 32]
    return w.reshape(*blocks.shape[:-1], QK_K)                              # [..., nb, 256]


def dequantize_q4_k(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 144] -> f32[..., nb*256].

    ``[f16 d][f16 dmin][12 B scales/mins][128 B qs]``; 8 sub-blocks of 32 with 6-bit scale sc_j
    and min m_j (:func:`_k_scale_min`); ``w = d * sc_j * q - dmin * m_j``, q in 0..15.
    """
    return _flat(_k_dequant(blocks, _k_groups(blocks[..., 16:144])))


def dequantize_q5_k(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 176] -> f32[..., nb*256].

    ``[f16 d][f16 dmin][12 B scales/mins][32 B qh][128 B qs]``; as Q4_K with a 5th bit: bit j of
    ``qh[i]`` is the high bit of element i of sub-block j.  q in 0..31.
    """
    lo = _k_groups(blocks[..., 48:176])                                     # [..., nb, 8, 32]
    qh = blocks[..., None, 16:48] >> jnp.arange(8, dtype=jnp.uint8)[:, None]  # [..., nb, 8, 32]
    q = lo | ((qh & 1) << 4)
    return _flat(_k_dequant(blocks, q))


def dequantize_q6_k(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 210] -> f32[..., nb*256].

    ``[128 B ql][64 B qh][16 x int8 scales][f16 d]``; 16 sub-blocks of 16 with scale s_k;
    ``w = (d * s_k) * (q - 32)``, q = 4 bits of ql | 2 bits of qh << 4.  Each half (128 elements)
    uses 64 ql bytes (low nibbles: elements 0..63, high: 64..127) and 32 qh bytes (bit pairs
    0-1, 2-3, 4-5, 6-7: elements 0..31, 32..63, 64..95, 96..127).
    """
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 1, 64) >> jnp.array([0, 4], jnp.uint8)[:, None]
    ql = (ql & 0x0F).reshape(*lead, 8, 32)
    shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts
    qh = (qh & 0x03).reshape(*lead, 8, 32)
    q = ((ql | (qh << 4)).astype(jnp.int8) - 32).reshape(*lead, 16, 16)
    s = lax.bitcast_convert_type(blocks[..., 192:208], jnp.int8).astype(jnp.float32)
    d = _f16(blocks[..., 208:210])[..., None]
    dl = (d * s)[..., None]                                                 # [..., nb, 16, 1]
    return _flat((dl * q.astype(jnp.float32)).reshape(*lead, QK_K))


# ---------------------------------------------------------------------------------------------
# MXFP4 (OCP microscaling FP4: E2M1 codes, one E8M0 scale byte per 32 elements)
# ---------------------------------------------------------------------------------------------

# ggml ``kvalues_mxfp4`` (ggml-common.h; gguf-py ``MXFP4.kvalues``): the E2M1 values *doubled*,
# paired with a scale of 2^(e - 128) instead of 2^(e - 127).  Code 8 ("-0") is +0 here, as in
# ggml (an int8 table), whereas OpenAI's FP4_VALUES table gives -0.0.
_MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
_MXFP4_KBITS = _MXFP4_KVALUES.view(np.uint32)


def _ldexp_bits(bits: jax.Array, n: jax.Array) -> jax.Array:
    """float32 bit patterns of ``x * 2**n`` computed with integer arithmetic (no FTZ/DAZ).

    ``bits``: uint32 patterns of zeros or finite *normal* floats x; ``n``: int32, broadcastable.
    Zeros are returned unchanged, results of 2^128 or more become +-inf (what an IEEE multiply
    by an exact power of two gives), and denormal results are exact provided the significand bits
    shifted out are zero (true for the MXFP4 table: significands 1.0 / 1.5 shift right by <= 2).
    """
    sign = bits & np.uint32(0x80000000)
    mag = bits & np.uint32(0x7FFFFFFF)
    frac = mag & np.uint32(0x007FFFFF)
    exp = (mag >> 23).astype(jnp.int32) + n                                 # biased exponent
    normal = sign | (jnp.clip(exp, 1, 254).astype(jnp.uint32) << 23) | frac
    shift = jnp.clip(1 - exp, 0, 31).astype(jnp.uint32)
    denormal = sign | ((frac | np.uint32(0x00800000)) >> shift)             # value / 2^-149
    out = jnp.where(exp >= 255, sign | np.uint32(0x7F800000), jnp.where(exp >= 1, normal, denormal))
    return jnp.where(mag == 0, bits, out)


def dequantize_mxfp4(blocks: jax.Array) -> jax.Array:
    """uint8[..., nb, 17] -> f32[..., nb*32].  Block ``[u8 e][16 B qs]`` (ggml ``block_mxfp4``).

    Byte j of qs: low nibble = element j, high nibble = element j + 16.  Value
    ``w = kvalues[c] * 2^(e - 128) = FP4[c] * 2^(e - 127)`` with ``kvalues`` the doubled E2M1 table
    and ``2^(e - 128)`` ggml's ``ggml_e8m0_to_fp32_half(e)`` (ggml-impl.h: bits ``0x00200000 << e``
    for e < 2, i.e. the denormals 2^-128 and 2^-127, else ``(e - 1) << 23``).

    Edge cases, following ggml / gguf-py bit-exactly:

    * ``e = 255`` is *not* NaN (the OCP MX v1.0 spec and CUDA's ``__nv_fp8_e8m0`` say 0xFF = NaN):
      ggml decodes it as ``(255 - 1) << 23 = 2^127``, so codes +-0.5 give +-2^127, larger codes
      overflow to +-inf, zeros stay 0.  OpenAI's reference (``torch.ldexp(FP4[c], e - 127)``,
      gpt_oss/torch/weights.py) gives the same values (checked with torch 2.13 on CPU: 0.5 ->
      2^127, 1.0 -> inf, 0 -> 0, no NaN).  Large e < 255 overflow the same way (e = 254: |FP4|
      >= 2 -> inf).
    * ``e = 0, 1`` give denormal results (e.g. 0.5 * 2^-127 = 2^-128).  XLA's CPU backend flushes
      denormals in float arithmetic, so the bits are built with integers (:func:`_ldexp_bits`);
      the results are exact denormals on every backend.  (``jnp.exp2`` is no way out: on XLA CPU
      it is not even exact for integer arguments -- a few ulp off, checked with jax 0.10.2.)
      What a later consumer does with a denormal (a CPU matmul reads it as 0) is its business.
    * codes 0 and 8 both decode to +0.0 (ggml), OpenAI's table gives -0.0 for code 8.
    """
    e = blocks[..., 0:1].astype(jnp.int32)                                  # [..., nb, 1]
    codes = _nibbles(blocks[..., 1:17]).astype(jnp.int32)                  # [..., nb, 32]
    kbits = jnp.take(jnp.asarray(_MXFP4_KBITS), codes)
    return _flat(lax.bitcast_convert_type(_ldexp_bits(kbits, e - 128), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

# ggml type id -> decoder of uint8[..., nb, bytes_per_block] blocks.  Packed weight leaves and
# ``linear(x, w)`` (gptjax/packed.py) build on this table through :func:`dequantize_blocks`: a
# packed leaf keeps the file's block bytes and dequantizes them with these same functions inside
# the jitted matmul.
_DEQUANTIZERS: dict[int, Callable[[jax.Array], jax.Array]] = {
    _T.F32: dequantize_f32,
    _T.F16: dequantize_f16,
    _T.BF16: dequantize_bf16,
    _T.Q8_0: dequantize_q8_0,
    _T.Q4_0: dequantize_q4_0,
    _T.Q4_1: dequantize_q4_1,
    _T.Q5_0: dequantize_q5_0,
    _T.Q5_1: dequantize_q5_1,
    _T.Q4_K: dequantize_q4_k,
    _T.Q5_K: dequantize_q5_k,
    _T.Q6_K: dequantize_q6_k,
    _T.MXFP4: dequantize_mxfp4,
}
assert _DEQUANTIZERS.keys() == QUANT_BLOCK.keys()


def dequantize_blocks(blocks: jax.Array, ggml_type: int) -> jax.Array:
    """Decode blocks ``uint8[..., nb, bytes_per_block]`` of ``ggml_type`` -> ``f32[..., nb * per]``.

    Traceable (plain jnp, static shapes): this is what packed weights (:mod:`gptjax.packed`) run
    inside the jitted matmul.  ``ggml_type`` must be a key of :data:`QUANT_BLOCK`.
    """
    return _DEQUANTIZERS[int(ggml_type)](blocks)


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of ``n`` elements of ``ggml_type`` (``n`` a multiple of the block size)."""
    per_block, block_bytes = QUANT_BLOCK[int(ggml_type)]
    return n // per_block * block_bytes


def check_raw(raw, ggml_type: int, shape: Sequence[int], *, name: str | None = None):
    """Validate a tensor's bytes against its type and logical shape; return ``(raw, shape)``.

    ``raw`` may be numpy, a jax array (or anything with ``.dtype``/``.size``/``.shape``, e.g. a
    ``jax.ShapeDtypeStruct``) or a bytes-like object (turned into a numpy uint8 view); ``shape``
    comes back as a tuple of ints.  Raises UnsupportedModelError for a type without a decoder,
    WeightsError when the byte count, dtype or shape does not fit the type, naming ``name``.
    """
    what = f"tensor {name!r}" if name else "tensor"
    t = int(ggml_type)
    tname = ggml_type_name(t)
    if t not in _DEQUANTIZERS:
        supported = ", ".join(ggml_type_name(k) for k in QUANT_BLOCK)
        raise UnsupportedModelError(
            f"{what}: ggml type {tname} (id {t}) is not supported; supported types: {supported}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    elif not hasattr(raw, "dtype"):
        raw = np.asarray(raw)
    shape = tuple(int(s) for s in shape)
    per_block, block_bytes = QUANT_BLOCK[t]
    if not shape or min(shape) < 0:
        raise WeightsError(f"{what} ({tname}): invalid shape {shape}; expected at least one "
                           f"dimension, all >= 0")
    if shape[-1] % per_block:
        raise WeightsError(f"{what} ({tname}): last dimension {shape[-1]} of shape {shape} is not "
                           f"a multiple of the {tname} block size {per_block}")
    if raw.dtype != np.uint8:
        raise WeightsError(f"{what} ({tname}): expected uint8 bytes, got dtype {raw.dtype}")
    n_row_bytes = row_bytes(t, shape[-1])
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    size = int(np.prod(raw.shape, dtype=np.int64))
    if size != n_rows * n_row_bytes:
        raise WeightsError(f"{what} ({tname}): has {size} bytes, expected {n_rows * n_row_bytes}"
                           f" = {n_rows} rows x {n_row_bytes} bytes for shape {shape}")
    if len(raw.shape) > 1 and raw.shape[-1] != n_row_bytes:
        raise WeightsError(f"{what} ({tname}): byte array of shape {tuple(raw.shape)} has rows of "
                           f"{raw.shape[-1]} bytes, expected {n_row_bytes} for shape {shape}")
    return raw, shape


def dequantize(raw, ggml_type: int, shape: Sequence[int], *, name: str | None = None) -> jax.Array:
    """Decode a GGML tensor's bytes into ``float32[shape]``, bit-exact vs gguf.quants.dequantize.

    ``raw``: uint8 bytes (numpy, jax array, or a bytes-like object), flat or ``[..., row_bytes]``;
    ``ggml_type``: a ``gguf.GGMLQuantizationType`` id; ``shape``: the logical numpy shape,
    outermost first, whose last (contiguous) dimension is a multiple of the block's elements.
    ``name`` (optional) is the tensor's name, used in error messages.  Works under ``jax.jit``
    with ``ggml_type`` and ``shape`` static.

    Raises UnsupportedModelError for a type without a decoder, WeightsError when the byte count,
    dtype or shape does not fit the type (see :func:`check_raw`).
    """
    raw, shape = check_raw(raw, ggml_type, shape, name=name)
    t = int(ggml_type)
    per_block, block_bytes = QUANT_BLOCK[t]
    blocks = jnp.asarray(raw).reshape(*shape[:-1], shape[-1] // per_block, block_bytes)
    return _decode_jit(blocks, t).reshape(shape)


@functools.partial(jax.jit, static_argnums=1)
def _decode_jit(blocks: jax.Array, ggml_type: int) -> jax.Array:
    """One compiled program per (type, shape) instead of one dispatch per jnp op (eager mode)."""
    return _DEQUANTIZERS[ggml_type](blocks)


# ---------------------------------------------------------------------------------------------
# MXFP4 layout conversion: ggml block_mxfp4 <-> OpenAI / HF ``*_blocks`` + ``*_scales``
# ---------------------------------------------------------------------------------------------

def _xp(*arrays):
    """jax.numpy if any argument is a jax array, else numpy (load-time repacking stays on host)."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _as_u8(a, what: str):
    a = a if isinstance(a, jax.Array) else np.asarray(a)
    if a.dtype != np.uint8:
        raise WeightsError(f"MXFP4 {what}: expected uint8, got dtype {a.dtype}")
    return a


def mxfp4_ggml_to_openai(raw_ggml):
    """ggml MXFP4 bytes [..., G*17] -> (blocks ``uint8[..., G, 16]``, scales ``uint8[..., G]``).

    ggml block: ``[e][qs[16]]`` with qs[j] = element j (low nibble) | element j+16 (high nibble).
    OpenAI/HF block: byte k = element 2k (low nibble) | element 2k+1 (high nibble); the E8M0 scale
    byte is the same in both (MODEL_FORMATS.md §3.4).  numpy in, numpy out (jax in, jax out).
    """
    xp = _xp(raw_ggml)
    raw = _as_u8(raw_ggml, "ggml bytes")
    if raw.ndim < 1 or raw.shape[-1] % 17:
        raise WeightsError(f"MXFP4 ggml bytes of shape {tuple(raw.shape)}: the last dimension must "
                           f"be a multiple of 17 (1 scale byte + 16 code bytes per 32 elements)")
    lead, g = raw.shape[:-1], raw.shape[-1] // 17
    b = raw.reshape(*lead, g, 17)
    qs = b[..., 1:]
    codes = xp.concatenate([qs & 0x0F, qs >> 4], axis=-1)                   # [..., G, 32] in order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)                     # [..., G, 16]
    scales = b[..., 0]                                                      # [..., G]
    if xp is np:
        blocks, scales = np.ascontiguousarray(blocks), np.ascontiguousarray(scales)
    return blocks, scales


def mxfp4_openai_to_ggml(blocks, scales):
    """OpenAI/HF blocks ``uint8[..., G, 16]``, scales ``uint8[..., G]`` -> ggml bytes [..., G*17].

    Inverse of :func:`mxfp4_ggml_to_openai` (and the repack llama.cpp's converter does, CONV-gptoss
    ``repack_mxfp4``): codes[2k] = b[k] & 0xF, codes[2k+1] = b[k] >> 4; qs[j] = codes[j] |
    codes[j+16] << 4; block = [scale] + qs.
    """
    xp = _xp(blocks, scales)
    blocks = _as_u8(blocks, "blocks")
    scales = _as_u8(scales, "scales")
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise WeightsError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}: "
                           f"expected blocks [..., G, 16] and scales [..., G]")
    lead, g = blocks.shape[:-2], blocks.shape[-2]
    codes = xp.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*lead, g, 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)                           # [..., G, 16]
    out = xp.concatenate([scales[..., None], qs], axis=-1)                  # [..., G, 17]
    return out.reshape(*lead, g * 17)


# ---------------------------------------------------------------------------------------------
# Re-exports of gptjax.packed (PEP 562 lazy attributes: packed.py imports this module)
# ---------------------------------------------------------------------------------------------

_PACKED_NAMES = frozenset({"PackedWeight", "linear", "embed", "to_dense", "pack_from_gguf_tensor",
                           "is_packed"})


def __getattr__(name: str):
    if name in _PACKED_NAMES:
        from gptjax import packed
        return getattr(packed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
