"""The decode MoE kernels (pallas_kernels/moe_decode.py): in-kernel top-k routing, gate/up +
SwiGLU, down + weighted sum + residual.  (The RMSNorm before them is the router kernel's,
``fused_gemv(norm_out=True)``: tests/test_fused_gemv.py.)

Oracle: float64 numpy -- routing by a stable descending sort (ties: lower expert id first, as
``lax.top_k``), softmax over the picked logits, RMSNorm rounded to the compute dtype with
ml_dtypes, expert weights from ``gguf.quants.dequantize`` of the file bytes, the clamped SwiGLU.
The ``_ref`` twins are checked against the same oracle.

Tolerances (elementwise, named), with ``mag = |n| @ |W|^T + |b|`` in float64 per output:
* gate/up: float32 accumulation in any order, ``(I + 8) 2^-24 mag``.  SwiGLU is Lipschitz <= 1.1 (limit
  + 1) in the gate and <= limit in the up half: ``K_SWIGLU = 10`` times the two bounds, plus one
  rounding of h to the compute dtype, ``2^-8 |h|`` (bf16) or ``2^-23 |h|`` (f32).
* down + combine: ``(F + 8) 2^-24 sum_u w_u mag_u`` plus ``1e-6 sum_u w_u |y_u|`` (softmax: exp
  implementations) plus ``2^-22 |out|`` (the final adds).
A wrong expert, slot, weight, bias, norm or clamp is off by O(mag) and fails.
"""
from __future__ import annotations

import warnings

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gptjax.errors import WeightsError
from pallas_kernels import moe_decode as md
from pallas_kernels.mxfp4_matmul import repack_mxfp4
from kernel_modes import MODES

ALPHA, LIMIT, EPS = 1.702, 7.0, 1e-5
K_SWIGLU = 10.0


def _mxfp4(rng, E, O, I):
    """(ggml bytes uint8 [E, O, I/32*17], float64 [E, O, I])."""
    b = rng.integers(0, 256, size=(E, O, I // 32, 17), dtype=np.uint8)
    b[..., 0] = rng.integers(122, 128, size=b.shape[:-1])
    raw = b.reshape(E, O, I // 32 * 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gguf.quants.dequantize(raw.reshape(E * O, -1), T.MXFP4).astype(np.float64)
    return raw, w.reshape(E, O, I)


def _route(logits, U):
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :U]            # ties: lower id first
    top = np.take_along_axis(logits, order, axis=-1).astype(np.float64)
    w = np.exp(top - top[:, :1])
    return order, w / w.sum(-1, keepdims=True)


def _round(a, cdt):
    return a.astype(ml_dtypes.bfloat16).astype(np.float64) if cdt == jnp.bfloat16 else \
        a.astype(np.float32).astype(np.float64)


def _swiglu(g, u):
    g = np.minimum(g, LIMIT)
    u = np.clip(u, -LIMIT, LIMIT)
    return g / (1 + np.exp(-ALPHA * g)) * (u + 1)


def _case(rng, M, E, U, D, F, fused, ties=False):
    x = rng.standard_normal((M, D)) * 3
    g = rng.uniform(0.5, 1.5, D)
    logits = rng.standard_normal((M, E)).astype(np.float32)
    if ties:                                                               # exact duplicates
        logits[:, 1::2] = logits.max(axis=1, keepdims=True)              # tied at the top
    raw1, w1 = _mxfp4(rng, E, 2 * F, D)                                    # gate rows, then up
    b1 = rng.standard_normal((E, 2 * F))
    rawd, wd = _mxfp4(rng, E, D, F)
    bd = rng.standard_normal((E, D))
    res = rng.standard_normal((M, D))
    return dict(x=x, g=g, logits=logits, raw1=raw1, w1=w1, b1=b1, rawd=rawd, wd=wd, bd=bd,
                res=res, U=U, F=F, fused=fused)


def _normed(c, cdt):
    x = c["x"]
    return _round(x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * c["g"], cdt)


def _oracle(c, cdt):
    """(h [M*U, F], bound_h, out [M, D], bound_out) in float64."""
    F, U = c["F"], c["U"]
    ids, w = _route(c["logits"], U)
    n = _normed(c, cdt)
    W1, b1 = c["w1"][ids], c["b1"][ids]                                    # [M, U, 2F, D]
    y1 = np.einsum("md,mufd->muf", n, W1) + b1
    mag1 = np.einsum("md,mufd->muf", np.abs(n), np.abs(W1)) + np.abs(b1)
    h = _round(_swiglu(y1[..., :F], y1[..., F:]), cdt)
    c_mm = (n.shape[1] + 8) * 2.0 ** -24
    bound_h = K_SWIGLU * c_mm * (mag1[..., :F] + mag1[..., F:]) + \
        (2.0 ** -8 if cdt == jnp.bfloat16 else 2.0 ** -23) * np.abs(h)
    Wd, bd = c["wd"][ids], c["bd"][ids]                                    # [M, U, D, F]
    y = np.einsum("muf,mudf->mud", h, Wd) + bd
    magd = np.einsum("muf,mudf->mud", np.abs(h), np.abs(Wd)) + np.abs(bd)
    out = c["res"] + np.einsum("mu,mud->md", w, y)
    bound_out = (F + 8) * 2.0 ** -24 * np.einsum("mu,mud->md", w, magd) + \
        1e-6 * np.einsum("mu,mud->md", w, np.abs(y)) + 2.0 ** -22 * np.abs(out)
    return h.reshape(-1, F), bound_h.reshape(-1, F), out, bound_out


def _args(c, layout):
    def wt(raw):
        return repack_mxfp4(jnp.asarray(raw)) if layout == "kernel" else jnp.asarray(raw)

    F = c["F"]
    b1 = jnp.asarray(c["b1"], jnp.float32)
    if c["fused"]:
        first = (wt(c["raw1"]), b1, None, None)
    else:
        first = (wt(c["raw1"][:, :F]), b1[:, :F], wt(c["raw1"][:, F:]), b1[:, F:])
    return first, wt(c["rawd"]), jnp.asarray(c["bd"], jnp.float32)


def _run(c, cdt, *, ref=False, interpret=True, layout="kernel", **tiles):
    first, wd, bd = _args(c, layout)
    kw = dict(n_used=c["U"], alpha=ALPHA, limit=LIMIT, cdt=cdt, **tiles)
    if not ref:
        kw["interpret"] = interpret
    f1 = md.moe_gate_up_swiglu_ref if ref else md.moe_gate_up_swiglu
    f2 = md.moe_down_combine_ref if ref else md.moe_down_combine
    n = jnp.asarray(_normed(c, cdt), jnp.float32)
    logits = jnp.asarray(c["logits"])
    h = f1(n, logits, *first, **kw)
    # the hand-over: float32 holding compute-dtype values
    assert h.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h.astype(cdt).astype(jnp.float32)))
    out = f2(h, logits, wd, bd, jnp.asarray(c["res"], jnp.float32), **kw)
    return np.asarray(h, np.float64), np.asarray(out, np.float64)


