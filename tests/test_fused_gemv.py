"""The fused decode GEMV (pallas_kernels/fused_gemv.py): norm prologue + bias/act/residual epilogue.

Oracle: float64 numpy.  Weights: ``gguf.quants.dequantize`` for Q8_0/MXFP4 bytes, the array
itself for plain weights.  The normalised row is computed in float64 and rounded to the compute
dtype with ml_dtypes, the activation in float64.

Tolerances (elementwise, named), with ``mag = |h| @ |w|^T + |b|`` in float64:
* the matmul: ``(I + 2) 2^-24 mag`` (float32 accumulation, any order) plus, for a bf16 compute
  dtype, ``2^-8 mag``: the kernel and the oracle may round an element of the normalised row to
  neighbouring bf16 values when float32 and float64 statistics straddle a rounding boundary
  (and the Q8_0 GEMV keeps weights unrounded where the reference rounds them to bf16);
* norm statistics: float32 sums of I squares, relative ``(I + 8) 2^-24`` on rstd (included in
  the matmul bound with factor 2);
* GELU: Lipschitz <= 1.13, so the pre-activation bound times 1.2, plus 1e-6 |y| for tanh/erf
  implementations; ``round_to`` bf16: one bf16 rounding of the result, ``2^-8 |y|``.
A wrong gamma, beta, mean, bias, residual, activation or weight row is off by O(mag) and fails.
"""
from __future__ import annotations

import math
import warnings

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gptjax.errors import WeightsError
from gptjax.packed import PackedWeight
from pallas_kernels import fused_gemv as fg
from kernel_modes import MODES

U32 = 2.0 ** -24


