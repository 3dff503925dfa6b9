"""MXFP4 matmuls with the dequantization fused in registers (Pallas, Triton backend).

Math.  ``y[m, o] = sum_i x[m, i] * w[o, i] (+ b[o])`` with ``w`` stored as ggml ``block_mxfp4``
(MODEL_FORMATS.md §3.3; ggml-common.h, gguf-py ``quants.MXFP4``): one 17-byte block per 32 inputs,
``[u8 e][u8 qs[16]]``; byte j of qs holds element j (low nibble) and element j + 16 (high nibble);
``w = kvalues[c] * 2^(e - 128)`` with ``kvalues = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12]``
(the E2M1 table doubled).  Accumulation is float32; the result is float32 ``[..., O]``.

Weight layouts (``I = 32 G``):

* the kernel layout, :class:`Mxfp4Weights` from :func:`repack_mxfp4`, done once at load time
  (``PackedWeight.to_kernel_layout``): the 32 codes of a block as four uint32 words,
  ``qs uint32[O, G, 4]``, in a nibble order chosen for the decode below, and the scale bytes
  split off, ``scales uint8[O, G]``.  Same 17 bytes per 32 weights as the file; a block's codes
  are one 16-byte vector load.  Exact by construction (a permutation of nibbles; tested against
  ``quant.dequantize`` and by the round trip).
* ggml bytes as the GGUF file stores them, ``uint8[O, G * 17]`` (``PackedWeight.data``; a
  ``PackedWeight`` itself is accepted too): repacked inside the call (a copy of the weight per
  call: fine for tests and one-off calls, not for a decode loop).

In-register decode (Triton has no gather, so no lookup table; JAX_PALLAS.md §1.2, §7), exact, no
select: each nibble's bits go into an IEEE half, magnitude ``c & 7`` at bits 9..11 and sign at
bit 15, which is exactly ``FP4[c] * 2^-14`` for all 16 codes because E2M1's subnormals (0, 0.5)
land on f16's subnormals.  Word q of a block holds elements 8q..8q+7 with the nibbles of
elements r and r + 4 sixteen bits apart, so one shift and one mask (per sign and magnitude)
build two halves at once from 32-bit words: 8 weights from ~8 integer instructions
(:func:`_word_pairs`), and after ``join`` of the pieces the values come out in element order, so
x is read as plain ``[M, G, 32]`` rows (:func:`_words_fp4`).  The byte-wise decode this replaced
(one uint32 per code byte) ran the batch-1 MoE GEMV of gpt-oss-20b 1.16-1.28x slower on the H100
(benchmarks/mxfp4_words_proto.py).  f16 -> f32 is exact.  The block scale ``2^(e - 128)`` (ggml
``ggml_e8m0_to_fp32_half``) times the ``2^15`` that turns ``FP4 * 2^-14`` into ``kvalues`` is
applied as two normal float32 powers of two, ``2^(min(e,240) - 113) * 2^(max(e,240) - 240)``
(:func:`_e8m0_split`), so every factor is exact and no denormal is ever formed.

The grouped MoE kernel's byte view decodes differently on the GPU (:data:`ASM_BYTE_DECODE`): four
code bytes at a time in inline PTX straight to bf16 bit patterns (``sign << 15 | (c & 7) << 6`` is
exactly ``FP4[c] * 2^-126``: E2M1's subnormals land on bf16's), then packed bf16 multiplies by one
or two normal powers of two (:func:`_byte_pair_bf16_asm`; one when the weight's ``scale_max`` is
<= 128).  Same exact weights as the jnp chain (tested for every code and scale byte, by a PTX
interpreter on the CPU and through the kernel on the GPU); interpret mode takes the jnp chain.
H100, gpt-oss-20b batch 64: 331 -> 204 (two factors) / 184 (one) SASS instructions per K step,
gate/up 261 -> 223 µs, down 155 -> 129 µs (with its 16 x 256 tiles), b64 5,407 -> 6,233 tok/s
(eighth -> ninth session).

Numerics per kernel mode:

* ``"dot"`` (prefill, and decode with more than :data:`GEMV_MAX_ROWS` rows): the weights are
  decoded exactly -- bit-identical to ``quant.dequantize_mxfp4`` / ``gguf.quants.dequantize`` for
  every code and every scale byte 2..255 (tested exhaustively, in and out of the kernel), except
  that code 8 gives -0.0 where ggml's int8 table gives +0 -- rounded to the compute dtype
  ``x.dtype`` (a no-op for bf16 and f32: every MXFP4 value has <= 2 significant bits) and fed to
  tensor-core dots with float32 accumulation (bf16 x bf16, or IEEE float32 for float32 x:
  ``Precision.HIGHEST``, no TF32).  That is the XLA reference path (``gptjax.packed.linear``) up to
  summation order.  Scale bytes 0 and 1 give ggml's denormals (|w| <= 12 * 2^-127); a
  flush-to-zero multiply (XLA:CPU, possibly the GPU) returns 0 there.
* ``"gemv"`` (decode, M <= GEMV_MAX_ROWS): per block and row, ``s = sum_j (FP4[c_j] 2^-14) x_j``
  over the block's 32 inputs (an in-thread reduction: a block's 16 code bytes sit in one
  thread), then ``acc += s * 2^(e - 113)``.  Mathematically the same sum (a power of two factors
  out); only the float32 rounding order differs.  It saves two multiplies per weight, which
  matters because decode is bound by instruction issue as much as by bandwidth (below).

Kernels and tiling (all ``pl.pallas_call`` with explicit ``pltriton.CompilerParams``, so the
Triton backend is used on jax 0.10 .. 0.12; power-of-two tiles; ragged edges of M, O and of the
block count G are masked loads/stores, so any M, O and any I = 32 G work, e.g. 2880 = 90 blocks):

* dense ``"gemv"``: one program per (block of ``block_n`` output rows, K split), all M rows in the
  program, a float32 accumulator ``[block_n, gt]`` per row, reduced once at the end.  Triton
  pipelines only loads that feed dots, so for small grids (decode of O = 2880: a few warps per
  SM) the next step's loads are issued by hand before this step's arithmetic (``prefetch``).
* dense ``"dot"``: tiles ``[block_m, block_n]``; per K step the decoded tile is cast to the
  compute dtype and two dots are accumulated (``block_m, block_n >= 16``: Triton's minimum).
* split-K (``k_splits``, decode only): when the output tiles alone give fewer than
  :data:`TARGET_PROGRAMS` programs (O = 2880 or 512 at one row: 90 or 16 tiles for 132 SMs), K is
  split across programs, each writing a float32 partial ``[S, M, O]`` that XLA sums (and adds the
  bias to) afterwards.
* MoE (:func:`mxfp4_moe_matmul`): ``"pairs"`` (decode: one GEMV program per (token, slot) pair
  and block of output rows, reading only that pair's expert) or ``"grouped"`` (prefill: the T*k
  routed rows sorted by expert (:func:`moe_tiles`), tiles of ``block_m`` rows of one expert, one
  dot program per (tile, block of output rows); unused tiles of the static bound exit at once).

What the compiled code looks like (the Triton IR these kernels lower to, compiled offline with
Triton 3.6 and ptxas for sm_90a; no spills anywhere): decode GEMV with repacked weights ~6.3
instructions per weight (~7.2 with the software prefetch), ~12.4 on ggml bytes (byte loads).  An
H100 SM issues 128 thread-instructions per clock and must consume ~21 MXFP4 weights per clock to
stream 2.6 TB/s, so the MXFP4 decode kernel sits near the issue limit: expect ~60-80 % of the
bandwidth at best.  Prefill uses wgmma (``HGMMA.64x64x16``) with cp.async-pipelined loads, and
the decode adds ~25 instructions per thread per 64-deep K step beside it.

``*_ref`` twins: plain jnp with the same signatures (tiling arguments accepted and ignored),
decoding with ``gptjax.quant.dequantize_mxfp4`` then one ``dot_general`` (the XLA reference path).

Sources: ggml ``dequantize_row_mxfp4``, ``ggml_e8m0_to_fp32_half`` (ggml-quants.c, ggml-impl.h);
OCP Microscaling Formats v1.0; Triton/Pallas restrictions from jax ``pallas/triton/lowering.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import WeightsError
from gptjax.quant import dequantize_mxfp4

__all__ = [
    "Mxfp4Weights",
    "repack_mxfp4",
    "unpack_mxfp4",
    "mxfp4_matmul",
    "mxfp4_matmul_ref",
    "mxfp4_moe_matmul",
    "mxfp4_moe_matmul_ref",
    "mxfp4_moe_grouped",
    "mxfp4_moe_grouped_ref",
    "tile_experts",
    "fp4_kvalues",
    "e8m0_half",
    "use_kernel",
    "Plan",
    "plan_dense",
    "plan_moe",
    "moe_tiles",
    "moe_n_tiles",
    "inverse_order",
    "moe_block_m",
    "GEMV_MAX_ROWS",
    "TARGET_PROGRAMS",
    "PREFETCH_MAX_PROGRAMS",
]

F32 = jnp.float32
QK = 32                 # elements per MXFP4 block
BLOCK_BYTES = 17        # bytes per block: 1 scale + 16 code bytes
MXFP4_TYPE = 39         # gguf.GGMLQuantizationType.MXFP4

#: Streaming multiprocessors of the target card (H100 SXM: 132).  Only used to size grids.
SM_COUNT = 132
#: Split K until the grid has at least this many programs (two waves of the SMs).
TARGET_PROGRAMS = 2 * SM_COUNT
#: Dense matmuls with at most this many rows use the elementwise GEMV kernel, more use dots.
#: (SASS instruction counts per weight, MXFP4 / Q8_0: GEMV 6.3 / 5.6 at 1 row, 13.3 / 11.5 at 4
#: rows; the 16-row dot kernel 10.9 / 8.8 for all 16 rows.)
GEMV_MAX_ROWS = 2
#: K splits at most for 64..255-row dot tiles (each split writes an f32 partial of M x O).  H100,
#: gpt-oss-20b at 64 rows, L2-cold (dense_rows_sweep.py --copies 4, tenth session): 8 splits
#: beat 4 with the same 64 x 128 x 64 tiles, q/k/v 25.5 -> 22.8 µs, attention output 22.0 -> 19.3
#: (the fourth session's L2-warm sweep had chosen 4).
MAX_SPLITS_BATCH = 8
#: ... and with the swapped dot (:class:`Plan` ``swap``) from 64 rows on (its 64-row tiles make
#: twice the programs; below 64 rows it splits up to MAX_SPLITS_BATCH times)
SWAP_MAX_SPLITS = 4
#: Grouped MoE calls with at most this many routed rows decode bytes (:func:`_mxfp4_step_dot`).
BYTE_VIEW_MAX_ROWS = 256
#: Routed rows up to which the MoE matmul runs one GEMV per (token, slot) pair ("pairs").
PAIRS_MAX_ROWS = 16
#: GEMV grids with fewer programs than this prefetch the next K step in software.
PREFETCH_MAX_PROGRAMS = 4 * SM_COUNT
#: Cards whose memory (H200: HBM3e, 4.8 TB/s against the H100's 3.35) wants more bytes per step
#: from large batch-1 GEMV grids (the vocab head) than the H100's 32 rows x 256 inputs: 16 x
#: 1024 there.  H200, gpt-oss-20b's Q8_0 head [201088, 2880] at one row: 214 -> 180 µs (2.87 ->
#: 3.41 TB/s; benchmarks/dense_rows_sweep.py --gemv-head, fifteenth session); the decode GEMVs
#: of fused_gemv / moe_decode kept their H100 tiles there (same sweep, no better tile).
WIDE_GEMV_CARDS = ("H200",)


@functools.lru_cache(maxsize=None)
def wide_gemv_card() -> bool:
    """Whether the default device is one of :data:`WIDE_GEMV_CARDS` (by ``device_kind``)."""
    kind = getattr(jax.devices()[0], "device_kind", "").lower()
    return any(c.lower() in kind for c in WIDE_GEMV_CARDS)


def use_kernel() -> bool:
    """Whether callers should take the Pallas kernels: a GPU backend, and the environment
    variable ``GPTJAX_KERNELS`` is not ``"ref"`` (set it to force the XLA reference path)."""
    return jax.default_backend() == "gpu" and os.environ.get("GPTJAX_KERNELS", "") != "ref"


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

class Mxfp4Weights(NamedTuple):
    """MXFP4 weights in the kernel layout (a pytree: jit traces both arrays).

    ``qs``: uint32 ``[..., O, G, 4]``, the 32 codes of each ggml block as four words, word q
    holding elements ``8q .. 8q + 7``: element ``r = 8q + 4 lane + 2 s1 + s2`` is the nibble at
    bit ``16 lane + 4 s1 + 8 s2`` (:data:`NIBBLE_SHIFTS`), so that one shift and mask turn a word
    into two IEEE halves of consecutive elements (:func:`_words_fp4`).
    ``scales``: uint8 ``[..., O, G]``, the E8M0 byte of each block (``2^(e - 128)`` with the
    doubled table, ggml convention).  Logical weight shape ``[..., O, 32 G]``; 17 bytes per 32
    weights as in the file.
    """

    qs: Any
    scales: Any


#: Bit position of element ``r = 8q + 4 lane + 2 s1 + s2`` of a block inside word q, as
#: ``NIBBLE_SHIFTS[lane, s1, s2]`` (:class:`Mxfp4Weights`).
NIBBLE_SHIFTS = np.array([[[16 * lane + 4 * s1 + 8 * s2 for s2 in (0, 1)] for s1 in (0, 1)]
                          for lane in (0, 1)], np.uint32)


def _xp(a):
    return jnp if isinstance(a, jax.Array) else np


def _repack_blocks(b):
    """ggml blocks uint8 ``[..., G, 17]`` -> (words uint32 ``[..., G, 4]``, scales uint8
    ``[..., G]``).  numpy in, numpy out; jax in, jax out (traceable)."""
    xp = _xp(b)
    qs = b[..., 1:].astype(xp.uint32)                                       # [..., G, 16]
    codes = xp.concatenate([qs & 15, qs >> 4], axis=-1)                    # [..., G, 32] by element
    codes = codes.reshape(*codes.shape[:-1], 4, 2, 2, 2) << xp.asarray(NIBBLE_SHIFTS)
    words = codes.reshape(*codes.shape[:-3], 8).sum(axis=-1, dtype=xp.uint32)  # disjoint bits
    return words, b[..., 0]


def _unpack_blocks(words, scales):
    """Inverse of :func:`_repack_blocks`: ggml blocks uint8 ``[..., G, 17]``."""
    xp = _xp(words)
    codes = (words[..., None, None, None] >> xp.asarray(NIBBLE_SHIFTS)) & 15   # [.., G, 4, 2, 2, 2]
    codes = codes.reshape(*words.shape[:-1], 32).astype(xp.uint8)          # [..., G, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return xp.concatenate([scales[..., None].astype(xp.uint8), qs], axis=-1)


def repack_mxfp4(w_data) -> Mxfp4Weights:
    """ggml MXFP4 bytes ``uint8[..., O, G * 17]`` -> :class:`Mxfp4Weights` (``qs uint32[..., O,
    G, 4]``, ``scales [..., O, G]``).  Exact (a permutation of nibbles); numpy in, numpy out; jax
    in, jax out."""
    xp = _xp(w_data)
    w = w_data if xp is jnp else np.asarray(w_data)
    if w.dtype != np.uint8 or w.ndim < 2 or w.shape[-1] % BLOCK_BYTES:
        raise WeightsError(f"repack_mxfp4: expected ggml MXFP4 bytes uint8[..., O, G*17], got "
                           f"{w.dtype}{list(w.shape)}")
    words, sc = _repack_blocks(w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_BYTES, BLOCK_BYTES))
    if xp is np:
        words, sc = np.ascontiguousarray(words), np.ascontiguousarray(sc)
    return Mxfp4Weights(words, sc)


def unpack_mxfp4(w: Mxfp4Weights):
    """Inverse of :func:`repack_mxfp4`: ggml bytes ``uint8[..., O, G * 17]``."""
    b = _unpack_blocks(w.qs, w.scales)                                      # [..., O, G, 17]
    return b.reshape(*b.shape[:-2], b.shape[-2] * BLOCK_BYTES)


@dataclasses.dataclass(frozen=True)
class _W:
    """A parsed weight argument: layout, the arrays handed to the kernel, and sizes."""
    layout: str              # "ggml" (one array [..., O, G, block bytes]) or "split" (qs, scales)
    arrays: tuple
    lead: tuple              # leading (expert) dims
    O: int
    G: int
    scale_max: int | None = None   # MXFP4: largest scale byte if known (PackedWeight.scale_max)

    @property
    def I(self) -> int:
        return self.G * QK

    def static(self) -> _W:
        """The same description without the arrays (what the kernel closure may hold)."""
        return dataclasses.replace(self, arrays=(None,) * len(self.arrays))


def parse_packed(w, n_lead: int, fn: str, *, split_cls, type_id: int, type_label: str,
                 block_bytes: int, qs_width: int, scale_dtype, qs_dtype=jnp.uint8) -> _W:
    """A weight argument of a block-quantized kernel (MXFP4 or Q8_0) as a :class:`_W`.

    Accepted: ggml bytes ``uint8[*lead, O, G * block_bytes]`` (an array, or a ``PackedWeight`` of
    type ``type_id`` in the ggml layout), or the split layout ``split_cls(qs uint8[*lead, O, G,
    qs_width], scales scale_dtype[*lead, O, G])`` (itself, or a ``PackedWeight`` with
    ``layout="kernel"``), with ``n_lead`` leading (expert) dims.  int8 code bytes are viewed as
    uint8.  Anything else raises WeightsError naming ``fn``."""
    t = getattr(w, "ggml_type", None)
    scale_max = getattr(w, "scale_max", None)              # a PackedWeight's hint, else None
    if t is not None and int(t) != type_id:
        raise WeightsError(f"{fn}: packed weight of ggml type {int(t)}, expected {type_label} ({type_id})")
    if getattr(w, "layout", "ggml") == "kernel":                            # PackedWeight, kernel layout
        w = w.data
    lead = "E, " * n_lead
    if isinstance(w, split_cls):
        qs, sc = jnp.asarray(w.qs), jnp.asarray(w.scales)
        if qs.dtype == jnp.int8:
            qs = lax.bitcast_convert_type(qs, jnp.uint8)
        ok = (qs.dtype == qs_dtype and sc.dtype == scale_dtype and qs.ndim == n_lead + 3
              and qs.shape[-1] == qs_width and qs.shape[:-1] == sc.shape)
        if not ok:
            raise WeightsError(f"{fn}: {split_cls.__name__} must be qs {np.dtype(qs_dtype).name}"
                               f"[{lead}O, G, {qs_width}] and "
                               f"scales {np.dtype(scale_dtype).name}[{lead}O, G]; got qs {qs.dtype}"
                               f"{list(qs.shape)}, scales {sc.dtype}{list(sc.shape)}")
        return _W("split", (qs, sc), tuple(qs.shape[:n_lead]), qs.shape[-3], qs.shape[-2],
                  scale_max)
    data = jnp.asarray(getattr(w, "data", w))
    if data.dtype != jnp.uint8 or data.ndim != n_lead + 2 or data.shape[-1] % block_bytes:
        raise WeightsError(f"{fn}: expected ggml {type_label} bytes uint8[{lead}O, G*{block_bytes}], "
                           f"got {data.dtype}{list(data.shape)}")
    g = data.shape[-1] // block_bytes
    return _W("ggml", (data.reshape(*data.shape[:-1], g, block_bytes),),
              tuple(data.shape[:n_lead]), data.shape[-2], g)


def _parse_weights(w, n_lead: int, fn: str) -> _W:
    """MXFP4 weights: ggml bytes [..., O, G * 17] or :class:`Mxfp4Weights` (:func:`parse_packed`).
    The kernels read only the kernel layout: ggml bytes are repacked here, inside the jitted
    call (a copy of the weight per call; load-time repacking, ``PackedWeight.to_kernel_layout``,
    avoids it)."""
    wp = parse_packed(w, n_lead, fn, split_cls=Mxfp4Weights, type_id=MXFP4_TYPE,
                      type_label="MXFP4", block_bytes=BLOCK_BYTES, qs_width=4,
                      scale_dtype=jnp.uint8, qs_dtype=jnp.uint32)
    if wp.layout == "ggml":
        wp = dataclasses.replace(wp, layout="split", arrays=_repack_blocks(wp.arrays[0]))
    return wp


def _dense_weights(w: _W) -> jax.Array:
    """Exact float32 ``[..., O, I]`` of a parsed weight (reference path)."""
    blocks = _unpack_blocks(*w.arrays)
    return dequantize_mxfp4(blocks).reshape(*blocks.shape[:-2], w.I)


# ---------------------------------------------------------------------------------------------
# Exact in-register decode (plain jnp on uint32: lowers to Triton integer ops and one bitcast)
# ---------------------------------------------------------------------------------------------

_MAG, _SGN, _LO16 = np.uint32(0x0E000E00), np.uint32(0x80008000), np.uint32(0xFFFF)


def _word_pairs(w):
    """uint32 words -> {(s1, s2): uint32 holding two IEEE halves}: lane 0 (bits 0..15) is element
    ``2 s1 + s2`` of the word's group of four, lane 1 element ``4 + 2 s1 + s2``
    (:data:`NIBBLE_SHIFTS`).  Each nibble's magnitude ``c & 7`` goes to bits 9..11 of its half and
    its sign ``c & 8`` to bit 15: exactly ``FP4[c] * 2^-14`` for all 16 codes, because E2M1's
    subnormals (exponent 0: 0 and 0.5) land on f16's subnormals.  Code 8 gives -0.0 (ggml's int8
    table has +0; OpenAI's FP4 table -0.0): equal as numbers.  Both lanes of a word with one
    shift-and-mask pair: the two nibbles of a pair sit 16 bits apart."""
    return {
        (0, 0): ((w << 9) & _MAG) | ((w << 12) & _SGN),           # nibbles at bits 0, 16
        (1, 0): ((w << 5) & _MAG) | ((w << 8) & _SGN),            # bits 4, 20
        (0, 1): ((w << 1) & _MAG) | ((w << 4) & _SGN),            # bits 8, 24
        (1, 1): ((w >> 3) & _MAG) | (w & _SGN),                   # bits 12, 28
    }


def _lanes(p):
    """The two halves of a uint32 as float32 (exact)."""
    lo = lax.bitcast_convert_type((p & _LO16).astype(jnp.uint16), jnp.float16)
    hi = lax.bitcast_convert_type((p >> 16).astype(jnp.uint16), jnp.float16)
    return lo.astype(F32), hi.astype(F32)


def _byte_pair(qs):
    """Code bytes uint8 [...] -> float32 (low nibble, high nibble) ``FP4[c] * 2^-14``: the same
    bits as :func:`_word_pairs` for the two nibbles of one byte, built from one uint32 per byte
    (``b * (2^9 + 2^21)`` puts copies of the byte at bits 9 and 21, no carries; ``b * (2^12 +
    2^24)`` the signs at 15 and 31).  The dot mode reads the words as bytes (a byte view of the
    same buffer) and uses this: no joins, two dots per step."""
    b = qs.astype(jnp.uint32)
    return _lanes(((b * np.uint32(0x00200200)) & _MAG) | ((b * np.uint32(0x01001000)) & _SGN))


#: Byte-view dot decode on the GPU: inline PTX straight to bf16 (:func:`_byte_pair_bf16_asm`)
#: instead of the jnp f16 -> f32 -> scale -> bf16 chain (:func:`_byte_pair`).  Read at trace
#: time; interpret mode and non-bf16 compute always take the jnp chain.
ASM_BYTE_DECODE = True

# Four code bytes (pack=4: one b32 in $2) -> the exact bf16 weights of their low (or high)
# nibbles, two per b32 in element order ($0: elements 0 and 1, $1: 2 and 3).  prmt spreads bytes
# 0/1 (2/3) into the two 16-bit lanes; a nibble n then becomes ``sign << 15 | (n & 7) << 6`` by
# one and / multiply / and (``n * 0x1040`` puts copies of n at bits 6 and 12, no carries), which
# is exactly ``FP4[n] * 2^-126`` as bf16 (E2M1 subnormals land on bf16 subnormals); then packed
# bf16 multiplies by normal powers of two (exact; mul.bf16x2 keeps subnormals): $3/$4 =
# ``2^(min(e,128) - 1)`` and, unless every scale byte is <= 128 (``one``), $5/$6 =
# ``2^(max(e,128) - 128)`` (:func:`_byte_asm_factors`).  One call per nibble half: Pallas lowers
# a multi-result elementwise_inline_asm wrongly (jax 0.10.2).
_NIBBLE_BF16_PTX = """{{
.reg .b32 t<2>;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
and.b32 t0, t0, {mask};
and.b32 t1, t1, {mask};
mul.lo.u32 t0, t0, {mul};
mul.lo.u32 t1, t1, {mul};
and.b32 t0, t0, 0x81C081C0;
and.b32 t1, t1, 0x81C081C0;
{scale}}}"""
_SCALE_2 = """mul.rn.bf16x2 t0, t0, $3;
mul.rn.bf16x2 t1, t1, $4;
mul.rn.bf16x2 $0, t0, $5;
mul.rn.bf16x2 $1, t1, $6;
"""
_SCALE_1 = """mul.rn.bf16x2 $0, t0, $3;
mul.rn.bf16x2 $1, t1, $4;
"""
#: {one factor?: (low-nibble asm, high-nibble asm)}
_NIBBLE_BF16_ASM = {one: tuple(_NIBBLE_BF16_PTX.format(mask=m, mul=k, scale=sc)
                               for m, k in (("0x000F000F", "0x1040"), ("0x00F000F0", "0x104")))
                    for one, sc in ((False, _SCALE_2), (True, _SCALE_1))}


def _byte_asm_factors(e):
    """Scale bytes -> the two bf16 factors of the PTX byte decode, ``2^(min(e,128) - 1)`` and
    ``2^(max(e,128) - 128)``: both normal for every byte, product ``2^126 * 2^(e - 127)`` (the
    bias of the bf16 bit pattern times the block scale ``2^(e - 128)`` of the doubled table)."""
    e = e.astype(jnp.uint32)
    return (_pow2_bits(jnp.minimum(e, np.uint32(128)) + np.uint32(126), jnp.bfloat16),
            _pow2_bits(jnp.maximum(e, np.uint32(128)) - np.uint32(1), jnp.bfloat16))


def _byte_pair_bf16_asm(qs, e, one: bool = False):
    """Code bytes uint8 [bn, gt, 16] and scale bytes uint8 [bn, gt] -> bfloat16 (low nibble,
    high nibble) weights ``kvalues[c] * 2^(e - 128)``, exactly (the values of :func:`_byte_pair`
    times its two factors, rounded to bf16: a no-op).  ``one``: every scale byte is <= 128 (the
    weight's ``scale_max``), so the second factor is 1 and skipped.  GPU only (inline PTX, sm_90).
    """
    f1, f2 = (jnp.broadcast_to(f[..., None], qs.shape) for f in _byte_asm_factors(e))
    out = jax.ShapeDtypeStruct(qs.shape, jnp.bfloat16)
    args, cons = ([qs, f1], "=r,=r,r,r,r") if one else ([qs, f1, f2], "=r,=r,r,r,r,r,r")
    return [pltriton.elementwise_inline_asm(asm, args=args, pack=4, constraints=cons,
                                            result_shape_dtypes=[out])[0]
            for asm in _NIBBLE_BF16_ASM[one]]


def _words_fp4(words):
    """Code words uint32 ``[..., 4]`` (one block) -> float32 ``[..., 32]``: ``FP4[c_r] * 2^-14``
    for the block's elements r = 0..31 in order.  The eight pieces are joined (Triton ``join``:
    register-level, only two operands at a time) so that the last axis ends up ordered as
    (q, lane, s1, s2), i.e. by element."""
    pairs = {k: jnp.stack(_lanes(v), axis=-1) for k, v in _word_pairs(words).items()}  # [.., 4, 2]
    by_s2 = [jnp.stack([pairs[(0, s2)], pairs[(1, s2)]], axis=-1) for s2 in (0, 1)]   # [.., 4, 2, 2]
    return jnp.stack(by_s2, axis=-1).reshape(*words.shape[:-1], QK)       # [.., 4, 2, 2, 2] -> 32


def fp4_kvalues(codes: jax.Array) -> jax.Array:
    """E2M1 codes (integers 0..15) -> float32 ggml ``kvalues`` (the doubled E2M1 table 0, 1, 2,
    3, 4, 6, 8, 12, -0, -1, ..., -12), exactly: the kernels' decode (:func:`_words_fp4`, code
    in element 0 of a word) times ``2^15``."""
    w = codes.astype(jnp.uint32)[..., None] & np.uint32(0x0F)
    w = jnp.concatenate([w, jnp.zeros_like(w), jnp.zeros_like(w), jnp.zeros_like(w)], axis=-1)
    return _words_fp4(w)[..., 0] * np.float32(2.0 ** 15)


def _pow2_bits(n, dtype=F32):
    """``2^(n - 127)`` for uint32 n in 1..254 (a normal power of two) as float32, or as bfloat16
    (same exponent field, 7 mantissa bits)."""
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type((n << 7).astype(jnp.uint16), jnp.bfloat16)
    return lax.bitcast_convert_type(n << 23, F32)


def e8m0_half(e: jax.Array) -> jax.Array:
    """E8M0 scale bytes -> float32 ``2^(e - 128)`` exactly as ggml ``ggml_e8m0_to_fp32_half``:
    bits ``(e - 1) << 23`` for e >= 2, the denormals ``0x00200000 << e`` for e < 2."""
    e = e.astype(jnp.uint32)
    bits = jnp.where(e < 2, np.uint32(0x00200000) << jnp.minimum(e, np.uint32(1)),
                     (e - np.uint32(1)) << 23)
    return lax.bitcast_convert_type(bits, F32)


def _e8m0_split(e):
    """Scale bytes -> two normal float32 powers of two whose product is ``2^15 * 2^(e - 128) =
    2^(e - 113)`` (the factor that turns ``FP4 * 2^-14`` into ``kvalues * 2^(e - 128)``):
    ``2^(min(e, 240) - 113)`` and ``2^(max(e, 240) - 240)``.  Both are normal for every byte
    (2^-113 .. 2^127 and 1 .. 2^15), so no denormal is ever formed (immune to flush-to-zero)."""
    e = e.astype(jnp.uint32)
    lo = _pow2_bits(jnp.minimum(e, np.uint32(240)) + np.uint32(14))
    hi = _pow2_bits(jnp.maximum(e, np.uint32(240)) - np.uint32(113))
    return lo, hi


def _decode_words(words, e):
    """words uint32 [..., 4], e uint8 [...] -> float32 [..., 32]: the exact weights of the block,
    ``kvalues[c] * 2^(e - 128)``.

    ``(FP4[c] * 2^-14) * 2^(min(e,240) - 113) * 2^(max(e,240) - 240)``: every factor is exact and
    each multiply is by a normal power of two, so the result is exact unless it overflows (+-inf,
    as in ggml) or falls below the float32 normal range (e <= 1 only: ggml's denormal results,
    which a flush-to-zero multiply turns into 0).
    """
    d1, d2 = _e8m0_split(e)
    return _words_fp4(words) * d1[..., None] * d2[..., None]


# ---------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------

def _iota(n):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _ix(i):
    """A static int index as an int32 scalar array (interpret mode's discharge rules need a
    ``.shape`` on every non-slice index; Triton lowers either the same way)."""
    return jnp.int32(i) if isinstance(i, int) else i


def _load_w_tile(w: _W, w_refs, lead, row0, bn, g0, gt, g_end=None):
    """Code words uint32 [bn, gt, 4] and scale bytes uint8 [bn, gt] of output rows
    ``row0 + [0, bn)`` and blocks ``g0 + [0, gt)``; rows >= O and blocks >= ``g_end`` (default
    G) are not read (code 0)."""
    g_end = w.G if g_end is None else g_end
    row_ok = (row0 + _iota(bn)) < w.O
    ok = row_ok[:, None] & ((g0 + _iota(gt)) < g_end)[None, :]             # [bn, gt]
    r, g = pl.ds(row0, bn), pl.ds(g0, gt)
    qs_ref, sc_ref = w_refs                     # [.., O, G, 4] words (or 16 bytes), [.., O, G]
    if len(qs_ref.shape) == len(sc_ref.shape):
        # flat code words [.., O, G * width]: the tile is loaded as [bn, gt * width], i.e. in
        # the same (row, block) thread arrangement as the scale bytes (see flat_words)
        width = qs_ref.shape[-1] // w.G
        okf = row_ok[:, None] & ((g0 * width + _iota(gt * width)) < g_end * width)[None, :]
        qs = pltriton.load(qs_ref.at[(*lead, r, pl.ds(g0 * width, gt * width))], mask=okf,
                           other=0).reshape(bn, gt, width)
    else:
        width = qs_ref.shape[-1]
        qs = pltriton.load(qs_ref.at[(*lead, r, g, pl.ds(0, width))], mask=ok[:, :, None],
                           other=0)
    e = pltriton.load(sc_ref.at[(*lead, r, g)], mask=ok, other=128)
    return qs, e


def flat_words(arrays):
    """(code words [.., O, G, width], scales [.., O, G]) -> the words as [.., O, G * width] (a
    free reshape): :func:`_load_w_tile` then loads a tile as one contiguous run per row, which
    Triton lays out like the scale tile, so the per-block sums meet their scales without a
    layout conversion through shared memory."""
    qs, sc = arrays
    return (qs.reshape(*qs.shape[:-2], qs.shape[-2] * qs.shape[-1]), sc)


def load_x32(x_ref, rows, row_ok, g0, gt, g_end):
    """x viewed [M, G, 32] -> [bm, gt, 32] (or [gt, 32] for a single row); rows with ``row_ok``
    false and blocks >= ``g_end`` read 0."""
    g_ok = (g0 + _iota(gt)) < g_end
    if row_ok is None:
        return pltriton.load(x_ref.at[_ix(rows), pl.ds(g0, gt), pl.ds(0, QK)],
                             mask=g_ok[:, None], other=0)
    ok = row_ok[:, None, None] & g_ok[None, :, None]
    return pltriton.load(x_ref.at[rows, pl.ds(g0, gt), pl.ds(0, QK)], mask=ok, other=0)


def _dot_nt(a, b, interpret):
    """a [m, k] . b [n, k]^T -> float32 [m, n]: bf16/f16 tensor-core dot with float32
    accumulation, or an IEEE float32 dot (Precision.HIGHEST: no TF32) for float32 operands."""
    if interpret and a.dtype != F32:
        # XLA:CPU cannot run every 16-bit dot; the upcast is exact (products of 16-bit floats
        # are exact in float32), only the summation order differs from the GPU's.
        a, b = a.astype(F32), b.astype(F32)
    prec = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                           preferred_element_type=F32)


def _mxfp4_step_dot(acc, w: _W, w_refs, lead, x_ref, x_rows, x_ok, row0, bn, g0, gt, cdt,
                    interpret):
    """One K step of the dot mode: the weight tile decoded exactly, rounded to ``cdt``, against
    the x rows.  Two ways, told apart by the x view the wrapper passed:

    * x ``[M, G, 32]`` (default): the code words decoded into element order (:func:`_decode_words`,
      three levels of ``join``), one dot;
    * x ``[M, G, q, lane, s1, s2]`` with a byte view of the words (:func:`byte_view`; the grouped
      MoE kernel for few rows per expert): byte k = 2 lane + s2 of word q holds element
      ``8q + 4 lane + s2`` (low nibble, s1 = 0) and that + 2 (high nibble, s1 = 1), so each
      nibble half of the byte tile meets x[.., s1] in byte order: two dots, no joins.
    H100 (benchmarks/mxfp4_dot_variants.py, gpt-oss-20b gate/up): 64 tokens x top-4, byte view
    293 µs vs words 345 µs (best tiles each); 512 tokens the words 604 µs vs 2,018 (the
    six-dimensional x loads stop scaling)."""
    qs, e = _load_w_tile(w, w_refs, lead, row0, bn, g0, gt)
    bm = x_ok.shape[0]
    if len(x_ref.shape) == 3:
        wt = _decode_words(qs, e).astype(cdt).reshape(bn, gt * QK)         # exact, then cdt
        xt = load_x32(x_ref, x_rows, x_ok, g0, gt, w.G).reshape(bm, gt * QK)
        return _dot_nt(xt, wt, interpret) + acc
    ok = x_ok[:, None, None, None, None] & ((g0 + _iota(gt)) < w.G)[None, :, None, None, None]
    if ASM_BYTE_DECODE and not interpret and cdt == jnp.bfloat16:
        one = w.scale_max is not None and w.scale_max <= 128
        halves = _byte_pair_bf16_asm(qs, e, one)                            # bf16 [bn, gt, 16]
    else:
        d1, d2 = _e8m0_split(e)
        halves = [(h * d1[..., None] * d2[..., None]).astype(cdt) for h in _byte_pair(qs)]
    for s1, h in enumerate(halves):                                         # [bn, gt, 16] each
        wt = h.reshape(bn, gt * 16)
        xt = pltriton.load(x_ref.at[x_rows, pl.ds(g0, gt), pl.ds(0, 4), pl.ds(0, 2), _ix(s1),
                                    pl.ds(0, 2)], mask=ok, other=0)        # [bm, gt, 4, 2, 2]
        acc = _dot_nt(xt.reshape(bm, gt * 16), wt, interpret) + acc
    return acc


def _mxfp4_gemv_load(w: _W, w_refs, lead, x_ref, rows, row0, bn, g0, gt, g_end):
    """Everything one GEMV step reads: (code words, scale bytes, (x tile [gt, 32] per row))."""
    qs, e = _load_w_tile(w, w_refs, lead, row0, bn, g0, gt, g_end)
    return qs, e, tuple(load_x32(x_ref, r, None, g0, gt, g_end) for r in rows)


def _mxfp4_gemv_compute(accs, tile):
    """GEMV arithmetic of one step.  accs: one float32 [bn, gt] accumulator per x row.  Per
    block and row, ``s = sum_r FP4[c_r] 2^-14 x_r`` over the block's 32 inputs (the 4 code words
    of a block are in one thread: an in-register reduction), then the block's exact power-of-two
    scale ``2^(e - 113)`` is applied to ``s``.  The same value as summing ``w_r x_r`` with the
    exact weights (a power of two factors out of a sum); only the float32 rounding order differs.
    Two multiplies per weight fewer than dequantize-then-multiply.
    """
    qs, e, xs = tile
    h = _words_fp4(qs)                                                      # [bn, gt, 32]
    d1, d2 = _e8m0_split(e)                                                 # [bn, gt]
    return tuple(acc + jnp.sum(h * xr.astype(F32)[None], axis=2) * d1 * d2
                 for acc, xr in zip(accs, xs))


def _gemv_loop(load, compute, accs, g_first, gt, steps, g_end, prefetch=True):
    """``steps`` K steps starting at block ``g_first`` with a software prefetch: the loads of
    step t + 1 are issued before the arithmetic of step t, so their latency overlaps it (Triton
    pipelines only loads that feed dots; decode grids are too small to hide latency with more
    warps).  Loads at or past ``g_end`` are masked off, so the prefetch past the last step reads
    nothing.  ``prefetch=False``: load and compute in the same step."""
    if not prefetch:
        return lax.fori_loop(0, steps, lambda t, a: compute(a, load(g_first + t * gt, g_end)),
                             accs)

    def body(t, carry):
        accs, cur = carry
        nxt = load(g_first + (t + 1) * gt, g_end)
        return compute(accs, cur), nxt

    accs, _ = lax.fori_loop(0, steps, body, (accs, load(g_first, g_end)))
    return accs


def _store_rows(out_ref, prefix, y, m_rows, m_ok, n0, bn, n_out):
    """Store y [bm, bn] (or [bn] for a single row) at rows m_rows, columns n0 + [0, bn)."""
    n_ok = (n0 + _iota(bn)) < n_out
    if m_ok is None:
        pltriton.store(out_ref.at[(*prefix, _ix(m_rows), pl.ds(n0, bn))], y, mask=n_ok)
    else:
        pltriton.store(out_ref.at[(*prefix, m_rows, pl.ds(n0, bn))], y,
                       mask=m_ok[:, None] & n_ok[None, :])


def _load_bias(bias_ref, lead, n0, bn, n_out):
    n_ok = (n0 + _iota(bn)) < n_out
    return pltriton.load(bias_ref.at[(*lead, pl.ds(n0, bn))], mask=n_ok, other=0.0)


# ---------------------------------------------------------------------------------------------
# Plans (static tiling)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tiling of one kernel call.  ``block_k`` counts input elements (a multiple of 32:
    whole quant blocks); ``k_splits`` programs share the K range of each output tile;
    ``prefetch`` (GEMV modes only) issues the next K step's loads before this step's arithmetic
    (:func:`_gemv_loop`); ``swap`` (dot mode of kernels whose :class:`DenseOps` has a
    ``step_dot_t``) computes each tile transposed, ``out^T [bn, bm] += W [bn, bk] . x^T``: on
    Hopper the decoded weight tile is then wgmma's register operand and x streams from shared
    memory, instead of the decoded tile taking a shared-memory round trip and a barrier per step
    (H100, Q8_0 at 64 rows: 21-26 % less time, benchmarks/q8_rows_ablation.py)."""
    mode: str            # "gemv" | "dot" (MoE: "pairs" | "grouped")
    block_m: int
    block_n: int
    block_k: int
    k_splits: int
    num_warps: int
    num_stages: int
    prefetch: bool = False
    swap: bool = False   # "dot" only: out^T = W x^T, the decoded weight tile as the register operand


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _check_plan(p: Plan, fn: str, elems_per_block: int = QK):
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(p, name)
        if name == "block_m" and p.mode == "gemv":
            continue                                    # gemv: all rows, any count
        if not _pow2(v):
            raise ValueError(f"{fn}: {name}={v} must be a power of two")
    if p.block_k % elems_per_block:
        raise ValueError(f"{fn}: block_k={p.block_k} must be a multiple of {elems_per_block}")
    if p.mode == "dot" and (p.block_m < 16 or p.block_n < 16 or p.block_k < 2 * 16):
        raise ValueError(f"{fn}: dot tiles need block_m >= 16, block_n >= 16 and block_k >= 32 "
                         f"(Triton dot minimum 16 per dim), got {p}")
    if p.mode not in ("gemv", "dot"):
        raise ValueError(f"{fn}: mode={p.mode!r}: expected 'gemv' or 'dot'")
    if p.k_splits < 1:
        raise ValueError(f"{fn}: k_splits={p.k_splits} must be >= 1")
    if p.swap and p.mode != "dot":
        raise ValueError(f"{fn}: swap=True needs mode='dot', got {p.mode!r}")