def _check(got, want, bound, what):
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} "
                                  f"at {worst}")


CASES = [
    # (M, E, U, D, F, fused, ties, cdt, tiles)
    (1, 8, 4, 96, 64, True, False, jnp.float32, {}),
    (2, 8, 4, 96, 64, False, False, jnp.float32, dict(block_n=16, block_k=64)),
    (2, 6, 2, 96, 96, True, True, jnp.float32, dict(block_n=64, block_k=32)),  # ragged rows, ties
    (1, 32, 4, 128, 96, True, False, jnp.bfloat16, {}),
    (2, 5, 5, 64, 32, False, True, jnp.bfloat16, dict(block_n=4, block_k=128)),  # U = E
    (1, 128, 4, 64, 32, True, True, jnp.float32, {}),                    # gpt-oss-120b's E
    # code words read as flat [rows, blocks * 4] runs (the default), ragged K step; and the
    # [rows, blocks, 4] tile load
    (1, 32, 4, 160, 96, True, False, jnp.bfloat16, dict(flat=1, block_k=128)),
    (2, 8, 4, 96, 64, False, True, jnp.float32, dict(flat=0, block_n=16, block_k=64)),
]


def _cid(c):
    M, E, U, D, F, fused, ties, cdt, tiles = c
    return (f"M{M}-E{E}-U{U}-D{D}-F{F}-{'fused' if fused else 'pair'}{'-ties' if ties else ''}-"
            f"{jnp.dtype(cdt).name}{'-' + '-'.join(f'{k}{v}' for k, v in tiles.items()) if tiles else ''}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_moe_decode_vs_float64(case, interpret):
    M, E, U, D, F, fused, ties, cdt, tiles = case
    c = _case(np.random.default_rng(hash(_cid(case)) % 2 ** 32), M, E, U, D, F, fused, ties)
    h64, bh, out64, bo = _oracle(c, cdt)
    h, out = _run(c, cdt, interpret=interpret, **tiles)
    _check(h, h64, bh, "h")
    _check(out, out64, bo, "out")


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:6], ids=_cid)
def test_moe_decode_refs_vs_float64(case):
    M, E, U, D, F, fused, ties, cdt, _ = case
    c = _case(np.random.default_rng(7), M, E, U, D, F, fused, ties)
    h64, bh, out64, bo = _oracle(c, cdt)
    h, out = _run(c, cdt, ref=True)
    _check(h, h64, bh, "h (ref)")
    _check(out, out64, bo, "out (ref)")


def test_moe_decode_ggml_bytes_same_as_kernel_layout():
    c = _case(np.random.default_rng(3), 1, 8, 4, 64, 32, True)
    a = _run(c, jnp.float32, layout="kernel")
    b = _run(c, jnp.float32, layout="ggml")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_moe_decode_errors():
    c = _case(np.random.default_rng(0), 1, 4, 2, 64, 32, True)
    first, wd, bd = _args(c, "kernel")
    x = jnp.zeros((3, 64))
    kw = dict(n_used=2, alpha=ALPHA, limit=LIMIT, interpret=True)
    with pytest.raises(ValueError, match="M <= 2"):
        md.moe_gate_up_swiglu(x, jnp.zeros((3, 4)), *first, **kw)
    with pytest.raises(WeightsError, match="logits"):
        md.moe_gate_up_swiglu(x[:1], jnp.zeros((1, 5)), *first, **kw)
    with pytest.raises(ValueError, match="n_used"):
        md.moe_gate_up_swiglu(x[:1], jnp.zeros((1, 4)), *first, **{**kw, "n_used": 5})
    with pytest.raises(WeightsError, match="fused gate/up"):
        md.moe_gate_up_swiglu(x[:1], jnp.zeros((1, 4)), first[0], first[1][:, :3], **kw)
    with pytest.raises(WeightsError, match="does not match"):
        md.moe_gate_up_swiglu(x[:1, :32], jnp.zeros((1, 4)), *first, **kw)
    with pytest.raises(WeightsError, match="do not fit"):
        md.moe_down_combine(jnp.zeros((2, 32)), jnp.zeros((1, 4)), wd, bd, jnp.zeros((1, 63)),
                            **kw)
    with pytest.raises(ValueError, match="power of two"):
        md.plan("down", block_n=12)
