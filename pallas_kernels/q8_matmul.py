"""Q8_0 matmul with the dequantization fused in registers (Pallas, Triton backend), and the Q8_0
embedding gather.

Math.  ``y[m, o] = sum_i x[m, i] * w[o, i] (+ b[o])`` with ``w`` stored as ggml ``block_q8_0``
(MODEL_FORMATS.md §8; ggml-common.h, gguf-py ``quants.Q8_0``): one 34-byte block per 32 inputs,
``[f16 d][int8 q[32]]``, ``w = q * d``.  float32 accumulation, float32 result ``[M, O]``.  In
ggml's gpt-oss files Q8_0 holds the attention projections, ``token_embd`` and the output head
(201088 x 2880: the largest single matrix of a decode step, 615 MB).

Weight layouts (same kernel code for both; ``I = 32 G``):

* ggml bytes as stored in the GGUF file, ``uint8[O, G * 34]`` (``PackedWeight.data``; a
  ``PackedWeight`` of type Q8_0 is accepted too).  The 34-byte stride leaves 2-byte alignment:
  the GPU reads the quants with narrow loads.
* :class:`Q8Weights` from :func:`repack_q8_0` (once, at load time): ``qs uint8[O, G, 32]`` (the
  int8 quants' bytes, unchanged) and ``scales float16[O, G]``.  Same 34 bytes per 32 weights;
  quant rows are 32-byte aligned (16-byte vector loads).  A byte shuffle, exact by construction.

In-register decode (exact, cheap): the int8 quant is turned into a float32 without an
int-to-float instruction: its byte ``b`` (two's complement) gives the bits ``b ^ 0x4B000080`` =
float ``2^23 + 128 + q``, minus ``2^23 + 128`` (exact: both are integers below 2^24).  The scale is
the f16 ``d`` converted to float32 (exact).  The dot mode with bf16 x decodes in inline PTX on the
GPU instead (:data:`ASM_Q8_DECODE`): four bytes per xor, then per weight one prmt building the
float32 ``2^15 + u`` and one exact fma ``(2^15 + u) d - (2^15 + 128) d = q d``, and a cvt to bf16
per pair (offline SASS 401 -> 294 instructions per K step of the 64-row tile; H100 3-6 %, tenth
session: that kernel is latency-bound, benchmarks/RESULTS.md).  Bit-identical to the jnp chain
for every finite scale; an infinite or NaN scale gives NaN for the whole block (the jnp chain:
+-inf, or NaN for q = 0).

Numerics per kernel mode (see :func:`pallas_kernels.mxfp4_matmul.plan_dense` for the modes):

* ``"dot"`` (prefill, and decode with more than GEMV_MAX_ROWS rows): ``w = q * d`` exactly in
  float32 (8-bit times 11-bit significands), rounded once to the compute dtype (``x.dtype``), then
  tensor-core dots with float32 accumulation: exactly the XLA reference path
  (``gptjax.packed.linear``), up to summation order.  From 3 to 255 rows the dot is "swapped" by
  default (``Plan.swap``, :func:`_step_dot_t`): each tile is computed as ``out^T = W x^T``, so on
  Hopper the decoded weight tile feeds wgmma from registers and x streams from shared memory,
  where the plain orientation stores the decoded tile to shared memory behind a barrier every K
  step.  Same values (same decode, one rounding, float32 accumulation).  H100, 64 rows:
  attention projections and the vocab head 19-26 % faster, gpt-oss-20b batch-64 decode 6,592 ->
  6,805 tok/s; 16-32 rows up to 2x (benchmarks/RESULTS.md, thirteenth session).
* ``"gemv"`` (decode): per block and row ``s = sum_j q_j x_j`` (32 products, exact for bf16 x),
  then ``acc += s * d``: one multiply per block instead of one per weight.  The weights are never
  rounded to bf16 here (the reference path rounds ``q * d`` to bf16 first), so with bf16 x the
  kernel is more accurate than the reference by up to one bf16 rounding of each weight (relative
  2^-9); with float32 x only the rounding order differs.

Tiling, masking, split-K, the GEMV software prefetch and the program grid are shared with the
MXFP4 kernels (:mod:`pallas_kernels.mxfp4_matmul`, whose plumbing this module imports).

Compiled (Triton 3.6 offline, sm_90a SASS): the repacked-layout GEMV takes ~5.6 instructions per
weight (~6.5 with prefetch).  Q8_0 streams ~10.6 weights per SM-clock at 2.6 TB/s, about half
the issue rate, so decode should be bandwidth-bound; the ggml-bytes layout needs ~13 (2-byte
loads).

``q8_0_embed`` is plain jnp on purpose: a row gather touches n * 34/32 * D bytes, which XLA
already does at memory speed (gather the packed rows, decode them in one fused elementwise pass); a
Pallas kernel would save nothing.

``*_ref`` twins: same signatures, decode with ``gptjax.quant.dequantize_q8_0`` (bit-exact vs
gguf.quants), round to ``x.dtype``, one ``dot_general``.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import WeightsError
from gptjax.quant import dequantize_q8_0
# Shared kernel plumbing (plans, masks, stores, split-K) lives with the MXFP4 kernels.
from pallas_kernels.mxfp4_matmul import (
    DenseOps,
    GEMV_MAX_ROWS,
    _W,
    dense_matmul,
    parse_packed,
    _STATIC,
    _dot_nt,
    _iota,
    _ix,
    load_x32,
    use_kernel,
)

__all__ = [
    "Q8Weights",
    "repack_q8_0",
    "unpack_q8_0",
    "q8_0_matmul",
    "q8_0_matmul_ref",
    "q8_0_embed",
    "q8_0_embed_ref",
    "q8_values",
    "use_kernel",
    "GEMV_MAX_ROWS",
]

F32 = jnp.float32
QK = 32
BLOCK_BYTES = 34
Q8_0_TYPE = 8           # gguf.GGMLQuantizationType.Q8_0
_MAGIC = 0x4B000080     # float32 bits of 2^23 + 128, with the byte xor-ed in: 2^23 + 128 + q
_MAGIC_F = np.float32(2.0 ** 23 + 128)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

class Q8Weights(NamedTuple):
    """Q8_0 weights in the kernel layout (a pytree).

    ``qs``: uint8 ``[..., O, G, 32]``, the bytes of the int8 quants (two's complement), unchanged.
    ``scales``: float16 ``[..., O, G]``, the block scales ``d``.  Logical shape ``[..., O, 32 G]``.
    """

    qs: Any
    scales: Any


def _f16_from_bytes(lo, hi, xp):
    """Two uint8 arrays (little-endian halves) -> float16 (bit cast, exact)."""
    u = lo.astype(np.uint16) | (hi.astype(np.uint16) << 8)
    if xp is np:
        return u.view(np.float16)
    return lax.bitcast_convert_type(u, jnp.float16)


def repack_q8_0(w_data) -> Q8Weights:
    """ggml Q8_0 bytes ``uint8[..., O, G * 34]`` -> :class:`Q8Weights` (``qs [..., O, G, 32]``
    uint8, ``scales [..., O, G]`` float16).  A byte shuffle; numpy in, numpy out; jax in, jax out.
    """
    xp = jnp if isinstance(w_data, jax.Array) else np
    w = w_data if xp is jnp else np.asarray(w_data)
    if w.dtype != np.uint8 or w.ndim < 2 or w.shape[-1] % BLOCK_BYTES:
        raise WeightsError(f"repack_q8_0: expected ggml Q8_0 bytes uint8[..., O, G*34], got "
                           f"{w.dtype}{list(w.shape)}")
    g = w.shape[-1] // BLOCK_BYTES
    b = w.reshape(*w.shape[:-1], g, BLOCK_BYTES)
    qs = b[..., 2:]
    sc = _f16_from_bytes(b[..., 0], b[..., 1], xp)
    if xp is np:
        qs, sc = np.ascontiguousarray(qs), np.ascontiguousarray(sc)
    return Q8Weights(qs, sc)


def unpack_q8_0(w: Q8Weights):
    """Inverse of :func:`repack_q8_0`: ggml bytes ``uint8[..., O, G * 34]``."""
    if isinstance(w.qs, jax.Array):
        u = lax.bitcast_convert_type(jnp.asarray(w.scales, jnp.float16), jnp.uint16)
        d = jnp.stack([(u & 0xFF).astype(jnp.uint8), (u >> 8).astype(jnp.uint8)], axis=-1)
        b = jnp.concatenate([d, w.qs], axis=-1)
    else:
        u = np.asarray(w.scales, np.float16).view(np.uint16)
        d = np.stack([(u & 0xFF).astype(np.uint8), (u >> 8).astype(np.uint8)], axis=-1)
        b = np.concatenate([d, np.asarray(w.qs)], axis=-1)
    return b.reshape(*b.shape[:-2], b.shape[-2] * BLOCK_BYTES)


def _parse_weights(w, n_lead: int, fn: str) -> _W:
    """Q8_0 weights: ggml bytes [..., O, G * 34] or :class:`Q8Weights` (``parse_packed``)."""
    return parse_packed(w, n_lead, fn, split_cls=Q8Weights, type_id=Q8_0_TYPE, type_label="Q8_0",
                        block_bytes=BLOCK_BYTES, qs_width=QK, scale_dtype=jnp.float16)


def _ggml_blocks(w: _W) -> jax.Array:
    """uint8 [..., O, G, 34] of a parsed weight."""
    if w.layout == "ggml":
        return w.arrays[0]
    qs, sc = w.arrays
    u = lax.bitcast_convert_type(sc, jnp.uint16)
    d = jnp.stack([(u & 0xFF).astype(jnp.uint8), (u >> 8).astype(jnp.uint8)], axis=-1)
    return jnp.concatenate([d, qs], axis=-1)


# ---------------------------------------------------------------------------------------------
# Exact decode (plain jnp; lowers to Triton integer/float ops)
# ---------------------------------------------------------------------------------------------

def q8_values(qbytes: jax.Array) -> jax.Array:
    """Bytes of int8 quants (uint8, any shape) -> their float32 values, exactly, without an
    int-to-float conversion: bits ``b ^ 0x4B000080`` are the float ``2^23 + 128 + q``
    (``b ^ 0x80 = q + 128`` in 0..255 lands in the mantissa of 2^23), minus ``2^23 + 128``."""
    bits = qbytes.astype(jnp.uint32) ^ np.uint32(_MAGIC)
    return lax.bitcast_convert_type(bits, F32) - _MAGIC_F


def _load_tile(w: _W, w_refs, lead, row0, bn, g0, gt, g_end=None):
    """Quant bytes uint8 [bn, gt, 32] and scales float32 [bn, gt]; rows >= O and blocks >=
    ``g_end`` (default G) are not read (0)."""
    g_end = w.G if g_end is None else g_end
    ok = ((row0 + _iota(bn)) < w.O)[:, None] & ((g0 + _iota(gt)) < g_end)[None, :]
    r, g = pl.ds(row0, bn), pl.ds(g0, gt)
    if w.layout == "ggml":
        (ref,) = w_refs                                                     # [..., O, G, 34]
        qs = pltriton.load(ref.at[(*lead, r, g, pl.ds(2, QK))], mask=ok[:, :, None], other=0)
        lo = pltriton.load(ref.at[(*lead, r, g, _ix(0))], mask=ok, other=0)
        hi = pltriton.load(ref.at[(*lead, r, g, _ix(1))], mask=ok, other=0)
        d = _f16_from_bytes(lo, hi, jnp).astype(F32)
    else:
        qs_ref, sc_ref = w_refs
        qs = pltriton.load(qs_ref.at[(*lead, r, g, pl.ds(0, QK))], mask=ok[:, :, None], other=0)
        d = pltriton.load(sc_ref.at[(*lead, r, g)], mask=ok, other=0).astype(F32)
    return qs, d


#: Dot-mode decode on the GPU for bfloat16 x: inline PTX (:func:`_q8_bf16_asm`) instead of the
#: jnp chain (:func:`q8_values`, a multiply, a rounding).  Read at trace time; interpret mode and
#: other compute dtypes take the jnp chain.
ASM_Q8_DECODE = True

# Four quant bytes (pack=4: one b32 in $2) -> bf16(q * d) for each, two per b32 in element order
# ($0: elements 0 and 1, $1: 2 and 3).  ``b ^ 0x80 = q + 128 = u`` (all four bytes at once), then
# prmt builds the float32 ``2^15 + u`` (bits ``0x47000000 | u << 8``) and one fma gives
# ``(2^15 + u) d - (2^15 + 128) d = q d`` exactly: $3..$6 are the four elements' scales d
# (float32 of an f16: 11 significant bits), $7..$10 the exact ``-(2^15 + 128) d`` (9 x 11
# bits), and ``q d`` (8 x 11 bits) is a float32, so the one rounding of the fma is exact.  cvt
# rounds to bf16 (RNE), as the jnp chain's ``astype``.
_Q8_BF16_ASM = """{
.reg .b32 u, k, f<4>, a<4>;
xor.b32 u, $2, 0x80808080;
mov.b32 k, 0x47000000;
prmt.b32 f0, u, k, 0x7404;
prmt.b32 f1, u, k, 0x7414;
prmt.b32 f2, u, k, 0x7424;
prmt.b32 f3, u, k, 0x7434;
fma.rn.f32 a0, f0, $3, $7;
fma.rn.f32 a1, f1, $4, $8;
fma.rn.f32 a2, f2, $5, $9;
fma.rn.f32 a3, f3, $6, $10;
cvt.rn.bf16x2.f32 $0, a1, a0;
cvt.rn.bf16x2.f32 $1, a3, a2;
}"""
_Q8_OFFSET = np.float32(-(2.0 ** 15 + 128))


# Two quant bytes (pack=2: their b16 zero-extended in $1) -> bf16(q * d) for both ($0): the
# arithmetic of _Q8_BF16_ASM on half as many bytes ($2/$3 the scales, $4/$5 the offsets).  The
# swapped dot's register operand holds the tile as byte pairs (wgmma's A fragments), so this
# form needs no byte shuffles to build four-byte packs (offline SASS per K step of a 64 x 128
# tile: 365 instructions vs 461 with pack=4; H100 4-12 % faster, thirteenth session).
_Q8_BF16_ASM2 = """{
.reg .b32 u, k, f<2>, a<2>;
xor.b32 u, $1, 0x8080;
mov.b32 k, 0x47000000;
prmt.b32 f0, u, k, 0x7404;
prmt.b32 f1, u, k, 0x7414;
fma.rn.f32 a0, f0, $2, $4;
fma.rn.f32 a1, f1, $3, $5;
cvt.rn.bf16x2.f32 $0, a1, a0;
}"""


#: {pack: (asm, constraints)} of the two decodes: four bytes per call (the dot), two (the
#: swapped dot).
_Q8_BF16_ASMS = {4: (_Q8_BF16_ASM, "=r,=r,r,r,r,r,r,r,r,r,r"), 2: (_Q8_BF16_ASM2, "=r,r,r,r,r,r")}


def _q8_bf16_asm(qs, d, pack: int = 4):
    """Quant bytes uint8 [bn, gt, 32] and scales float32 [bn, gt] -> bfloat16 [bn, gt, 32]
    ``round_bf16(q * d)``, the values of the jnp chain, ``pack`` (4 or 2) bytes per inline-asm
    call.  GPU only (inline PTX, sm_90)."""
    asm, constraints = _Q8_BF16_ASMS[pack]
    ds = jnp.broadcast_to(d[..., None], qs.shape)
    offs = jnp.broadcast_to((d * _Q8_OFFSET)[..., None], qs.shape)          # exact
    return pltriton.elementwise_inline_asm(
        asm, args=[qs, ds, offs], pack=pack, constraints=constraints,
        result_shape_dtypes=[jax.ShapeDtypeStruct(qs.shape, jnp.bfloat16)])[0]


def _decoded_tile(w: _W, w_refs, row0, bn, g0, gt, cdt, interpret, pack):
    """The weight tile [bn, gt * 32] as ``round_cdt(q * d)`` (exact decode, one rounding)."""
    qs, d = _load_tile(w, w_refs, (), row0, bn, g0, gt)
    if ASM_Q8_DECODE and not interpret and cdt == jnp.bfloat16:
        wt = _q8_bf16_asm(qs, d, pack)
    else:
        wt = (q8_values(qs) * d[:, :, None]).astype(cdt)                   # exact, one rounding
    return wt.reshape(bn, gt * QK)


def _step_dot_t(acc, w: _W, w_refs, x_ref, x_rows, x_ok, row0, bn, g0, gt, cdt, interpret):
    """One K step of the swapped dot (``Plan.swap``): acc [bn, bm] += W [bn, bk] . x^T, x read
    as [M, I] (a plain 2-D tile, which the pipeline copies straight into wgmma's layout)."""
    wt = _decoded_tile(w, w_refs, row0, bn, g0, gt, cdt, interpret, pack=2)
    k_ok = (g0 * QK + _iota(gt * QK)) < w.I
    xt = pltriton.load(x_ref.at[x_rows, pl.ds(g0 * QK, gt * QK)],
                       mask=x_ok[:, None] & k_ok[None, :], other=0)         # [bm, bk]
    return _dot_nt(wt, xt, interpret) + acc


def _step_dot(acc, w: _W, w_refs, x_ref, x_rows, x_ok, row0, bn, g0, gt, cdt, interpret):
    wt = _decoded_tile(w, w_refs, row0, bn, g0, gt, cdt, interpret, pack=4)
    bm = x_ok.shape[0]
    xt = load_x32(x_ref, x_rows, x_ok, g0, gt, w.G).reshape(bm, gt * QK)
    return _dot_nt(xt, wt, interpret) + acc


def _gemv_load(w: _W, w_refs, x_ref, rows, row0, bn, g0, gt, g_end):
    """Everything one GEMV step reads: (quant bytes, scales, x tile per row)."""
    qs, d = _load_tile(w, w_refs, (), row0, bn, g0, gt, g_end)
    return qs, d, tuple(load_x32(x_ref, r, None, g0, gt, g_end) for r in rows)


def _gemv_compute(accs, tile):
    """accs: float32 [bn, gt] per row; block sums of q * x, then times the block scale."""
    qs, d, xs = tile
    q = q8_values(qs)                                                       # [bn, gt, 32]
    return tuple(acc + jnp.sum(q * xr[None], axis=2) * d for acc, xr in zip(accs, xs))


#: The Q8_0 pieces of the shared dense matmul (pallas_kernels.mxfp4_matmul.dense_matmul); x is
#: read as [M, G, 32] (as [M, I] by the swapped dot).
Q8_OPS = DenseOps(_step_dot, _gemv_load, _gemv_compute, lambda x2, G: x2.reshape(x2.shape[0], G, QK),
                  "q8_0_matmul", _step_dot_t)
_Q8_STATIC = _STATIC + ("swap", "partials")


@functools.partial(jax.jit, static_argnames=_Q8_STATIC)
def q8_0_matmul(x, w, bias=None, *, mode=None, block_m=None, block_n=None, block_k=None,
                k_splits=None, num_warps=None, num_stages=None, prefetch=None, swap=None,
                partials=False, interpret=False):
    """``x [..., I] @ dequant(w)[O, I]^T (+ bias [O])`` -> float32 ``[..., O]``, fused (Pallas).

    x: float32 / bfloat16 / float16 ``[..., I]``; w: ggml Q8_0 bytes ``uint8[O, I / 32 * 34]``
    (or a ``PackedWeight`` of type Q8_0, or :class:`Q8Weights`); bias: float ``[O]`` or None.
    Tiling arguments as in :func:`pallas_kernels.mxfp4_matmul.mxfp4_matmul` (defaults:
    :func:`~pallas_kernels.mxfp4_matmul.plan_dense`), and ``swap`` (the dot mode's transposed
    tile, ``Plan.swap``; default on for 3-255 rows); ``interpret=True`` for CPU.
    ``partials=True`` (bias None): the K splits' partial products float32 ``[S, ..., O]``
    unsummed (``mxfp4_matmul.dense_matmul``); their sum over axis 0 is the result.
    """
    tiling = dict(mode=mode, block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits,
                  num_warps=num_warps, num_stages=num_stages, prefetch=prefetch, swap=swap)
    return dense_matmul(x, _parse_weights(w, 0, "q8_0_matmul"), bias, Q8_OPS, "q8_0_matmul",
                        tiling, interpret, partials)


@functools.partial(jax.jit, static_argnames=_Q8_STATIC)
def q8_0_matmul_ref(x, w, bias=None, *, mode=None, block_m=None, block_n=None, block_k=None,
                    k_splits=None, num_warps=None, num_stages=None, prefetch=None, swap=None,
                    partials=False, interpret=False):
    """Plain-jnp twin of :func:`q8_0_matmul` (tiling arguments ignored): exact decode with
    ``quant.dequantize_q8_0``, rounded to ``x.dtype``, one dot with float32 accumulation (IEEE
    float32 for float32 x); ``partials=True`` returns it as the one "split" ``[1, ..., O]``."""
    del mode, block_m, block_n, block_k, k_splits, num_warps, num_stages, prefetch, swap
    del interpret
    if partials:
        if bias is not None:
            raise ValueError("q8_0_matmul_ref: partials=True takes no bias")
        return q8_0_matmul_ref(x, w)[None]
    wp = _parse_weights(w, 0, "q8_0_matmul_ref")
    lead, i = x.shape[:-1], x.shape[-1]
    if i != wp.I:
        raise WeightsError(f"q8_0_matmul_ref: x[..., {i}] does not match the weight "
                           f"[O={wp.O}, I={wp.I}]")
    wd = dequantize_q8_0(_ggml_blocks(wp)).reshape(wp.O, wp.I).astype(x.dtype)
    x2 = x.reshape(-1, i)
    if jax.default_backend() == "cpu" and x2.dtype != F32:
        x2, wd = x2.astype(F32), wd.astype(F32)           # exact (16-bit products fit f32)
    prec = lax.Precision.HIGHEST if x2.dtype == F32 else lax.Precision.DEFAULT
    y = jnp.einsum("mi,oi->mo", x2, wd, precision=prec, preferred_element_type=F32)
    if bias is not None:
        y = y + jnp.asarray(bias, F32)
    return y.reshape(*lead, wp.O)


# ---------------------------------------------------------------------------------------------
# Embedding gather
# ---------------------------------------------------------------------------------------------

@jax.jit
def q8_0_embed(table, ids):
    """Rows ``table[ids]`` of a Q8_0 table, decoded exactly -> float32 ``[*ids.shape, D]``.

    table: ggml bytes ``uint8[V, D / 32 * 34]`` (or a PackedWeight of type Q8_0, or
    :class:`Q8Weights`); ids: int, any shape; out-of-range ids are clipped (as
    ``gptjax.packed.embed``).  Plain jnp (see the module docstring): gathers the packed rows,
    then decodes only those, bit-identical to ``gguf.quants.dequantize`` of the same rows.
    """
    wp = _parse_weights(table, 0, "q8_0_embed")
    ids = jnp.clip(jnp.asarray(ids, jnp.int32), 0, wp.O - 1)
    sel = tuple(jnp.take(a, ids, axis=0) for a in wp.arrays)
    if wp.layout == "ggml":
        return dequantize_q8_0(sel[0]).reshape(*ids.shape, wp.I)
    qs, sc = sel
    q = q8_values(qs)                                                       # [..., G, 32]
    return (q * sc.astype(F32)[..., None]).reshape(*ids.shape, wp.I)


@jax.jit
def q8_0_embed_ref(table, ids):
    """Twin of :func:`q8_0_embed`: decode the whole table, then gather (tests only: it
    materialises V x D floats)."""
    wp = _parse_weights(table, 0, "q8_0_embed_ref")
    dense = dequantize_q8_0(_ggml_blocks(wp)).reshape(wp.O, wp.I)
    return jnp.take(dense, jnp.asarray(ids, jnp.int32), axis=0, mode="clip")
