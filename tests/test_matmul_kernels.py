"""MXFP4 / Q8_0 matmul kernels (pallas_kernels/mxfp4_matmul.py, q8_matmul.py) and their twins.

Oracle: ``gguf.quants.dequantize`` (numpy) for the weights, float64 numpy for the products.

Layers of checks:
* the in-register decoders, exhaustively: every MXFP4 code byte under every scale byte and every
  Q8_0 quant byte under awkward f16 scales, against gguf.quants (bitwise, except that MXFP4 code
  8 decodes to -0.0 where ggml's int8 table gives +0: equal as numbers);
* the same through the kernels: x = identity rows make ``y = w^T`` exactly, so the kernel output
  is compared bit for bit with the oracle's weights (dot and GEMV modes, both weight layouts);
* matmuls against float64 with elementwise error bounds (below), on shapes that hit the edges:
  1, 3, 16 and 69 rows (69: a ragged row tile), output sizes that are not multiples of the tile,
  I = 64, 96 (a ragged K tile), 2880 (gpt-oss), bias on/off, forced split-K, float32 and bfloat16;
* each kernel against its ``_ref`` twin; MoE with repeated experts, k = 2 and 4, both modes; the
  grouping table of the grouped MoE mode as literal arrays; the Q8_0 embedding bit-exactly;
* the same kernel cases on a GPU (``-m gpu``; skipped without one).

Tolerances (elementwise, named).  Let ``mag = |x| @ |w|^T + |b|`` (float64, exact weights).
* float32 x: ``|y - ref| <= (I + 2) * 2^-24 * mag`` (Higham's dot-product bound, any summation
  order, plus the bias add).  Weights are decoded exactly (MXFP4 values have <= 2 significant
  bits, Q8_0 ``q * d`` <= 19), so a wrong nibble, scale or row is off by O(|w|) and fails.
* bfloat16 x (exact bf16 inputs; the oracle uses the same rounded x): dot mode rounds each Q8_0
  weight once to bf16 (as the XLA reference path does), GEMV does not; MXFP4 weights are exact in
  bf16.  Bound ``(2^-8 + (I + 2) 2^-24) * mag``: one bf16 rounding (2^-9) of every weight with
  margin, plus float32 accumulation.
"""
from __future__ import annotations

import warnings

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gptjax.errors import WeightsError
from gptjax.packed import PackedWeight
from pallas_kernels import mxfp4_matmul as mx
from pallas_kernels import q8_matmul as q8
from kernel_modes import HAS_GPU, MODES

U32 = 2.0 ** -24
BF16_WEIGHT_ROUNDING = 2.0 ** -8



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def oracle(raw, t) -> np.ndarray:
    """gguf-py's dequantization of uint8 [..., row_bytes] as float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf.quants.dequantize(np.asarray(raw), t).astype(np.float64)


def mxfp4_bytes(rng, shape, e_lo=118, e_hi=130):
    """ggml MXFP4 bytes [*lead, O, G*17]: random codes, scale bytes e_lo..e_hi."""
    *lead, o, i = shape
    b = rng.integers(0, 256, size=(*lead, o, i // 32, 17), dtype=np.uint8)
    b[..., 0] = rng.integers(e_lo, e_hi + 1, size=b.shape[:-1])
    return b.reshape(*lead, o, i // 32 * 17)


def q8_bytes(rng, shape):
    """ggml Q8_0 bytes [O, G*34]: random quants, f16 scales +-2^-12..2^-5, some zero/subnormal."""
    o, i = shape
    b = rng.integers(0, 256, size=(o, i // 32, 34), dtype=np.uint8)
    n = o * (i // 32)
    d = rng.uniform(1, 2, n) * 2.0 ** rng.integers(-12, -4, n) * rng.choice([-1, 1], n)
    d = d.astype(np.float16)
    d[::7] = 0
    d[3::11] = np.uint16(1).view(np.float16)                  # smallest f16 subnormal
    b[..., 0:2] = d.astype("<f2").view(np.uint8).reshape(o, i // 32, 2)
    return b.reshape(o, i // 32 * 34)


def check_bound(y, x64, w64, b64, tol_rel):
    """Elementwise |y - (x w^T + b)| <= tol_rel * (|x| |w|^T + |b|); returns the worst ratio."""
    y = np.asarray(y, np.float64)
    ref = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    if b64 is not None:
        ref, mag = ref + b64, mag + np.abs(b64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    bound = tol_rel * mag + 1e-300
    ratio = np.abs(y - ref) / bound
    worst = np.unravel_index(np.argmax(ratio), ratio.shape)
    assert np.all(ratio <= 1), (
        f"|err| {np.abs(y - ref)[worst]:.3e} > bound {bound[worst]:.3e} at {worst}")
    return float(ratio.max())


def tol(dtype, i):
    base = (i + 2) * U32
    return base if dtype == jnp.float32 else BF16_WEIGHT_ROUNDING + base


def as_x(rng, shape, dtype):
    """Random x in dtype, and the same values as float64."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == jnp.bfloat16:
        x = x.astype(ml_dtypes.bfloat16)
    return jnp.asarray(x), np.asarray(x).astype(np.float64)