def _weights(rng, kind, O, I):
    """(weight argument, float64 [O, I] exact values)."""
    if kind.startswith("plain"):
        dt = np.float32 if kind == "plain_f32" else ml_dtypes.bfloat16
        w = (rng.standard_normal((O, I)) * 0.1).astype(np.float32).astype(dt)
        return jnp.asarray(w), np.asarray(w).astype(np.float64)
    if kind.startswith("q8"):
        b = rng.integers(0, 256, size=(O, I // 32, 34), dtype=np.uint8)
        d = (rng.uniform(1, 2, (O, I // 32)) * 2.0 ** -9).astype(np.float16)
        b[..., 0:2] = d.astype("<f2").view(np.uint8).reshape(O, I // 32, 2)
        raw, t = b.reshape(O, I // 32 * 34), T.Q8_0
    else:
        b = rng.integers(0, 256, size=(O, I // 32, 17), dtype=np.uint8)
        b[..., 0] = rng.integers(120, 126, size=b.shape[:-1])
        raw, t = b.reshape(O, I // 32 * 17), T.MXFP4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w64 = gguf.quants.dequantize(raw, t).astype(np.float64).reshape(O, I)
    pw = PackedWeight(jnp.asarray(raw), int(t), (O, I))
    return (pw.to_kernel_layout() if kind.endswith("split") else pw), w64


def _round(a64, dtype):
    return a64.astype(np.float32).astype(dtype).astype(np.float64) if dtype != np.float32 \
        else a64.astype(np.float32).astype(np.float64)


def _gelu64(y):
    """GELU, tanh form (GPT-2's ``gelu_new``, ggml_gelu), float64."""
    return 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))


def _oracle(x, w64, bias, g, b, res, norm, eps, act, round_to, cdt):
    """float64 result and its elementwise bound."""
    x64 = np.asarray(x, np.float32).astype(np.float64)
    I = x64.shape[-1]
    if norm == "rms":
        h = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + eps) * g
    elif norm == "layer":
        c = x64 - x64.mean(-1, keepdims=True)
        h = c / np.sqrt(np.mean(c ** 2, -1, keepdims=True) + eps) * g + b
    else:
        h = x64
    if norm:
        h = _round(h, ml_dtypes.bfloat16 if cdt == jnp.bfloat16 else np.float32)
    y = h @ w64.T
    mag = np.abs(h) @ np.abs(w64).T
    if bias is not None:
        y, mag = y + bias, mag + np.abs(bias)
    rel = (I + 2) * U32 + (2 * (I + 8) * U32 if norm else 0)
    if cdt == jnp.bfloat16:
        rel += 2.0 ** -8
    bound = rel * mag
    if act:
        y = _gelu64(y)
        bound = 1.2 * bound + 1e-6 * np.abs(y)
    if round_to is not None:
        bound = bound + 2.0 ** -8 * np.abs(y)
    if res is not None:
        y = y + res
        bound = bound + U32 * np.abs(y)
    return y, bound


CASES = [
    # kind, M, O, I, norm, act, round_to, bias, residual, cdt, x dtype
    ("plain_bf16", 1, 40, 96, "layer", None, jnp.bfloat16, True, False, jnp.bfloat16, jnp.float32),
    ("plain_bf16", 2, 72, 256, "layer", "gelu_tanh", jnp.bfloat16, True, False, jnp.bfloat16,
     jnp.float32),
    ("plain_bf16", 1, 24, 128, None, None, None, True, True, jnp.bfloat16, jnp.bfloat16),
    ("plain_f32", 1, 40, 64, "rms", "gelu_tanh", None, False, False, jnp.float32, jnp.float32),
    # I = 4160: 130 blocks, norm statistics by the K loop instead of one load
    ("plain_f32", 1, 24, 4160, "layer", None, None, True, False, jnp.float32, jnp.float32),
    ("q8_split", 1, 40, 2880, "rms", None, jnp.bfloat16, True, False, jnp.bfloat16, jnp.float32),
    ("q8_ggml", 2, 33, 96, None, None, None, True, True, jnp.bfloat16, jnp.bfloat16),
    ("mxfp4_split", 1, 48, 2880, "rms", None, None, True, True, jnp.float32, jnp.float32),
    ("mxfp4_ggml", 2, 17, 96, "layer", "gelu_tanh", jnp.bfloat16, False, True, jnp.bfloat16,
     jnp.float32),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-M{c[1]}-{c[4]}-{c[5]}" for c in CASES])
def test_fused_gemv_against_float64(case, interpret):
    kind, M, O, I, norm, act, round_to, has_bias, has_res, cdt, xdt = case
    rng = np.random.default_rng(hash(case[:5]) % 2 ** 32)
    w, w64 = _weights(rng, kind, O, I)
    x = jnp.asarray((rng.standard_normal((M, I)) * 3 + 3).astype(np.float32)).astype(xdt)
    g = (rng.standard_normal(I) * 0.5 + 1).astype(np.float32)
    b = (rng.standard_normal(I) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(O)).astype(np.float32) if has_bias else None
    res = (rng.standard_normal((M, O)) * 4).astype(np.float32) if has_res else None
    eps = 1e-5
    kw = dict(norm=norm, eps=eps, act=act, round_to=round_to, cdt=cdt)
    args = (x, w, None if bias is None else jnp.asarray(bias), jnp.asarray(g) if norm else None,
            jnp.asarray(b) if norm == "layer" else None, None if res is None else jnp.asarray(res))
    y = np.asarray(fg.fused_gemv(*args, **kw, interpret=interpret), np.float64)
    want, bound = _oracle(x, w64, bias, g, b, res, norm, eps, act, round_to, cdt)
    assert y.shape == (M, O)
    err = np.abs(y - want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"err {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst}"
    if round_to is not None and not has_res:                   # values representable in bf16
        np.testing.assert_array_equal(y, _round(y, ml_dtypes.bfloat16))
    # The jnp twin: same composition, same bound (it rounds Q8_0 weights to bf16, the kernel not).
    yr = np.asarray(fg.fused_gemv_ref(*args, **kw), np.float64)
    assert np.all(np.abs(yr - want) <= bound)


ROW_GROUP_CASES = [
    # kind, M, O, I, norm, act, bias, residual, cdt: gpt-oss's router shape (64 tokens, 32
    # experts, RMSNorm, bias, bf16 compute), odd row counts (a partial last group), O not a
    # multiple of the 4-output block, LayerNorm + GELU + residual, a bf16 weight
    ("plain_f32", 64, 32, 2880, "rms", None, True, False, jnp.bfloat16),
    ("plain_f32", 3, 20, 96, "rms", None, True, False, jnp.bfloat16),
    ("plain_bf16", 7, 36, 128, "layer", "gelu_tanh", False, True, jnp.float32),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", ROW_GROUP_CASES, ids=[f"{c[0]}-M{c[1]}-O{c[2]}" for c in
                                                       ROW_GROUP_CASES])
def test_fused_gemv_row_groups(case, interpret):
    """More rows than MAX_ROWS against a small plain weight (``supports(row_groups=True)``):
    float64 oracle with the bound of test_fused_gemv_against_float64, and every row (result and
    normalised row) equal to the same row run alone with the same tiles (to float32 rounding;
    bf16-rounded normalised rows exactly) -- a row group's program runs the single-row
    arithmetic, so a wrong row index, clamp or store mask shows as a mismatch."""
    kind, M, O, I, norm, act, has_bias, has_res, cdt = case
    rng = np.random.default_rng(M * 1000 + O)
    w, w64 = _weights(rng, kind, O, I)
    assert fg.supports((M, I), w, row_groups=True) and not fg.supports((M, I), w)
    x = jnp.asarray((rng.standard_normal((M, I)) * 3 + 1).astype(np.float32))
    g = (rng.standard_normal(I) * 0.5 + 1).astype(np.float32)
    b = (rng.standard_normal(I) * 0.1).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32) if has_bias else None
    res = (rng.standard_normal((M, O)) * 4).astype(np.float32) if has_res else None
    kw = dict(norm=norm, eps=1e-5, act=act, cdt=cdt, norm_out=True, interpret=interpret)
    args = (w, None if bias is None else jnp.asarray(bias), jnp.asarray(g),
            jnp.asarray(b) if norm == "layer" else None)
    y, h = fg.fused_gemv(x, *args, None if res is None else jnp.asarray(res), **kw)
    want, bound = _oracle(x, w64, bias, g, b, res, norm, 1e-5, act, None, cdt)
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= bound), f"max err / bound {np.max(err / bound):.2f}"
    tiles = fg.plan("plain", O, I, M=M)                 # the same tiles: the same sum order
    for r in range(M):
        y1, h1 = fg.fused_gemv(x[r:r + 1], *args, None if res is None else jnp.asarray(res[r:r + 1]),
                               block_n=tiles.block_n, block_k=tiles.block_k, **kw)
        # float32 rounding may differ in the last bits between two compilations (contracted
        # multiply-adds); a wrong row is off by O(|y|)
        np.testing.assert_allclose(np.asarray(y[r]), np.asarray(y1[0]), rtol=1e-5,
                                   atol=1e-6 * float(np.max(np.abs(want))), err_msg=f"row {r}")
        hr, h1r = np.asarray(h[r], np.float32), np.asarray(h1[0], np.float32)
        if cdt == jnp.bfloat16:                          # rounded to bf16: the same values
            np.testing.assert_array_equal(hr, h1r, err_msg=f"normalised row {r}")
        else:
            np.testing.assert_allclose(hr, h1r, rtol=1e-6, atol=1e-6, err_msg=f"normalised row {r}")


@pytest.mark.parametrize("interpret", MODES)
def test_fused_gemv_tilings(interpret):
    """Forced tiles (ragged O and K edges, one-block steps) give the default tiling's result."""
    rng = np.random.default_rng(5)
    w, _ = _weights(rng, "q8_split", 70, 320)
    x = jnp.asarray(rng.standard_normal((1, 320)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal(320).astype(np.float32))
    base = fg.fused_gemv(x, w, norm_weight=g, norm="rms", interpret=interpret)
    for bn, bk in ((2, 32), (32, 64), (64, 512)):
        y = fg.fused_gemv(x, w, norm_weight=g, norm="rms", block_n=bn, block_k=bk,
                          interpret=interpret)
        np.testing.assert_allclose(np.asarray(y), np.asarray(base), rtol=1e-5, atol=1e-5)


def test_supports_and_errors():
    w = jnp.zeros((8, 64), jnp.bfloat16)
    assert fg.supports((1, 1, 64), w) and fg.supports((2, 64), w)
    assert not fg.supports((3, 64), w)                                  # too many rows
    assert not fg.supports((1, 48), jnp.zeros((8, 48)))                 # I not a multiple of 32
    assert not fg.supports((1, 64), jnp.zeros((2, 8, 64)))              # stacked experts
    q4 = PackedWeight(jnp.zeros((8, 2 * 18), jnp.uint8), int(T.Q4_0), (8, 64))
    assert not fg.supports((1, 64), q4)                                 # no kernel for Q4_0
    x = jnp.zeros((1, 64))
    with pytest.raises(WeightsError, match="norm_weight"):
        fg.fused_gemv(x, w, norm="rms", interpret=True)
    with pytest.raises(WeightsError, match="residual"):
        fg.fused_gemv(x, w, residual=jnp.zeros((1, 9)), interpret=True)
    with pytest.raises(ValueError, match="at most"):
        fg.fused_gemv(jnp.zeros((3, 64)), jnp.zeros((300, 64)), interpret=True)   # O > FEW_ROWS
    with pytest.raises(ValueError, match="at most"):
        fg.fused_gemv(jnp.zeros((fg.GROUP_MAX_ROWS + 1, 64)), w, interpret=True)
    assert fg.supports((3, 64), w, row_groups=True)                     # row groups: small plain w
    assert not fg.supports((3, 64), jnp.zeros((300, 64)), row_groups=True)
    assert not fg.supports((fg.GROUP_MAX_ROWS + 1, 64), w, row_groups=True)
    for act in ("relu", "gelu_erf"):                                    # no erf in Triton
        with pytest.raises(ValueError, match="act"):
            fg.fused_gemv(x, w, act=act, interpret=True)


def test_row_group_limit_reads_env_at_call(monkeypatch):
    """GPTJAX_FUSED_ROUTER_ROWS is read when a call is traced (0: no row groups at all)."""
    w = jnp.zeros((8, 64))
    assert fg.supports((8, 64), w, row_groups=True)
    monkeypatch.setenv("GPTJAX_FUSED_ROUTER_ROWS", "0")
    assert not fg.supports((8, 64), w, row_groups=True)
    assert fg.supports((2, 64), w, row_groups=True)                     # MAX_ROWS still holds
    monkeypatch.setenv("GPTJAX_FUSED_ROUTER_ROWS", "128")
    assert fg.max_rows("plain", 8) == 128 and fg.max_rows("q8_0", 8) == fg.MAX_ROWS


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("I", [96, 2880, 4160])        # one-load statistics, and the K loop
def test_fused_norm_values_through_one_hot_rows(norm, I, interpret):
    """One-hot weight rows make ``y_o = h[j_o]``: the normalised row itself, compared
    elementwise with float64 (float32 statistics: relative ``2 (I + 8) 2^-24`` of |h| plus the
    gamma/beta products).  A norm bug that the matmul's magnitude bound would absorb (a stray
    lane in a sum, a wrong mean) shows here."""
    rng = np.random.default_rng(I)
    cols = rng.choice(I, 32, replace=False)
    w = np.zeros((32, I), np.float32)
    w[np.arange(32), cols] = 1
    x = (rng.standard_normal((1, I)) * 3 + 3).astype(np.float32)
    g = (rng.standard_normal(I) * 0.5 + 1).astype(np.float32)
    b = (rng.standard_normal(I) * 0.1).astype(np.float32)
    y, hout = fg.fused_gemv(jnp.asarray(x), jnp.asarray(w), None, jnp.asarray(g),
                            jnp.asarray(b) if norm == "layer" else None, norm=norm,
                            cdt=jnp.float32, norm_out=True, interpret=interpret)
    x64 = x.astype(np.float64)
    if norm == "rms":
        h = x64 / np.sqrt(np.mean(x64 ** 2) + 1e-5) * g
    else:
        c = x64 - x64.mean()
        h = c / np.sqrt(np.mean(c ** 2) + 1e-5) * g + b
    # magnitude before the beta add (h may cancel against beta); + 16 ulps for the GPU's
    # approximate rsqrt and division
    scaled = np.abs(h - (b if norm == "layer" else 0))[0, cols]
    bound = (2 * (I + 8) + 16) * U32 * (scaled + np.abs(b[cols]))
    np.testing.assert_array_less(np.abs(np.asarray(y[0], np.float64) - h[0, cols]), bound + 1e-30)
    # norm_out: the whole normalised row the matmul consumed, every element
    full = np.abs(h - (b if norm == "layer" else 0))[0]
    bound = (2 * (I + 8) + 16) * U32 * (full + np.abs(b))
    np.testing.assert_array_less(np.abs(np.asarray(hout[0], np.float64) - h[0]), bound + 1e-30)


@pytest.mark.parametrize("interpret", MODES)
def test_norm_out_two_rows_bf16(interpret):
    """norm_out with two rows and a bf16 compute dtype: y is the plain call's, h the twin's
    normalised rows (bf16 values; one bf16 ulp apart at most where float32 statistics of kernel
    and twin straddle a rounding boundary)."""
    rng = np.random.default_rng(11)
    w, _ = _weights(rng, "mxfp4_split", 40, 2880)
    x = jnp.asarray((rng.standard_normal((2, 2880)) * 3).astype(np.float32))
    g = jnp.asarray((rng.standard_normal(2880) * 0.5 + 1).astype(np.float32))
    kw = dict(norm="rms", norm_weight=g, cdt=jnp.bfloat16)
    y, h = fg.fused_gemv(x, w, norm_out=True, interpret=interpret, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fg.fused_gemv(x, w, interpret=interpret,
                                                                           **kw)))
    _, hr = fg.fused_gemv_ref(x, w, norm_out=True, **kw)
    h, hr = np.asarray(h, np.float64), np.asarray(hr, np.float64)
    np.testing.assert_array_equal(h, _round(h, ml_dtypes.bfloat16))
    assert np.all(np.abs(h - hr) <= 2.0 ** -8 * np.abs(hr))
    with pytest.raises(ValueError, match="norm_out"):
        fg.fused_gemv(x, w, norm_out=True, interpret=True)