def _split_k(tiles: int, n_k_steps: int) -> int:
    """K splits so that ``tiles * splits`` reaches TARGET_PROGRAMS, each split >= 2 K steps."""
    if tiles >= TARGET_PROGRAMS or n_k_steps < 4:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // tiles), n_k_steps // 2))


def plan_dense(M: int, O: int, I: int, *, mode=None, block_m=None, block_n=None, block_k=None,
               k_splits=None, num_warps=None, num_stages=None, prefetch=None, swap=None,
               swap_ok: bool = False) -> Plan:
    """Default tiling for an ``[M, I] x [O, I]^T`` MXFP4/Q8_0 matmul (any argument overrides).

    gemv (M <= GEMV_MAX_ROWS = 2), small grids (O / 32 < PREFETCH_MAX_PROGRAMS) with no tiling
    asked for: 16 output rows x 512 inputs per step, 8 warps, no split, no prefetch (the H100
    sweep's best, benchmarks/tile_sweep.py).  Otherwise 32 x 256, 4 warps (16 x 1024 for rows of
    >= 2048 inputs on :data:`WIDE_GEMV_CARDS`), software prefetch when the grid is small (the
    prefetch costs ~40 registers and ~13 % more instructions, in SASS).
    dot, decode-sized M (< 64): 16 x 32 x 128, K split up to TARGET_PROGRAMS programs.  dot,
    batch decode (M < 256): 64 x 128 x 64, K split likewise but at most :data:`MAX_SPLITS_BATCH`
    times.  dot, prefill (M >= 256): 128 x 64 x 64 with 8 warps, no split.  Starting points for
    benchmarks/matmul_kernels.py, which sweeps alternatives on the GPU.

    ``swap_ok``: the kernel has a swapped dot step (Q8_0).  Then decode-sized dots (3 <= M <
    256) default to ``swap=True`` with 64 weight rows x ``min(64, pow2 >= M)`` (at least 16) rows
    of x x 128 inputs, 4 warps, K split up to 8 times below 64 rows and 4 times from 64 (H100,
    L2-cold, each with its split-K sum; benchmarks/q8_rows_ablation.py and dense_rows_sweep.py
    --swap): at 64 rows q/k/v 24.2 -> 17.9 µs, attention output 19.0 -> 15.0, vocab head 417.5
    -> 338.7; at 32 rows 25.6 -> 15.9, 21.2 -> 12.5, 620.7 -> 300.8; at 16 rows 17.3 -> 14.0,
    14.8 -> 11.1, 368.5 -> 287.2.
    ``swap=True`` forces it for any dot tiling (``block_n`` then counts weight rows, as always).
    The environment variable ``GPTJAX_SWAP_DOT=0`` (read when a kernel is traced) turns the
    swapped dot off everywhere (A/B timing).
    """
    mode = mode or ("gemv" if M <= GEMV_MAX_ROWS else "dot")
    if swap and not swap_ok:
        raise ValueError("swap=True: this kernel has no swapped dot step")
    if swap is None:
        swap = (swap_ok and mode == "dot" and M < 256
                and all(v is None for v in (block_m, block_n, block_k, num_warps, k_splits)))
    swap = bool(swap)
    small = mode == "gemv" and -(-O // 32) < PREFETCH_MAX_PROGRAMS and k_splits is None
    if small and block_n is None and block_k is None and prefetch is None:
        # Small decode grids (gpt-oss-20b attention: 5120 or 2880 rows): 16 rows x 512 inputs,
        # 8 warps, no split, no software prefetch: fewer, longer steps with more bytes in flight.
        # H100 sweep (benchmarks/tile_sweep.py): Q8_0 5120x2880 10.7 -> 7.9 µs, 2880x4096
        # 10.5 -> 7.3 µs against the 32 x 256 / prefetch plan below.
        d = dict(block_m=M, block_n=16, block_k=512, num_warps=8, num_stages=3)
        k_splits, prefetch = 1, False
    elif mode == "gemv" and I >= 2048 and block_n is None and block_k is None \
            and wide_gemv_card():
        d = dict(block_m=M, block_n=16, block_k=1024, num_warps=4, num_stages=3)
    elif mode == "gemv":
        d = dict(block_m=M, block_n=32, block_k=256, num_warps=4, num_stages=3)
    elif swap and M < 256:
        d = dict(block_m=min(64, max(16, 1 << (M - 1).bit_length())), block_n=64, block_k=128,
                 num_warps=4, num_stages=3)
    elif M < 64:
        d = dict(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=3)
    elif M < 256:
        # Batch decode (64 rows: gpt-oss-20b batch 64), H100 sweep of the Q8_0 kernel
        # (benchmarks/dense_rows_sweep.py): 64 x 128 x 64 and K split (up to MAX_SPLITS_BATCH)
        # for the small attention projections, q/k/v 36.7 -> 24.9 µs, output 48.7 -> 21.7 µs
        # (4 splits, L2-warm); the vocab head (no split) 742 -> 423 µs against 64 x 64 x 64.
        d = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    else:
        d = dict(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)
    for k, v in dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                     num_stages=num_stages).items():
        if v is not None:
            d[k] = int(v)
    if mode == "gemv":
        d["block_m"] = M
    n_steps = -(-I // d["block_k"])
    tiles = -(-M // d["block_m"]) * -(-O // d["block_n"])
    if k_splits is not None:
        s = int(k_splits)
    else:   # decode only: prefill tiles are big enough, and partials would cost a write of M x O
        cap = SWAP_MAX_SPLITS if (swap and M >= 64) else MAX_SPLITS_BATCH
        s = _split_k(tiles, n_steps) if (mode == "gemv" or (M < 64 and not swap)) else \
            min(cap, _split_k(tiles, n_steps)) if M < 256 else 1
    s = -(-n_steps // -(-n_steps // max(1, min(s, n_steps))))      # no empty splits
    if prefetch is None:
        prefetch = mode == "gemv" and tiles * s < PREFETCH_MAX_PROGRAMS
    return Plan(mode, d["block_m"], d["block_n"], d["block_k"], s, d["num_warps"], d["num_stages"],
                bool(prefetch), swap)


#: Static keyword arguments of every public kernel function (and its ``_ref`` twin).
_STATIC = ("mode", "block_m", "block_n", "block_k", "k_splits", "num_warps", "num_stages",
           "prefetch", "interpret")


def _params(p: Plan):
    return pltriton.CompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)


def _finish(y, bias, s: int):
    """Sum split-K partials [S, ..., O] (XLA, fused) and add the bias if not done in-kernel."""
    if s > 1:
        y = y.sum(axis=0)
        if bias is not None:
            y = y + bias
    return y


# ---------------------------------------------------------------------------------------------
# Dense matmul
# ---------------------------------------------------------------------------------------------

class DenseOps(NamedTuple):
    """What differs between the block-quantized dense matmuls (MXFP4 here, Q8_0 in q8_matmul)
    around the one kernel body :func:`_dense_kernel` and wrapper :func:`dense_matmul`:

    * ``step_dot(acc, w, w_refs, x_ref, x_rows, x_ok, row0, bn, g0, gt, cdt, interpret)``: one K
      step of the "dot" mode, returns the float32 accumulator [bm, bn];
    * ``gemv_load(w, w_refs, x_ref, rows, row0, bn, g0, gt, g_end)`` and
      ``gemv_compute(accs, tile)``: one K step of the "gemv" mode (see :func:`_gemv_loop`);
    * ``x_view(x2 [M, I], G)``: the view of x the kernel reads; ``name``: the kernel's name;
    * ``step_dot_t``: the swapped dot step (:class:`Plan` ``swap``), same arguments with x read
      as ``[M, I]`` and the accumulator ``[bn, bm]`` (the tile transposed); None if the kernel has
      none.
    """

    step_dot: Any
    gemv_load: Any
    gemv_compute: Any
    x_view: Any
    name: str
    step_dot_t: Any = None


def _dense_kernel(*refs, w: _W, p: Plan, M: int, has_bias: bool, cdt, interpret: bool,
                  ops: DenseOps):
    """One program per (block of M rows, block of output rows, K split)."""
    n_w = len(w.arrays)
    x_ref, w_refs = refs[0], refs[1:1 + n_w]
    bias_ref = refs[1 + n_w] if has_bias else None
    out_ref = refs[-1]
    i_m, i_n, i_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gt, bn = p.block_k // QK, p.block_n
    steps = cdiv(cdiv(w.G, gt), p.k_splits)                       # K steps per split
    n0 = i_n * bn
    g_first = i_s * (steps * gt)
    prefix = (i_s,) if p.k_splits > 1 else ()
    with_bias = has_bias and p.k_splits == 1

    if p.mode == "dot":
        bm = p.block_m
        m0 = i_m * bm
        m_ok = (m0 + _iota(bm)) < M
        step = ops.step_dot_t if p.swap else ops.step_dot

        def body(t, acc):
            return step(acc, w, w_refs, x_ref, pl.ds(m0, bm), m_ok, n0, bn, g_first + t * gt, gt,
                        cdt, interpret)

        y = lax.fori_loop(0, steps, body, jnp.zeros((bn, bm) if p.swap else (bm, bn), F32))
        if p.swap:
            y = y.T                                                         # [bm, bn]
        if with_bias:
            y = y + _load_bias(bias_ref, (), n0, bn, w.O)[None, :]
        _store_rows(out_ref, prefix, y, pl.ds(m0, bm), m_ok, n0, bn, w.O)
    else:
        rows = tuple(range(M))
        g_end = jnp.minimum(g_first + steps * gt, w.G)                    # this split's blocks

        def load(g0, ge):
            return ops.gemv_load(w, w_refs, x_ref, rows, n0, bn, g0, gt, ge)

        accs = _gemv_loop(load, ops.gemv_compute, tuple(jnp.zeros((bn, gt), F32) for _ in rows),
                          g_first, gt, steps, g_end, p.prefetch)
        b = _load_bias(bias_ref, (), n0, bn, w.O) if with_bias else None
        for r, acc in zip(rows, accs):
            y = jnp.sum(acc, axis=1)
            _store_rows(out_ref, prefix, y + b if b is not None else y, r, None, n0, bn, w.O)


def dense_matmul(x, wp: _W, bias, ops: DenseOps, fn: str, tiling: dict, interpret: bool,
                 partials: bool = False):
    """The body of :func:`mxfp4_matmul` and ``q8_0_matmul``: x [..., I] @ the parsed weight
    ``wp`` [O, I]^T (+ bias [O]) -> float32 [..., O] with the tiling of :func:`plan_dense`
    (``tiling``: its keyword overrides).  ``fn`` names the caller in errors.  ``partials=True``
    (no bias): the K splits' float32 partial products ``[S, ..., O]`` unsummed (S = 1 without a
    split), for a consumer that sums them itself (``y.sum(axis=0)`` is the plain result)."""
    if partials and bias is not None:
        raise ValueError(f"{fn}: partials=True takes no bias (add it where the partials are "
                         f"summed)")
    lead, i = x.shape[:-1], x.shape[-1]
    if i != wp.I:
        raise WeightsError(f"{fn}: x[..., {i}] does not match the weight [O={wp.O}, I={wp.I}]")
    M = math.prod(lead)
    swap_ok = ops.step_dot_t is not None and os.environ.get("GPTJAX_SWAP_DOT", "1") != "0"
    p = plan_dense(M, wp.O, wp.I, **tiling, swap_ok=swap_ok)
    _check_plan(p, fn)
    # GEMV math is float32 anyway; converting x once here (a few KB) saves a conversion per
    # weight in the kernel (each thread would convert its own copy of the broadcast x tile).
    xk = x.astype(F32) if p.mode == "gemv" else x
    args = [xk.reshape(M, i) if p.swap else ops.x_view(xk.reshape(M, i), wp.G), *wp.arrays]
    if bias is not None:
        args.append(jnp.asarray(bias, F32).reshape(wp.O))
    shape = (p.k_splits, M, wp.O) if p.k_splits > 1 else (M, wp.O)
    kernel = functools.partial(_dense_kernel, w=wp.static(), p=p, M=M, has_bias=bias is not None,
                               cdt=x.dtype, interpret=interpret, ops=ops)
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(shape, F32),
                       grid=(cdiv(M, p.block_m), cdiv(wp.O, p.block_n), p.k_splits),
                       compiler_params=_params(p), interpret=interpret, name=ops.name)(*args)
    if partials:
        return y.reshape(p.k_splits, *lead, wp.O)
    y = _finish(y, args[-1] if bias is not None else None, p.k_splits)
    return y.reshape(*lead, wp.O)


def _mxfp4_dense_step_dot(acc, w, w_refs, *args):
    return _mxfp4_step_dot(acc, w, w_refs, (), *args)


def _mxfp4_dense_gemv_load(w, w_refs, *args):
    return _mxfp4_gemv_load(w, w_refs, (), *args)


def byte_view(wp: _W) -> _W:
    """The weight with its code words viewed as bytes ``[..., O, G, 16]`` (a bitcast: XLA does
    not copy it) for the byte-wise dot decode of :func:`_mxfp4_step_dot`."""
    qs, sc = wp.arrays
    return dataclasses.replace(
        wp, arrays=(lax.bitcast_convert_type(qs, jnp.uint8).reshape(*qs.shape[:-1], 16), sc))


#: The MXFP4 pieces of the dense matmul; x is read as [M, G, 32].
MXFP4_OPS = DenseOps(_mxfp4_dense_step_dot, _mxfp4_dense_gemv_load, _mxfp4_gemv_compute,
                     lambda x2, G: x2.reshape(x2.shape[0], G, QK), "mxfp4_matmul")


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_matmul(x, w, bias=None, *, mode=None, block_m=None, block_n=None, block_k=None,
                 k_splits=None, num_warps=None, num_stages=None, prefetch=None, interpret=False):
    """``x [..., I] @ dequant(w)[O, I]^T (+ bias [O])`` -> float32 ``[..., O]``, fused (Pallas).

    x: float32 / bfloat16 / float16 ``[..., I]`` (the compute dtype); w: ggml MXFP4 bytes
    ``uint8[O, I / 32 * 17]`` (or a ``PackedWeight`` of type MXFP4, or :class:`Mxfp4Weights`);
    bias: float ``[O]`` or None.  Tiling (``mode`` "gemv"/"dot", ``block_*``, ``k_splits``,
    ``num_warps``, ``num_stages``) defaults to :func:`plan_dense`; ``interpret=True`` runs the
    kernel in Pallas interpret mode (CPU).  See the module docstring for layouts and numerics.
    """
    tiling = dict(mode=mode, block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits,
                  num_warps=num_warps, num_stages=num_stages, prefetch=prefetch)
    return dense_matmul(x, _parse_weights(w, 0, "mxfp4_matmul"), bias, MXFP4_OPS, "mxfp4_matmul",
                        tiling, interpret)


def _ref_dot(x2, wd):
    """x2 [M, I] . wd [..., O, I]^T in x's dtype, float32 accumulation (IEEE for f32)."""
    if jax.default_backend() == "cpu" and x2.dtype != F32:
        x2, wd = x2.astype(F32), wd.astype(F32)                              # exact, see _dot_nt
    prec = lax.Precision.HIGHEST if x2.dtype == F32 else lax.Precision.DEFAULT
    return jnp.einsum("mi,oi->mo", x2, wd, precision=prec, preferred_element_type=F32)


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_matmul_ref(x, w, bias=None, *, mode=None, block_m=None, block_n=None, block_k=None,
                     k_splits=None, num_warps=None, num_stages=None, prefetch=None,
                     interpret=False):
    """Plain-jnp twin of :func:`mxfp4_matmul` (tiling arguments ignored): decode the whole weight
    exactly (``quant.dequantize_mxfp4``), round to ``x.dtype``, one dot with float32 accumulation.
    """
    del mode, block_m, block_n, block_k, k_splits, num_warps, num_stages, prefetch, interpret
    wp = _parse_weights(w, 0, "mxfp4_matmul_ref")
    lead, i = x.shape[:-1], x.shape[-1]
    if i != wp.I:
        raise WeightsError(f"mxfp4_matmul_ref: x[..., {i}] does not match the weight "
                           f"[O={wp.O}, I={wp.I}]")
    wd = _dense_weights(wp).astype(x.dtype)                                 # [O, I]
    y = _ref_dot(x.reshape(-1, i), wd)
    if bias is not None:
        y = y + jnp.asarray(bias, F32)
    return y.reshape(*lead, wp.O)


# ---------------------------------------------------------------------------------------------
# MoE: only the routed experts' weights
# ---------------------------------------------------------------------------------------------

def _pairs_kernel(*refs, w: _W, p: Plan, k: int, has_bias: bool, cdt):
    """One program per (pair r = (token r // k, slot r % k), block of output rows, K split)."""
    n_w = len(w.arrays)
    x_ref, ids_ref, w_refs = refs[0], refs[1], refs[2:2 + n_w]
    bias_ref = refs[2 + n_w] if has_bias else None
    out_ref = refs[-1]
    r, i_n, i_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = jnp.clip(ids_ref[r], 0, w.lead[0] - 1)                              # expert of the pair
    t = lax.div(r, np.int32(k))
    gt, bn = p.block_k // QK, p.block_n
    steps = cdiv(cdiv(w.G, gt), p.k_splits)
    n0 = i_n * bn
    g_first = i_s * (steps * gt)

    g_end = jnp.minimum(g_first + steps * gt, w.G)
    load = functools.partial(_mxfp4_gemv_load, w, w_refs, (e,), x_ref, (t,), n0, bn, gt=gt)
    (acc,) = _gemv_loop(lambda g0, ge: load(g0=g0, g_end=ge), _mxfp4_gemv_compute,
                        (jnp.zeros((bn, gt), F32),), g_first, gt, steps, g_end, p.prefetch)
    y = jnp.sum(acc, axis=1)
    if has_bias and p.k_splits == 1:
        y = y + _load_bias(bias_ref, (e,), n0, bn, w.O)
    _store_rows(out_ref, (i_s,) if p.k_splits > 1 else (), y, r, None, n0, bn, w.O)


def _grouped_kernel(*refs, w: _W, p: Plan, has_bias: bool, cdt, interpret: bool):
    """One program per (tile of block_m expert-sorted rows of one expert, block of output rows)."""
    n_w = len(w.arrays)
    x_ref, tiles_ref, w_refs = refs[0], refs[1], refs[2:2 + n_w]
    bias_ref = refs[2 + n_w] if has_bias else None
    out_ref = refs[-1]
    i, i_n = pl.program_id(0), pl.program_id(1)
    e = jnp.clip(tiles_ref[0, i], 0, w.lead[0] - 1)
    row0, row_end = tiles_ref[1, i], tiles_ref[2, i]
    gt, bn, bm = p.block_k // QK, p.block_n, p.block_m
    n0 = i_n * bn

    @pl.when(row0 < row_end)
    def _():
        m_ok = (row0 + _iota(bm)) < row_end

        def body(s, acc):
            return _mxfp4_step_dot(acc, w, w_refs, (e,), x_ref, pl.ds(row0, bm), m_ok, n0, bn,
                                   s * gt, gt, cdt, interpret)

        y = lax.fori_loop(0, -(-w.G // gt), body, jnp.zeros((bm, bn), F32))
        if has_bias:
            y = y + _load_bias(bias_ref, (e,), n0, bn, w.O)[None, :]
        _store_rows(out_ref, (), y, pl.ds(row0, bm), m_ok, n0, bn, w.O)


def moe_n_tiles(R: int, n_experts: int, block_m: int) -> int:
    """The static tile count of :func:`moe_tiles` for R routed rows."""
    return max(1, (R + min(n_experts, R) * (block_m - 1)) // block_m)


def moe_tiles(flat_ids, n_experts: int, block_m: int):
    """Group routed rows by expert for the grouped kernel.

    flat_ids: int [R] expert of each routed row.  Returns ``order`` int32 [R] (a stable sort of
    the rows by expert: sorted position -> row) and ``tiles`` int32 [3, n_tiles] = (expert,
    first sorted row, end sorted row) of tiles of at most ``block_m`` rows of one expert; unused
    tiles (the count is a static bound) have first == end.  Bound: each used expert adds at most
    one partial tile, so ``n_tiles = (R + min(E, R) * (block_m - 1)) // block_m``.
    """
    R = flat_ids.shape[0]
    n_tiles = moe_n_tiles(R, n_experts, block_m)
    flat_ids = jnp.clip(flat_ids.astype(jnp.int32), 0, n_experts - 1)
    order = jnp.argsort(flat_ids, stable=True).astype(jnp.int32)
    counts = jnp.bincount(flat_ids, length=n_experts).astype(jnp.int32)    # [E]
    starts = jnp.cumsum(counts) - counts                                    # [E]
    n_t = (counts + block_m - 1) // block_m                                 # tiles per expert
    t_end = jnp.cumsum(n_t)
    t_start = t_end - n_t
    i = jnp.arange(n_tiles, dtype=jnp.int32)
    # expert of tile i = how many experts' tiles end at or before i (``searchsorted(t_end, i,
    # side="right")``, written as one [n_tiles, E] comparison: jnp.searchsorted lowers to a
    # while_loop, and on the GPU every iteration of it waited on a device-to-host copy of its
    # predicate -- 12 host round trips per layer inside the batch-64 decode step)
    e = jnp.sum((t_end[None, :] <= i[:, None]).astype(jnp.int32), axis=1)
    e = jnp.clip(e, 0, n_experts - 1).astype(jnp.int32)
    row0 = starts[e] + (i - t_start[e]) * block_m
    row_end = jnp.minimum(row0 + block_m, starts[e] + counts[e])
    valid = i < t_end[-1]
    row0 = jnp.where(valid, row0, 0)
    row_end = jnp.where(valid, row_end, 0)
    return order, jnp.stack([e, row0, row_end]).astype(jnp.int32)


def inverse_order(order) -> jax.Array:
    """int32 [R]: the sorted position of each routed row, for ``order`` (sorted position ->
    row) a permutation of [0, R)."""
    R = order.shape[0]
    return jnp.zeros((R,), jnp.int32).at[order].set(jnp.arange(R, dtype=jnp.int32))


def moe_block_m(R: int) -> int:
    """Rows per tile of the grouped kernel's default plan for R routed rows (the tiles of
    :func:`moe_tiles` / ``moe_route`` must be cut with the same number): 16 for the byte view's
    few rows per expert, else 64."""
    return 16 if R <= BYTE_VIEW_MAX_ROWS else 64


def plan_moe(T: int, k: int, O: int, I: int, *, mode=None, block_m=None, block_n=None,
             block_k=None, k_splits=None, num_warps=None, num_stages=None,
             prefetch=None) -> Plan:
    """Default tiling of :func:`mxfp4_moe_matmul`.  ``mode`` "pairs" (T*k <= 16 routed rows) or
    "grouped"; pairs: 32 rows x 256 inputs (GEMV math, K split to fill the GPU); grouped: the
    dense prefill tiles with block_m 16 (<= 256 routed rows: few rows per expert) or 64."""
    R = T * k
    mode = mode or ("pairs" if R <= PAIRS_MAX_ROWS else "grouped")
    if mode == "pairs":
        # H100 sweep (benchmarks/tile_sweep.py, gpt-oss-20b, 4 experts of one token): 32 rows x
        # 512 inputs, 4 warps, no split, no prefetch: gate_up [5760, 2880] 25.0 -> 22.8 µs, down
        # [2880, 2880] 13.7 -> 12.4 µs against 32 x 256 with prefetch.
        base = plan_dense(1, O, I, mode="gemv", block_n=block_n or 32, block_k=block_k or 512,
                          k_splits=1, num_warps=num_warps, num_stages=num_stages)
        n_steps = -(-I // base.block_k)
        s = 1 if k_splits is None else int(k_splits)
        s = -(-n_steps // -(-n_steps // max(1, min(s, n_steps))))
        prefetch = False if prefetch is None else prefetch
        return dataclasses.replace(base, mode="pairs", k_splits=s, prefetch=bool(prefetch))
    if mode != "grouped":
        raise ValueError(f"mxfp4_moe_matmul: mode={mode!r}: expected 'pairs' or 'grouped'")
    # H100 sweep (benchmarks/mxfp4_dot_variants.py --grouped-sweep; gate_up [32, 5760, 2880],
    # top-4 random routing): 64 tokens 16 x 128 x 64, 8 warps (byte view, 293 µs); 512 tokens
    # 64 x 128 x 64, 4 warps (words, 604 µs; 801 with the 128 x 64 x 64 of the byte layout).
    # Ninth session, byte view with the PTX decode (mxfp4_dot_variants.py --asm): gate/up [32,
    # 5760, 2880] 16 x 128 x 64 / 8 warps 223 µs (16 x 256: 240); down [32, 2880, 2880] 16 x 256
    # x 64 / 8 warps 129 µs (16 x 128: 139); probably because the narrower output then keeps the
    # grid to about one wave.
    small = R <= BYTE_VIEW_MAX_ROWS                          # the byte view's tiles (see above)
    d = dict(block_n=128 if O > 4096 else 256, block_k=64, num_warps=8) if small \
        else dict(block_n=128, block_k=64, num_warps=4)
    base = plan_dense(max(R, 64), O, I, mode="dot", block_m=block_m or moe_block_m(R),
                      block_n=block_n or d["block_n"], block_k=block_k or d["block_k"], k_splits=1,
                      num_warps=num_warps or d["num_warps"], num_stages=num_stages or 3)
    return dataclasses.replace(base, mode="grouped")


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_moe_matmul(x, w, expert_ids, bias=None, *, mode=None, block_m=None, block_n=None,
                     block_k=None, k_splits=None, num_warps=None, num_stages=None,
                     prefetch=None, interpret=False):
    """Routed expert matmuls: ``y[t, u] = x[t] @ dequant(w[expert_ids[t, u]])^T (+ bias[e])``.

    x: float ``[T, I]``; w: ggml MXFP4 bytes ``uint8[E, O, I / 32 * 17]`` (or a PackedWeight /
    :class:`Mxfp4Weights` with the expert axis first); expert_ids: int ``[T, k]`` (clipped to
    [0, E)); bias: float ``[E, O]`` or None -> float32 ``[T, k, O]``.  Only the routed experts'
    weights are read.  ``mode``: "pairs" (decode; one GEMV per (token, slot)) or "grouped"
    (prefill; rows sorted by expert, tiles of ``block_m`` rows of one expert, tensor-core dots);
    default by :func:`plan_moe`.
    """
    wp = _parse_weights(w, 1, "mxfp4_moe_matmul")
    T, i = x.shape
    if i != wp.I:
        raise WeightsError(f"mxfp4_moe_matmul: x[T, {i}] does not match the experts "
                           f"[E={wp.lead[0]}, O={wp.O}, I={wp.I}]")
    if expert_ids.ndim != 2 or expert_ids.shape[0] != T:
        raise WeightsError(f"mxfp4_moe_matmul: expert_ids must be int [T={T}, k], got "
                           f"{list(expert_ids.shape)}")
    E, k = wp.lead[0], expert_ids.shape[1]
    R = T * k
    p = plan_moe(T, k, wp.O, wp.I, mode=mode, block_m=block_m, block_n=block_n, block_k=block_k,
                 k_splits=k_splits, num_warps=num_warps, num_stages=num_stages,
                 prefetch=prefetch)
    _check_plan(dataclasses.replace(p, mode="gemv" if p.mode == "pairs" else "dot"),
                "mxfp4_moe_matmul")
    b = None if bias is None else jnp.asarray(bias, F32).reshape(E, wp.O)
    flat = expert_ids.reshape(R).astype(jnp.int32)
    if p.mode == "pairs":
        args = [x.astype(F32).reshape(T, wp.G, QK), flat, *wp.arrays]       # f32: see mxfp4_matmul
        args += [b] if b is not None else []
        shape = (p.k_splits, R, wp.O) if p.k_splits > 1 else (R, wp.O)
        kernel = functools.partial(_pairs_kernel, w=wp.static(), p=p, k=k, has_bias=b is not None,
                                   cdt=x.dtype)
        y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(shape, F32),
                           grid=(R, -(-wp.O // p.block_n), p.k_splits),
                           compiler_params=_params(p), interpret=interpret,
                           name="mxfp4_moe_pairs")(*args)
        if p.k_splits > 1:
            y = y.sum(axis=0)
            if b is not None:
                y = y + jnp.take(b, jnp.clip(flat, 0, E - 1), axis=0)
        return y.reshape(T, k, wp.O)
    order, tiles = moe_tiles(flat, E, p.block_m)
    xs = jnp.take(x, order // k, axis=0)                                    # expert-sorted rows
    ys = _grouped_call(xs, tiles, wp, b, p, interpret)
    return jnp.take(ys, inverse_order(order), axis=0).reshape(T, k, wp.O)


def _grouped_call(xs, tiles, wp: _W, b, p: Plan, interpret: bool):
    """The grouped kernel on expert-sorted rows xs [R, I] and their tiles -> float32 [R, O] in
    the same sorted order (rows no tile covers are not written)."""
    R = xs.shape[0]
    if R <= BYTE_VIEW_MAX_ROWS:                                             # byte-wise decode
        xk, wp = xs.reshape(R, wp.G, 4, 2, 2, 2), byte_view(wp)
    else:
        xk = xs.reshape(R, wp.G, QK)
    args = [xk, tiles, *wp.arrays] + ([b] if b is not None else [])
    kernel = functools.partial(_grouped_kernel, w=wp.static(), p=p, has_bias=b is not None,
                               cdt=xs.dtype, interpret=interpret)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((R, wp.O), F32),
                          grid=(tiles.shape[1], -(-wp.O // p.block_n)),
                          compiler_params=_params(p), interpret=interpret,
                          name="mxfp4_moe_grouped")(*args)


def _check_sorted(xs, tiles, wp: _W, fn: str):
    if xs.ndim != 2 or xs.shape[1] != wp.I:
        raise WeightsError(f"{fn}: xs must be [R, {wp.I}] for experts [E={wp.lead[0]}, O={wp.O}, "
                           f"I={wp.I}], got {list(xs.shape)}")
    if tiles.ndim != 2 or tiles.shape[0] != 3:
        raise WeightsError(f"{fn}: tiles must be int [3, n_tiles], got {list(tiles.shape)}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_moe_grouped(xs, w, tiles, bias=None, *, mode=None, block_m=None, block_n=None,
                      block_k=None, k_splits=None, num_warps=None, num_stages=None,
                      prefetch=None, interpret=False):
    """The grouped expert matmul on rows already sorted by expert: ``y[s] = xs[s] @
    dequant(w[e])^T (+ bias[e])`` for every sorted row s of a tile ``(e, row0, row_end)`` of
    ``tiles`` (int ``[3, n_tiles]``, as :func:`moe_tiles` / ``moe_route`` build them with this
    call's ``block_m``) -> float32 ``[R, O]`` in the same sorted order (rows no tile covers are
    left unwritten).  xs: float ``[R, I]``; w, bias as :func:`mxfp4_moe_matmul`.  ``block_m``
    must be the tiles' (default: :func:`plan_moe` for R rows).  Lets a MoE keep its rows sorted
    from the first projection to the second (no un-sort and re-sort in between)."""
    del mode
    wp = _parse_weights(w, 1, "mxfp4_moe_grouped")
    _check_sorted(xs, tiles, wp, "mxfp4_moe_grouped")
    p = plan_moe(xs.shape[0], 1, wp.O, wp.I, mode="grouped", block_m=block_m, block_n=block_n,
                 block_k=block_k, k_splits=k_splits, num_warps=num_warps, num_stages=num_stages,
                 prefetch=prefetch)
    _check_plan(dataclasses.replace(p, mode="dot"), "mxfp4_moe_grouped")
    b = None if bias is None else jnp.asarray(bias, F32).reshape(wp.lead[0], wp.O)
    return _grouped_call(xs, tiles.astype(jnp.int32), wp, b, p, interpret)


def tile_experts(tiles, R: int) -> jax.Array:
    """int32 [R]: the expert of each sorted row under ``tiles`` (0 where no tile covers it)."""
    s = jnp.arange(R, dtype=jnp.int32)[:, None]
    e, row0, row_end = (tiles[i].astype(jnp.int32)[None, :] for i in range(3))
    return jnp.sum(jnp.where((row0 <= s) & (s < row_end), e, 0), axis=1)


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_moe_grouped_ref(xs, w, tiles, bias=None, *, mode=None, block_m=None, block_n=None,
                          block_k=None, k_splits=None, num_warps=None, num_stages=None,
                          prefetch=None, interpret=False):
    """Plain-jnp twin of :func:`mxfp4_moe_grouped` (tiling arguments ignored): each sorted row's
    expert from the tiles, then :func:`mxfp4_moe_matmul_ref` (rows no tile covers: expert 0)."""
    del mode, block_m, block_n, block_k, k_splits, num_warps, num_stages, prefetch, interpret
    wp = _parse_weights(w, 1, "mxfp4_moe_grouped_ref")
    _check_sorted(xs, tiles, wp, "mxfp4_moe_grouped_ref")
    ids = tile_experts(tiles, xs.shape[0])[:, None]
    return mxfp4_moe_matmul_ref(xs, w, ids, bias)[:, 0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def mxfp4_moe_matmul_ref(x, w, expert_ids, bias=None, *, mode=None, block_m=None, block_n=None,
                         block_k=None, k_splits=None, num_warps=None, num_stages=None,
                         prefetch=None, interpret=False):
    """Plain-jnp twin of :func:`mxfp4_moe_matmul`: gather the routed experts' bytes, decode them
    exactly, one batched dot per (token, slot).  Tiling arguments are ignored."""
    del mode, block_m, block_n, block_k, k_splits, num_warps, num_stages, prefetch, interpret
    wp = _parse_weights(w, 1, "mxfp4_moe_matmul_ref")
    T, i = x.shape
    if i != wp.I:
        raise WeightsError(f"mxfp4_moe_matmul_ref: x[T, {i}] does not match the experts "
                           f"[E={wp.lead[0]}, O={wp.O}, I={wp.I}]")
    ids = jnp.clip(expert_ids.astype(jnp.int32), 0, wp.lead[0] - 1)        # [T, k]
    sel = _W(wp.layout, tuple(jnp.take(a, ids, axis=0) for a in wp.arrays), ids.shape, wp.O, wp.G)
    wd = _dense_weights(sel).astype(x.dtype)                                # [T, k, O, I]
    xc, wc = x, wd
    if jax.default_backend() == "cpu" and x.dtype != F32:
        xc, wc = x.astype(F32), wd.astype(F32)
    prec = lax.Precision.HIGHEST if xc.dtype == F32 else lax.Precision.DEFAULT
    y = jnp.einsum("ti,tuoi->tuo", xc, wc, precision=prec, preferred_element_type=F32)
    if bias is not None:
        y = y + jnp.take(jnp.asarray(bias, F32), ids, axis=0)
    return y