def same_numbers_and_bits(a, b):
    """a == b as numbers everywhere (NaN-free), and bitwise wherever nonzero (signed zeros may
    differ: MXFP4 code 8)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    nz = b != 0
    np.testing.assert_array_equal(a.view(np.uint32)[nz], b.view(np.uint32)[nz])


# ---------------------------------------------------------------------------------------------
# Exact decoders (plain jnp, as used inside the kernels)
# ---------------------------------------------------------------------------------------------

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


def test_fp4_kvalues_table():
    got = np.asarray(mx.fp4_kvalues(jnp.arange(16, dtype=jnp.uint8)))
    np.testing.assert_array_equal(got, KVALUES)                 # literal ggml kvalues_mxfp4
    assert np.signbit(got[8]) and not np.signbit(got[0])       # code 8 is -0.0 (documented)


def test_mxfp4_decode_every_code_and_scale():
    """All 256 code bytes x scale bytes 2..255 vs gguf.quants: bitwise (up to the sign of 0)."""
    e = np.arange(2, 256, dtype=np.uint8)
    blocks = np.zeros((e.size, 16, 17), np.uint8)               # [scale, block-in-scale, bytes]
    blocks[..., 0] = e[:, None]
    blocks[..., 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    want = oracle(blocks.reshape(e.size, -1), T.MXFP4).astype(np.float32)   # [254, 512]
    r = mx.repack_mxfp4(blocks.reshape(e.size, -1))            # words [254, 16, 4]
    got = np.asarray(jax.jit(mx._decode_words)(jnp.asarray(r.qs), jnp.asarray(r.scales)))
    got = got.reshape(e.size, -1)                                # [254, 16, 32] -> [254, 512]
    with np.errstate(invalid="ignore"):
        same_numbers_and_bits(got, want)
    assert np.isinf(want).any()                                  # e = 254, 255 overflow like ggml


def test_mxfp4_decode_denormal_scales_flush_or_exact():
    """e = 0, 1 give ggml denormals (<= 12 * 2^-127); a flush-to-zero multiply may give 0."""
    blocks = np.zeros((2, 17), np.uint8)
    blocks[:, 0] = [0, 1]
    blocks[:, 1:] = np.arange(16, dtype=np.uint8) * 17            # all codes in both nibbles
    want = oracle(blocks, T.MXFP4).astype(np.float32)
    r = mx.repack_mxfp4(blocks)
    got = np.asarray(mx._decode_words(jnp.asarray(r.qs), jnp.asarray(r.scales))).reshape(2, 32)
    assert np.all((got == want) | (got == 0)) and np.abs(want).max() <= 12 * 2.0 ** -127


def _run_ptx(asm: str, regs: dict) -> dict:
    """A tiny interpreter for the PTX subset of ``mx._NIBBLE_BF16_ASM`` and ``q8._Q8_BF16_ASMS``
    (prmt.b32 default mode, and/xor/mov.b32, mul.lo.u32, mul.rn.bf16x2 and cvt.rn.bf16x2.f32 with
    round-to-nearest-even, fma.rn.f32 where the sum is exact in float64), on numpy uint32 arrays.
    ``regs`` maps "$n" to inputs; returns every register after the run."""
    regs = dict(regs)

    def val(a):
        return regs[a] if a in regs else np.uint32(int(a, 0))

    def bf16x2(v):
        lanes = [(v & 0xFFFF).astype(np.uint16), (v >> 16).astype(np.uint16)]
        return [lane.view(ml_dtypes.bfloat16).astype(np.float32) for lane in lanes]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." :
            continue
        op, rest = line.split(None, 1)
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            src = [(val(a[0]) >> (8 * i)) & 0xFF for i in range(4)] + \
                  [(val(a[1]) >> (8 * i)) & 0xFF for i in range(4)]
            sel = int(a[2], 0)
            out = np.zeros_like(val(a[0]))
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                assert nib < 8                                   # no sign-replicate selectors
                out = out | (src[nib] << (8 * i)).astype(np.uint32)
            regs[d] = out.astype(np.uint32)
        elif op == "and.b32":
            regs[d] = (val(a[0]) & val(a[1])).astype(np.uint32)
        elif op == "mul.lo.u32":
            regs[d] = (val(a[0]).astype(np.uint64) * val(a[1])).astype(np.uint32)
        elif op == "xor.b32":
            regs[d] = (val(a[0]) ^ val(a[1])).astype(np.uint32)
        elif op == "mov.b32":
            regs[d] = val(a[0])
        elif op == "fma.rn.f32":
            # products of float32 values are exact in float64; the interpreter only takes sums
            # that are exact there too (checked), so the one rounding to float32 is the fma's
            x, y, z = (np.asarray(val(r), np.uint32).view(np.float32).astype(np.float64)
                       for r in a)
            p = x * y
            s = p + z
            assert np.array_equal(s - p, z) and np.array_equal(s - z, p), "inexact fma sum"
            regs[d] = s.astype(np.float32).view(np.uint32)
        elif op == "cvt.rn.bf16x2.f32":
            # d = (bf16(a) << 16) | bf16(b), each rounded to nearest even
            hi, lo = (np.asarray(val(r), np.uint32).view(np.float32).astype(ml_dtypes.bfloat16)
                      .view(np.uint16).astype(np.uint32) for r in a)
            regs[d] = (lo | (hi << 16)).astype(np.uint32)
        elif op == "mul.rn.bf16x2":
            # products of bf16 values are exact in float32; one rounding to bf16 (RNE)
            lo, hi = (x * y for x, y in zip(bf16x2(val(a[0])), bf16x2(val(a[1]))))
            lo, hi = (v.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
                      for v in (lo, hi))
            regs[d] = (lo | (hi << 16)).astype(np.uint32)
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return regs


def _pack_bytes(b, pack: int = 4):
    """uint [pack n] byte values -> n b32 operands, ``pack`` per operand (element 0 in the low
    byte; pack 2 leaves the upper half zero), as Triton packs a uint8 operand."""
    return (b.astype(np.uint32).reshape(-1, pack) << np.arange(0, 8 * pack, 8, dtype=np.uint32)
            ).sum(1, dtype=np.uint32)


def _bf16_results(r, n_out: int = 2):
    """The b32 results $0 .. $(n_out - 1) of a bf16 asm, two bf16 each (element 0 in the low
    half) -> float32 [2 n_out n] in element order."""
    bits = np.stack([h for i in range(n_out) for h in (r[f"${i}"] & 0xFFFF, r[f"${i}"] >> 16)], 1)
    return bits.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32).reshape(-1)


@pytest.mark.parametrize("one", [False, True], ids=["two-factors", "one-factor"])
def test_byte_decode_ptx_every_code_and_scale(one):
    """The inline-PTX byte decode of the grouped kernel (``mx._NIBBLE_BF16_ASM``), run by an
    interpreter of its instructions on Triton's operand packing (pack=4: four code bytes in one
    b32, bf16 operands two per b32, element 0 in the low half), for all 256 code bytes under
    every scale byte and both nibbles, against gguf.quants: bitwise (up to the sign of 0),
    including the denormal results of scale bytes 0 and 1 and the overflow of 254 / 255.  The
    one-factor variant (a weight whose ``scale_max`` is <= 128) on scale bytes 0..128.  (The GPU
    identity tests run the real thing.)"""
    n_e = 129 if one else 256
    idx = np.arange(n_e * 256, dtype=np.uint32)
    e, code = idx % n_e, idx // n_e         # scale, code byte per element (scales vary in a pack)
    blocks = np.zeros((n_e, 16, 17), np.uint8)                  # want: element j of a block is
    blocks[..., 0] = np.arange(n_e, dtype=np.uint8)[:, None]   # the low nibble of byte j,
    blocks[..., 1:] = np.arange(256, dtype=np.uint8).reshape(16, 16)   # j + 16 the high nibble
    want = oracle(blocks.reshape(n_e, -1), T.MXFP4).reshape(n_e, 16, 32).astype(np.float32)
    want = [want[..., :16].reshape(n_e, 256)[e, code], want[..., 16:].reshape(n_e, 256)[e, code]]
    f1, f2 = (np.asarray(f).view(np.uint16).astype(np.uint32)
              for f in mx._byte_asm_factors(jnp.asarray(e, jnp.uint8)))
    g = lambda a: a.reshape(-1, 4)                                # packs of four elements
    pair = lambda a, i: g(a)[:, 2 * i] | (g(a)[:, 2 * i + 1] << 16)
    packed = {"$2": _pack_bytes(code), "$3": pair(f1, 0), "$4": pair(f1, 1)}
    if not one:
        packed |= {"$5": pair(f2, 0), "$6": pair(f2, 1)}
    asms = mx._NIBBLE_BF16_ASM[one]
    assert len(asms) == 2
    for half, asm in enumerate(asms):
        same_numbers_and_bits(_bf16_results(_run_ptx(asm, packed)), want[half])
    assert (np.abs(want[0][want[0] != 0]) < 2.0 ** -126).any()   # denormal results covered
    assert one or np.isinf(want[0]).any()                          # and overflow


@pytest.mark.parametrize("pack", [4, 2], ids=["dot-pack4", "swapped-dot-pack2"])
def test_q8_decode_ptx_every_byte_and_scale(pack):
    """The inline-PTX Q8_0 decodes (``q8._Q8_BF16_ASMS``: four bytes per call in the dot, two in
    the swapped dot), run by the interpreter on Triton's operand packing (``pack`` quant bytes in
    one b32, the scale operands one float32 register per element, bf16 results two per b32,
    element 0 low), for all 256 quant bytes under every 16th f16 scale pattern (and the extremes:
    +-0, subnormals, +-65504), against gguf.quants rounded to bf16: bitwise (up to the sign of
    0).  (The GPU identity tests run the real thing.)"""
    u16 = np.concatenate([np.arange(0, 0x7C00, 16), np.arange(0x8000, 0xFC00, 16),
                          [1, 0x3FF, 0x7BFF, 0x8001, 0xFBFF]]).astype(np.uint16)
    u16 = u16[np.isfinite(u16.view(np.float16))]
    u16 = u16[:len(u16) // 2 * 2]
    n_d = len(u16)                                          # even: n_d + 1 is prime to 256, so
    idx = np.arange(n_d * 256, dtype=np.int64)              # (di, qb) runs over every pair, and
    di = idx % n_d                                          # both vary inside a pack
    qb = (idx // n_d * (n_d + 1) + di) % 256
    assert len(set(zip(di.tolist(), qb.tolist()))) == n_d * 256
    raw = np.zeros((n_d, 256 // 32, 34), np.uint8)
    raw[..., :2] = u16.astype("<u2").view(np.uint8).reshape(n_d, 1, 2)
    raw[..., 2:] = np.arange(256, dtype=np.uint8).reshape(8, 32)
    want = oracle(raw.reshape(n_d, -1), T.Q8_0).reshape(n_d, 256)[di, qb]
    want = want.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    d = u16.view(np.float16).astype(np.float32)[di]
    n_out = pack // 2                                       # b32 results: two bf16 each
    packed = {f"${n_out}": _pack_bytes(qb, pack)}
    for i in range(pack):
        packed[f"${n_out + 1 + i}"] = d.reshape(-1, pack)[:, i].view(np.uint32)
        packed[f"${n_out + 1 + pack + i}"] = \
            (d * q8._Q8_OFFSET).reshape(-1, pack)[:, i].view(np.uint32)
    asm = q8._Q8_BF16_ASMS[pack][0]
    same_numbers_and_bits(_bf16_results(_run_ptx(asm, packed), n_out), want)
    assert (want != 0).mean() > 0.9 and np.isclose(np.abs(want).max(), 128 * 65504, rtol=1e-2)


def test_e8m0_half_every_byte():
    e = np.arange(256, dtype=np.uint8)
    got = np.asarray(mx.e8m0_half(jnp.asarray(e))).view(np.uint32)
    want = np.where(e < 2, np.uint32(0x00200000) << e.astype(np.uint32),
                    (e.astype(np.uint32) - 1) << 23)             # ggml_e8m0_to_fp32_half
    np.testing.assert_array_equal(got, want)


def test_q8_values_every_byte():
    b = np.arange(256, dtype=np.uint8)
    got = np.asarray(q8.q8_values(jnp.asarray(b)))
    np.testing.assert_array_equal(got, b.view(np.int8).astype(np.float32))


def test_repack_roundtrip_and_exact():
    rng = np.random.default_rng(1)
    raw = mxfp4_bytes(rng, (3, 5, 64), 0, 255)
    r = mx.repack_mxfp4(raw)
    assert r.qs.shape == (3, 5, 2, 4) and r.qs.dtype == np.uint32 and r.scales.shape == (3, 5, 2)
    np.testing.assert_array_equal(mx.unpack_mxfp4(r), raw)
    np.testing.assert_array_equal(r.scales, raw.reshape(3, 5, 2, 17)[..., 0])
    # the documented nibble positions, against the file's codes (element j: low nibble of byte
    # j, element j + 16: high nibble)
    b = raw.reshape(3, 5, 2, 17)[..., 1:]
    codes = np.concatenate([b & 15, b >> 4], axis=-1)             # [3, 5, 2, 32] by element
    for el in (0, 1, 5, 6, 9, 16, 23, 31):
        q, lane, s1, s2 = el // 8, (el // 4) % 2, (el // 2) % 2, el % 2
        np.testing.assert_array_equal((r.qs[..., q] >> mx.NIBBLE_SHIFTS[lane, s1, s2]) & 15,
                                      codes[..., el])
    np.testing.assert_array_equal(np.asarray(mx.unpack_mxfp4(mx.repack_mxfp4(jnp.asarray(raw)))),
                                  raw)
    rq = q8_bytes(rng, (7, 96))
    r8 = q8.repack_q8_0(rq)
    assert r8.qs.shape == (7, 3, 32) and r8.scales.dtype == np.float16
    np.testing.assert_array_equal(q8.unpack_q8_0(r8), rq)
    np.testing.assert_array_equal(np.asarray(q8.unpack_q8_0(q8.repack_q8_0(jnp.asarray(rq)))), rq)
    # the repacked scales are the ggml f16 fields
    np.testing.assert_array_equal(r8.scales.astype(np.float64)[..., None] * r8.qs.view(np.int8),
                                  oracle(rq, T.Q8_0).reshape(7, 3, 32))


# ---------------------------------------------------------------------------------------------
# Through the kernels: identity x -> exact weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("layout", ["ggml", "split"])
def test_mxfp4_kernel_identity_is_exact(layout, interpret):
    """x = I: the dot kernel returns w^T exactly (one nonzero product per output): every code
    byte under every scale byte 2..252, through loads, masks and the in-register decode.  (Scale
    bytes >= 253 overflow some weights to inf, and 0 * inf = NaN would spread along the row.)"""
    e = np.resize(np.arange(2, 253, dtype=np.uint8), 252)      # 251 scales, one repeated
    blocks = np.zeros((126, 2, 17), np.uint8)                   # O = 126 (ragged), I = 64
    blocks[..., 0] = e.reshape(126, 2)
    blocks[..., 1:] = np.resize(np.arange(256, dtype=np.uint8), (126, 2, 16))
    raw = blocks.reshape(126, 34)
    want = oracle(raw, T.MXFP4).astype(np.float32)              # [126, 64]
    w = mx.repack_mxfp4(jnp.asarray(raw)) if layout == "split" else jnp.asarray(raw)
    y = mx.mxfp4_matmul(jnp.eye(64, dtype=jnp.float32), w, interpret=interpret)
    same_numbers_and_bits(np.asarray(y).T, want)
    # GEMV mode (block sums, then the block scale): one-hot rows, 4 at a time
    f = jax.jit(lambda xx: mx.mxfp4_matmul(xx, w, mode="gemv", interpret=interpret))
    cols = [0, 17, 31, 32, 40, 63]
    y = np.concatenate([np.asarray(f(jnp.eye(64, dtype=jnp.float32)[c][None])) for c in cols])
    same_numbers_and_bits(y, want[:, cols].T)


@pytest.mark.parametrize("asm", [False, True], ids=["jnp-decode", "asm-decode"])
@pytest.mark.parametrize("interpret", MODES)
def test_mxfp4_bf16_dots_identity_is_exact(interpret, asm, monkeypatch):
    """bf16 x = I through the bf16 tensor-core dots (weights decoded, then rounded to bf16): the
    dense dot mode (word decode) and the grouped MoE mode with few routed rows (byte view of the
    words) return every code byte under every scale byte 2..252 exactly (MXFP4 weights are exact
    in bf16).  The float32 identity test above does not reach these bf16 paths.  ``asm``: the
    grouped mode's inline-PTX byte decode (GPU only; interpret mode takes the jnp decode)."""
    monkeypatch.setattr(mx, "ASM_BYTE_DECODE", asm)
    jax.clear_caches()                                           # the switch is read when traced
    e = np.resize(np.arange(2, 253, dtype=np.uint8), 252)
    blocks = np.zeros((126, 2, 17), np.uint8)                   # O = 126, I = 64
    blocks[..., 0] = e.reshape(126, 2)
    blocks[..., 1:] = np.resize(np.arange(256, dtype=np.uint8), (126, 2, 16))
    raw = blocks.reshape(126, 34)
    want = oracle(raw, T.MXFP4).astype(np.float32)              # [126, 64]
    w = mx.repack_mxfp4(jnp.asarray(raw))
    eye = jnp.eye(64, dtype=jnp.bfloat16)
    y = mx.mxfp4_matmul(eye, w, mode="dot", interpret=interpret)
    same_numbers_and_bits(np.asarray(y).T, want)
    we = mx.Mxfp4Weights(w.qs[None], w.scales[None])             # one expert
    y = mx.mxfp4_moe_matmul(eye, we, jnp.zeros((64, 1), jnp.int32), interpret=interpret)
    same_numbers_and_bits(np.asarray(y)[:, 0].T, want)
    # a PackedWeight with scale_max <= 128 (scale bytes 2..128 here): the one-factor decode
    narrow = raw.reshape(126, 2, 17).copy()
    narrow[..., 0] = np.minimum(narrow[..., 0], 128)
    narrow = narrow.reshape(1, 126, 34)
    pw = PackedWeight.from_bytes(narrow, T.MXFP4, (1, 126, 64)).to_kernel_layout()
    assert pw.scale_max == 128
    y = mx.mxfp4_moe_matmul(eye, pw, jnp.zeros((64, 1), jnp.int32), interpret=interpret)
    same_numbers_and_bits(np.asarray(y)[:, 0].T, oracle(narrow[0], T.MXFP4).astype(np.float32))


@pytest.mark.parametrize("swap", [False, True], ids=["dot", "swapped-dot"])
@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("layout", ["ggml", "split"])
def test_q8_kernel_identity_is_exact(layout, interpret, swap):
    """x = I: every quant byte under scales 0, +-subnormal, +-65504, random.  Exact as numbers;
    bitwise except zeros (a sum of products gives +0 where q * (-d) alone is -0).  ``swap``: the
    64-row dot computes its tiles transposed (``Plan.swap``)."""
    rng = np.random.default_rng(2)
    raw = q8_bytes(rng, (40, 64)).reshape(40, 2, 34)
    raw[:, :, 2:] = np.resize(np.arange(256, dtype=np.uint8), (40, 2, 32))
    special = np.array([0, 1, 0x8001, 0x7BFF, 0xFBFF, 0x0400], np.uint16)   # f16 bit patterns
    raw[:6, 0, 0:2] = special.astype("<u2").view(np.uint8).reshape(6, 2)
    raw = raw.reshape(40, 68)
    want = oracle(raw, T.Q8_0).astype(np.float32)
    w = q8.repack_q8_0(jnp.asarray(raw)) if layout == "split" else jnp.asarray(raw)
    y = q8.q8_0_matmul(jnp.eye(64, dtype=jnp.float32), w, swap=swap, interpret=interpret)
    same_numbers_and_bits(np.asarray(y).T, want)
    f = jax.jit(lambda xx: q8.q8_0_matmul(xx, w, mode="gemv", interpret=interpret))
    for c in (0, 33, 63):
        same_numbers_and_bits(f(jnp.eye(64, dtype=jnp.float32)[c][None])[0], want[:, c])


@pytest.mark.parametrize("swap", [False, True], ids=["dot", "swapped-dot"])
@pytest.mark.parametrize("asm", [False, True], ids=["jnp-decode", "asm-decode"])
@pytest.mark.parametrize("interpret", MODES)
def test_q8_bf16_dot_identity_is_exact(interpret, asm, swap, monkeypatch):
    """bf16 x = I through the dot mode's bf16 tensor-core dots: each weight ``q * d`` rounded once
    to bf16 (as the XLA reference path), every quant byte under the special and random scales,
    bitwise against gguf.quants rounded to bf16.  ``asm``: the inline-PTX decode (GPU only;
    interpret mode takes the jnp decode; four bytes per asm call, two in the swapped dot)."""
    monkeypatch.setattr(q8, "ASM_Q8_DECODE", asm)
    jax.clear_caches()                                           # the switch is read when traced
    rng = np.random.default_rng(3)
    raw = q8_bytes(rng, (40, 64)).reshape(40, 2, 34)
    raw[:, :, 2:] = np.resize(np.arange(256, dtype=np.uint8), (40, 2, 32))
    special = np.array([0, 1, 0x8001, 0x7BFF, 0xFBFF, 0x0400, 0x3C01, 0xBC03], np.uint16)
    raw[:8, 0, 0:2] = special.astype("<u2").view(np.uint8).reshape(8, 2)
    raw = raw.reshape(40, 68)
    want = oracle(raw, T.Q8_0).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    for layout in ("ggml", "split"):
        w = q8.repack_q8_0(jnp.asarray(raw)) if layout == "split" else jnp.asarray(raw)
        y = q8.q8_0_matmul(jnp.eye(64, dtype=jnp.bfloat16), w, mode="dot", swap=swap,
                           interpret=interpret)
        same_numbers_and_bits(np.asarray(y).T, want)


# ---------------------------------------------------------------------------------------------
# Matmuls vs float64
# ---------------------------------------------------------------------------------------------

# (M rows, O, I, dtype, layout, bias, extra kwargs)
DENSE_CASES = [
    (1, 40, 96, jnp.float32, "ggml", True, {}),                  # GEMV, ragged O and K tiles
    (3, 72, 64, jnp.bfloat16, "split", False, {"mode": "gemv", "prefetch": False}),  # 3-row GEMV
    (3, 40, 64, jnp.float32, "ggml", True, {}),                  # 3 rows: decode-sized dot
    (16, 40, 96, jnp.float32, "split", True, {}),                # decode-sized dot
    (69, 72, 96, jnp.bfloat16, "ggml", True, {}),                # prefill dot, ragged rows
    (2, 48, 256, jnp.float32, "split", True, {"k_splits": 3, "block_k": 64}),   # split-K GEMV
    (20, 48, 256, jnp.bfloat16, "ggml", False, {"k_splits": 2, "block_k": 32}),  # split-K dot
    (1, 24, 2880, jnp.bfloat16, "split", True, {}),              # gpt-oss row length
    (1, 40, 2080, jnp.bfloat16, "ggml", True, {"block_n": 16, "block_k": 1024}),  # wide GEMV
]


def _case_id(c):
    m, o, i, dt, lay, b, kw = c
    return f"M{m}-O{o}-I{i}-{jnp.dtype(dt).name}-{lay}-{'bias' if b else 'nobias'}" + \
        "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
def test_mxfp4_matmul_vs_float64(case, interpret):
    m, o, i, dtype, layout, with_bias, kw = case
    rng = np.random.default_rng(m * 1000 + o + i)
    raw = mxfp4_bytes(rng, (o, i))
    w64 = oracle(raw, T.MXFP4)
    x, x64 = as_x(rng, (m, i), dtype)
    b = rng.standard_normal(o).astype(np.float32) if with_bias else None
    w = mx.repack_mxfp4(raw) if layout == "split" else jnp.asarray(raw)
    y = mx.mxfp4_matmul(x, w, None if b is None else jnp.asarray(b), interpret=interpret, **kw)
    assert y.dtype == jnp.float32 and y.shape == (m, o)
    b64 = None if b is None else b.astype(np.float64)
    check_bound(y, x64, w64, b64, tol(dtype, i))
    y_ref = mx.mxfp4_matmul_ref(x, w, None if b is None else jnp.asarray(b), **kw)
    check_bound(y_ref, x64, w64, b64, tol(dtype, i))


# Q8_0 only: the swapped dot (Plan.swap), the default from 64 to 255 rows
Q8_SWAP_CASES = [
    (64, 72, 96, jnp.bfloat16, "ggml", True, {}),                # default plan: swapped, ragged O
    (100, 200, 320, jnp.float32, "split", False, {}),            # two row tiles, IEEE f32 dots
    (70, 40, 4096, jnp.bfloat16, "split", True, {"swap": True, "k_splits": 3}),  # split-K
    (16, 40, 96, jnp.bfloat16, "split", True, {"swap": True, "block_m": 16}),    # forced, 16 rows
    (5, 130, 256, jnp.bfloat16, "ggml", False, {}),              # default plan: swapped, 5 rows
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", DENSE_CASES[:7] + DENSE_CASES[-1:] + Q8_SWAP_CASES, ids=_case_id)
def test_q8_matmul_vs_float64(case, interpret):
    m, o, i, dtype, layout, with_bias, kw = case
    rng = np.random.default_rng(m * 1000 + o + i + 7)
    raw = q8_bytes(rng, (o, i))
    w64 = oracle(raw, T.Q8_0)
    x, x64 = as_x(rng, (m, i), dtype)
    b = rng.standard_normal(o).astype(np.float32) if with_bias else None
    w = q8.repack_q8_0(raw) if layout == "split" else jnp.asarray(raw)
    y = q8.q8_0_matmul(x, w, None if b is None else jnp.asarray(b), interpret=interpret, **kw)
    assert y.dtype == jnp.float32 and y.shape == (m, o)
    b64 = None if b is None else b.astype(np.float64)
    check_bound(y, x64, w64, b64, tol(dtype, i))
    check_bound(q8.q8_0_matmul_ref(x, w, None if b is None else jnp.asarray(b)), x64, w64, b64,
                tol(dtype, i))


def test_kernel_matches_ref_leading_axes_and_packed_weight():
    """x with leading axes [B, T, I]; w given as a PackedWeight; kernel vs _ref twin."""
    rng = np.random.default_rng(5)
    raw = mxfp4_bytes(rng, (40, 64))
    pw = PackedWeight.from_bytes(raw, T.MXFP4, (40, 64))
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    y = mx.mxfp4_matmul(x, pw, interpret=True)
    yr = mx.mxfp4_matmul_ref(x, pw)
    assert y.shape == (2, 3, 40)
    np.testing.assert_allclose(np.asarray(y), np.asarray(yr), rtol=0, atol=66 * U32 * float(
        np.abs(np.asarray(x)).max() * np.abs(oracle(raw, T.MXFP4)).sum(1).max()))
    with pytest.raises(WeightsError, match="expected MXFP4"):
        mx.mxfp4_matmul(x, PackedWeight.from_bytes(q8_bytes(rng, (40, 64)), T.Q8_0, (40, 64)))


# ---------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------

def test_moe_tiles_literal():
    """Rows by expert [2, 0, 2, 2, 1], E = 3, tiles of 2: stable sort [1, 4, 0, 2, 3]; expert 0
    rows [0, 1), expert 1 [1, 2), expert 2 [2, 4) and [4, 5); bound (5 + 3) // 2 = 4 tiles."""
    order, tiles = mx.moe_tiles(jnp.array([2, 0, 2, 2, 1]), 3, 2)
    np.testing.assert_array_equal(np.asarray(order), [1, 4, 0, 2, 3])
    np.testing.assert_array_equal(np.asarray(tiles), [[0, 1, 2, 2], [0, 1, 2, 4], [1, 2, 4, 5]])
    # One expert with 3 rows, E = 4: the bound (3 + 3) // 2 = 3 tiles, 2 used ([0, 2), [2, 3));
    # the unused third tile is empty (first == end == 0, expert clipped to E - 1).
    order, tiles = mx.moe_tiles(jnp.array([1, 1, 1]), 4, 2)
    np.testing.assert_array_equal(np.asarray(tiles), [[1, 1, 3], [0, 2, 0], [2, 3, 0]])



@pytest.mark.parametrize("R, E, bm", [(256, 32, 16), (37, 8, 4), (5, 64, 16), (1, 1, 1), (90, 3, 64)])
def test_moe_tiles_against_loop_oracle(R, E, bm):
    """Random routings against a plain Python walk over the experts (tiles of at most bm rows of
    one expert in expert order, then empty tiles with the last expert id), and no while loop in
    the compiled function (a while_loop's predicate is a host round trip per iteration on the
    GPU: jnp.searchsorted made 12 per layer in the batch-64 decode step)."""
    rng = np.random.default_rng(R * 1000 + E)
    ids = rng.integers(0, E, R) if R > 1 else np.array([E - 1])
    order, tiles = mx.moe_tiles(jnp.asarray(ids), E, bm)
    np.testing.assert_array_equal(np.asarray(order), np.argsort(ids, kind="stable"))
    want, start = [], 0
    for e in range(E):
        n = int(np.sum(ids == e))
        want += [(e, r, min(r + bm, start + n)) for r in range(start, start + n, bm)]
        start += n
    n_tiles = tiles.shape[1]
    want += [(E - 1, 0, 0)] * (n_tiles - len(want))
    np.testing.assert_array_equal(np.asarray(tiles).T, np.array(want, np.int32).reshape(-1, 3))
    hlo = jax.jit(lambda i: mx.moe_tiles(i, E, bm)).lower(jnp.asarray(ids)).compile().as_text()
    assert " while(" not in hlo

MOE_CASES = [
    # (T, k, E, O, I, dtype, layout, bias, mode)
    (3, 2, 5, 40, 64, jnp.float32, "ggml", True, None),          # pairs (R = 6)
    (2, 4, 5, 24, 96, jnp.bfloat16, "split", False, None),       # pairs, k = 4
    (9, 4, 5, 40, 64, jnp.float32, "split", True, None),         # grouped (R = 36)
    (5, 4, 3, 24, 64, jnp.bfloat16, "ggml", True, "grouped"),    # grouped, few experts
    (70, 4, 6, 40, 96, jnp.bfloat16, "split", True, None),       # grouped, R = 280: word decode
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-{c[6]}-{c[8]}")
def test_mxfp4_moe_vs_float64(case, interpret):
    t, k, e, o, i, dtype, layout, with_bias, mode = case
    rng = np.random.default_rng(t * 100 + k)
    raw = mxfp4_bytes(rng, (e, o, i))
    w64 = oracle(raw.reshape(e * o, -1), T.MXFP4).reshape(e, o, i)
    x, x64 = as_x(rng, (t, i), dtype)
    ids = rng.integers(0, e, size=(t, k)).astype(np.int32)
    ids[0, :] = ids[0, 0]                                        # a token repeating an expert
    ids[-1, 0] = ids[0, 0]                                       # an expert shared by tokens
    b = rng.standard_normal((e, o)).astype(np.float32) if with_bias else None
    w = mx.repack_mxfp4(raw) if layout == "split" else jnp.asarray(raw)
    args = (x, w, jnp.asarray(ids), None if b is None else jnp.asarray(b))
    y = np.asarray(mx.mxfp4_moe_matmul(*args, mode=mode, interpret=interpret))
    y_ref = np.asarray(mx.mxfp4_moe_matmul_ref(*args))
    assert y.shape == (t, k, o)
    for tt in range(t):
        for u in range(k):
            ex = ids[tt, u]
            b64 = None if b is None else b[ex].astype(np.float64)
            for got in (y[tt, u][None], y_ref[tt, u][None]):
                check_bound(got, x64[tt][None], w64[ex], b64, tol(dtype, i))


def test_moe_shape_errors():
    rng = np.random.default_rng(0)
    w = jnp.asarray(mxfp4_bytes(rng, (3, 8, 64)))
    with pytest.raises(WeightsError, match="does not match"):
        mx.mxfp4_moe_matmul(jnp.zeros((2, 32)), w, jnp.zeros((2, 1), jnp.int32), interpret=True)
    with pytest.raises(WeightsError, match="expert_ids"):
        mx.mxfp4_moe_matmul(jnp.zeros((2, 64)), w, jnp.zeros((3, 1), jnp.int32), interpret=True)
    with pytest.raises(WeightsError, match=r"uint8\[E, O, G\*17\]"):
        mx.mxfp4_moe_matmul(jnp.zeros((2, 64)), w[0], jnp.zeros((2, 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Embedding, errors, dispatch switch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ggml", "split"])
def test_q8_embed_bit_exact(layout):
    rng = np.random.default_rng(3)
    raw = q8_bytes(rng, (50, 96))
    want = oracle(raw, T.Q8_0).astype(np.float32)
    table = q8.repack_q8_0(raw) if layout == "split" else jnp.asarray(raw)
    ids = np.array([[0, 49, 7], [7, 60, -3]])                   # repeats and out-of-range ids
    got = np.asarray(q8.q8_0_embed(table, jnp.asarray(ids)))
    np.testing.assert_array_equal(got.view(np.uint32), want[np.clip(ids, 0, 49)].view(np.uint32))
    np.testing.assert_array_equal(got, np.asarray(q8.q8_0_embed_ref(table, jnp.asarray(ids))))


def test_shape_and_plan_errors():
    rng = np.random.default_rng(4)
    w = jnp.asarray(mxfp4_bytes(rng, (8, 64)))
    with pytest.raises(WeightsError, match=r"x\[..., 32\] does not match the weight \[O=8, I=64\]"):
        mx.mxfp4_matmul(jnp.zeros((1, 32)), w, interpret=True)
    with pytest.raises(WeightsError, match="G\\*17"):
        mx.mxfp4_matmul(jnp.zeros((1, 64)), w[:, :30], interpret=True)
    with pytest.raises(ValueError, match="block_k=48 must be a power of two"):
        mx.mxfp4_matmul(jnp.zeros((1, 64)), w, block_k=48, interpret=True)
    with pytest.raises(ValueError, match="block_m >= 16"):
        mx.mxfp4_matmul(jnp.zeros((8, 64)), w, mode="dot", block_m=8, interpret=True)
    with pytest.raises(WeightsError, match="Q8_0"):
        q8.q8_0_matmul(jnp.zeros((1, 64)), jnp.zeros((8, 60), jnp.uint8), interpret=True)


def test_use_kernel_switch(monkeypatch):
    monkeypatch.setenv("GPTJAX_KERNELS", "ref")
    assert not mx.use_kernel() and not q8.use_kernel()
    monkeypatch.delenv("GPTJAX_KERNELS")
    assert mx.use_kernel() == HAS_GPU


def test_plan_fills_the_gpu(monkeypatch):
    """Decode of a 2880 x 2880 matrix: 16-row tiles (180 programs, the H100 sweep's best) unless
    a tiling is asked for, then K is split until >= TARGET_PROGRAMS programs; the vocab head
    needs no split; prefill uses dot tiles."""
    p = mx.plan_dense(1, 2880, 2880)
    assert p.mode == "gemv" and (p.block_n, p.block_k, p.k_splits, p.prefetch) == (16, 512, 1, False)
    p = mx.plan_dense(1, 2880, 2880, block_n=32)
    n_prog = -(-2880 // p.block_n) * p.k_splits
    assert p.mode == "gemv" and p.k_splits > 1 and n_prog >= mx.TARGET_PROGRAMS
    assert mx.plan_dense(1, 201088, 2880).k_splits == 1
    for wide, tiles in ((False, (32, 256)), (True, (16, 1024))):      # per card (H200: wide)
        monkeypatch.setattr(mx, "wide_gemv_card", lambda wide=wide: wide)
        p = mx.plan_dense(1, 201088, 2880)
        assert (p.mode, p.block_n, p.block_k, p.k_splits) == ("gemv", *tiles, 1)
        assert mx.plan_dense(1, 201088, 1024).block_k == 256            # short rows: H100 tile
        assert mx.plan_dense(1, 201088, 2880, block_n=64).block_k == 256  # tiling asked for
    monkeypatch.undo()
    p = mx.plan_dense(512, 2880, 2880)
    assert p.mode == "dot" and p.block_m >= 64 and p.k_splits == 1
    p = mx.plan_dense(64, 2880, 4096)                       # batch decode: K split, capped
    assert p.mode == "dot" and 1 < p.k_splits <= mx.MAX_SPLITS_BATCH and not p.swap
    assert mx.plan_dense(64, 201088, 2880).k_splits == 1
    # kernels with a swapped dot step (Q8_0): batch decode swaps unless a tiling is asked for
    p = mx.plan_dense(64, 2880, 4096, swap_ok=True)
    assert p.swap and p.mode == "dot" and 1 < p.k_splits <= mx.SWAP_MAX_SPLITS
    assert mx.plan_dense(64, 201088, 2880, swap_ok=True).k_splits == 1
    assert not mx.plan_dense(64, 2880, 4096, swap_ok=True, block_n=128).swap
    assert not any(mx.plan_dense(m, 2880, 2880, swap_ok=True).swap for m in (1, 2, 256, 512))
    for m, bm in ((3, 16), (16, 16), (17, 32), (63, 64), (255, 64)):
        p = mx.plan_dense(m, 2880, 4096, swap_ok=True)
        assert p.swap and p.block_m == bm and p.k_splits <= mx.MAX_SPLITS_BATCH
    with pytest.raises(ValueError, match="no swapped dot"):
        mx.plan_dense(64, 2880, 2880, swap=True)
    with pytest.raises(ValueError, match="swap=True needs mode='dot'"):
        q8.q8_0_matmul(jnp.zeros((1, 64)), jnp.zeros((8, 68), jnp.uint8), swap=True,
                       interpret=True)


@pytest.mark.parametrize("t", [T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_kernels_take_packed_weights_in_either_layout(t):
    """A PackedWeight in the ggml layout, the same weight repacked (layout="kernel", what the
    loaders hand the kernels on a GPU) and its raw arrays give bit-identical kernel results;
    a PackedWeight of another type is refused by name."""
    rng = np.random.default_rng(77)
    o, i = 40, 96
    raw = rng.integers(0, 256, (o, i // 32 * (17 if t == T.MXFP4 else 34)), dtype=np.uint8)
    if t == T.MXFP4:
        raw[:, ::17] = rng.integers(118, 123, raw[:, ::17].shape, dtype=np.uint8)
        fn = mx.mxfp4_matmul
    else:
        sc = rng.uniform(1e-3, 1e-2, (o, i // 32)).astype(np.float16).view(np.uint8)
        raw.reshape(o, i // 32, 34)[:, :, :2] = sc.reshape(o, i // 32, 2)
        fn = q8.q8_0_matmul
    w = PackedWeight.from_bytes(raw, t, (o, i))
    k = w.to_kernel_layout()
    x = jnp.asarray(rng.standard_normal((3, i)), jnp.float32)
    want = np.asarray(fn(x, jnp.asarray(raw), interpret=True))
    for arg in (w, k, k.data):
        np.testing.assert_array_equal(np.asarray(fn(x, arg, interpret=True)), want)
    other = PackedWeight.from_bytes(np.zeros((o, i // 32 * 18), np.uint8), T.Q4_0, (o, i))
    with pytest.raises(WeightsError, match="expected (MXFP4|Q8_0)"):
        fn(x, other, interpret=True)
