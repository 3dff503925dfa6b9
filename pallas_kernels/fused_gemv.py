"""Decode GEMV with its neighbours folded in: a norm prologue and a bias / activation / residual
epilogue, in one Pallas kernel (Triton backend).

Why.  A batch-1 decode step is a chain of one-row matmuls, each wrapped by small elementwise or
row-reduction ops (the norm before it, the bias, GELU, the residual add after it).  XLA runs
each of those as its own kernel of 1-4 µs -- more time than the GEMV itself for GPT-2 124M, and
about 40 % of a gpt-oss-20b step (benchmarks/RESULTS.md, profiles).  Here they ride along in the
GEMV: the norm statistics of the (few, short) input rows are recomputed by every program, the
epilogue works on the program's output tile.

Math, per row (``M <= MAX_ROWS`` rows at decode; row groups below)::

    h = x                                            norm None
    h = round_c(x / sqrt(mean(x^2) + eps) * g)       norm "rms"   (RMSNorm, gptjax layers.rms_norm)
    h = round_c((x - mean) / sqrt(var + eps) * g + b_n)  norm "layer" (biased var, layers.layer_norm)
    y = h @ W^T + bias                               float32 accumulation
    y = act(y)                                       act None | "gelu_tanh"
    y = round_o(y)                                   round_to None | a float dtype
    y = y + residual                                 residual None | float [M, O]

``round_c`` rounds the normalised row to the compute dtype ``cdt`` -- what the unfused path
hands its matmul -- and ``round_o`` rounds the result the way the unfused path's ``out_dtype``
does; both results stay float32 arrays (values representable in the rounded dtype), so the next
kernel reads them without a conversion kernel.  Statistics and everything else in float32, as in
``gptjax.models.layers``.  Result: float32 ``[M, O]``.

Weights (decoded by the same per-type code as the plain matmul kernels):

* plain float ``[O, I]`` (bf16 / f16 / f32; GPT-2, dequantized models), read as ``[O, I/32, 32]``;
* Q8_0 or MXFP4, any layout :func:`pallas_kernels.mxfp4_matmul.parse_packed` accepts (ggml bytes,
  the kernel layout, a ``PackedWeight``); GEMV numerics of :mod:`pallas_kernels.q8_matmul` /
  :mod:`pallas_kernels.mxfp4_matmul` (block sums, then the exact block scale).

``I`` must be a multiple of 32 (every block-quantized weight is; plain weights otherwise go the
unfused way: :func:`supports`).

Grid: one program per ``block_n`` output rows, no split-K (the epilogue needs the whole sum);
with more than MAX_ROWS rows (row groups: small plain weights only, gpt-oss's router at batch
decode) a second axis gives each program MAX_ROWS of them.
Each program first sums its rows' x over the whole row (one pass for RMSNorm, two for
LayerNorm: the mean, then the centred squares, as the reference does), then streams its weight
rows in K steps of ``block_k`` inputs, normalising each x tile as it is loaded.

``fused_gemv_ref`` is the plain-jnp twin (same signature): the unfused composition with the
weights decoded exactly (``gptjax.quant``), i.e. the XLA reference path.
"""
from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import WeightsError
from pallas_kernels import mxfp4_matmul as mx
from pallas_kernels import q8_matmul as q8
from pallas_kernels.mxfp4_matmul import QK, _W, _iota, _ix, cdiv

__all__ = ["fused_gemv", "fused_gemv_ref", "supports", "plan", "MAX_ROWS", "ACTS", "NORMS"]

F32 = jnp.float32
#: Rows (tokens) the fused kernel takes; more go the unfused way (GEMV math gets
#: instruction-bound with rows, see mxfp4_matmul.GEMV_MAX_ROWS).
MAX_ROWS = 2
#: Activations of the epilogue.  (No erf form: Pallas' Triton lowering has no erf, so
#: ``act="gelu_erf"`` goes the unfused way in ``layers.norm_linear``.)
ACTS = (None, "gelu_tanh")
#: Rows of at most this many 32-blocks get their norm statistics from one load.
STATS_ONE_LOAD_BLOCKS = 128
NORMS = (None, "rms", "layer")
#: Weights with at most this many output rows get whole-row K steps (:func:`plan`).
FEW_ROWS = 256
#: Row groups: a plain weight of at most FEW_ROWS outputs (gpt-oss's router) takes up to this
#: many rows, MAX_ROWS per program along a second grid axis (``supports(..., row_groups=True)``;
#: each group re-reads the weight, which L2 holds).  Batch decode's router (64 rows): one kernel
#: instead of an XLA RMSNorm and five kernels of a padded split-K matmul (benchmarks/RESULTS.md,
#: twelfth session).  Env ``GPTJAX_FUSED_ROUTER_ROWS`` overrides (0: never), read when a call
#: is traced (:func:`group_max_rows`), like ``moe.kernel_max_rows``.
GROUP_MAX_ROWS = 64


def group_max_rows() -> int:
    """Rows up to which row groups apply: env ``GPTJAX_FUSED_ROUTER_ROWS``, default
    :data:`GROUP_MAX_ROWS`."""
    return int(os.environ.get("GPTJAX_FUSED_ROUTER_ROWS", GROUP_MAX_ROWS))


_STATIC = ("norm", "eps", "act", "round_to", "cdt", "norm_out", "block_n", "block_k",
           "num_warps", "interpret")


# ---------------------------------------------------------------------------------------------
# Per weight type: load a weight tile, load an x tile, one GEMV step
# ---------------------------------------------------------------------------------------------

class _Ops(NamedTuple):
    """Per weight kind; x (and the norm weights) are read as [M, G, 32] by every kind."""
    w_tile: Any      # (w, w_refs, row0, bn, g0, gt, g_end) -> tuple of weight arrays
    compute: Any     # (accs, (*w_tile, xs)) -> accs, one float32 [bn, gt] per row


def _plain_w_tile(w: _W, w_refs, row0, bn, g0, gt, g_end):
    (ref,) = w_refs                                                         # [O, G, 32]
    ok = ((row0 + _iota(bn)) < w.O)[:, None] & ((g0 + _iota(gt)) < g_end)[None, :]
    t = pltriton.load(ref.at[pl.ds(row0, bn), pl.ds(g0, gt), pl.ds(0, QK)], mask=ok[:, :, None],
                      other=0)
    return (t.astype(F32),)


def _plain_compute(accs, tile):
    wt, xs = tile
    return tuple(acc + jnp.sum(wt * xr[None], axis=2) for acc, xr in zip(accs, xs))


def _q8_w_tile(w, w_refs, row0, bn, g0, gt, g_end):
    return q8._load_tile(w, w_refs, (), row0, bn, g0, gt, g_end)


def _mx_w_tile(w, w_refs, row0, bn, g0, gt, g_end):
    return mx._load_w_tile(w, w_refs, (), row0, bn, g0, gt, g_end)


def _x32(ref, row, g0, gt, g_end):
    return mx.load_x32(ref, row, None, g0, gt, g_end).astype(F32)


_OPS = {
    "plain": _Ops(_plain_w_tile, _plain_compute),
    "q8_0": _Ops(_q8_w_tile, q8._gemv_compute),
    "mxfp4": _Ops(_mx_w_tile, mx._mxfp4_gemv_compute),
}


def _weight_kind(w) -> str | None:
    """"plain", "q8_0", "mxfp4", or None (no fused kernel for this weight)."""
    t = getattr(w, "ggml_type", None)
    if t is not None:
        return {q8.Q8_0_TYPE: "q8_0", mx.MXFP4_TYPE: "mxfp4"}.get(int(t))
    if isinstance(w, q8.Q8Weights):
        return "q8_0"
    if isinstance(w, mx.Mxfp4Weights):
        return "mxfp4"
    dt = getattr(w, "dtype", None)
    if dt is not None and jnp.issubdtype(dt, jnp.floating) and getattr(w, "ndim", 0) == 2:
        return "plain"
    return None


def supports(x_shape, w, *, row_groups: bool = False) -> bool:
    """Whether :func:`fused_gemv` takes ``x [..., I]`` against ``w``: a 2-D plain float / Q8_0 /
    MXFP4 weight, I a multiple of 32, at most MAX_ROWS rows -- or, with ``row_groups``, up to
    :func:`group_max_rows` rows against a plain weight of at most FEW_ROWS outputs
    (:func:`max_rows`)."""
    kind = _weight_kind(w)
    rows = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
    if kind is None or x_shape[-1] % QK or getattr(w, "ndim", 2) != 2:
        return False
    limit = max_rows(kind, w.shape[0]) if row_groups and kind == "plain" else MAX_ROWS
    return rows <= limit


def max_rows(kind: str, O: int) -> int:
    """Rows :func:`fused_gemv` takes for a ``kind`` weight of O outputs (row groups: plain
    weights of at most FEW_ROWS outputs)."""
    return max(MAX_ROWS, group_max_rows()) if kind == "plain" and O <= FEW_ROWS else MAX_ROWS


def _parse(w, fn: str) -> tuple[str, _W]:
    kind = _weight_kind(w)
    if kind == "q8_0":
        return kind, q8._parse_weights(w, 0, fn)
    if kind == "mxfp4":
        return kind, mx._parse_weights(w, 0, fn)
    if kind == "plain":
        O, I = w.shape
        if I % QK:
            raise WeightsError(f"{fn}: plain weight [O={O}, I={I}]: I must be a multiple of {QK}")
        return kind, _W("plain", (jnp.asarray(w).reshape(O, I // QK, QK),), (), O, I // QK)
    raise WeightsError(f"{fn}: weight {type(w).__name__} {getattr(w, 'shape', '')}: expected a "
                       f"2-D float array, or Q8_0 / MXFP4 packed weights")


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int


def plan(kind: str, O: int, I: int, *, M: int = 1, block_n=None, block_k=None,
         num_warps=None) -> Plan:
    """Default tiling, from the H100 sweep (benchmarks/fused_sweep.py, RESULTS.md):
    ``block_n`` output rows per program, as many as keep >= 2 programs per SM (132 SMs), 2 to
    16; plain weights: ``block_k`` 256 inputs per step for rows of <= 1024 (GPT-2 124M's
    768-wide projections), else 512, 8 warps from 8 rows up; Q8_0 / MXFP4: at most 8 rows, 1024
    inputs per step and 4 warps, or 2048 and 8 warps from 4096 inputs (below).  At most
    :data:`FEW_ROWS` outputs (gpt-oss's 32-expert router): up to 4096 inputs per step, so each
    of the few programs is one step, not a chain of latency-bound ones (5.2 µs with 512); in row
    groups (M > MAX_ROWS) 8 outputs x 1024 inputs, 8 warps (64 rows x 32 experts: 5.6 µs,
    RESULTS.md twelfth session's sweep)."""
    bn = block_n or max(2, min(16, 1 << max(0, (O // (2 * mx.SM_COUNT)).bit_length() - 1)))
    if kind == "plain":
        bk, nw = (256 if I <= 1024 else 512), (8 if bn >= 8 else 4)
    else:
        # at most 8 rows; 2048 inputs / 8 warps from 4096 inputs (H100, four weight copies so
        # that L2 holds none: q/k/v 5120 x 2880 9.96 -> 9.32 µs, attention output 2880 x 4096
        # 7.86 -> 6.97 µs against 16 or 8 rows x 1024, 4 warps; RESULTS.md sixth session)
        bn = block_n or min(bn, 8)
        bk, nw = (2048, 8) if I >= 4096 else (1024, 4)
    if O <= FEW_ROWS:
        bk = 4096        # a handful of programs: one long step each, not a chain of short ones
        if M > MAX_ROWS:
            # row groups: every group re-reads the weight (from L2), so more outputs per
            # program.  H100 sweep (benchmarks/router_b64.py --sweep, 64 rows x 32 experts,
            # twelfth session): 8 outputs x 1024 inputs, 8 warps 5.64 µs; 4 x 2048 / 4 warps
            # 6.49; 4 x 1024 / 4 6.08; 8 x 1024 / 4 6.29; 4 x 2048 / 8 6.26
            bn, bk, nw = (block_n or 8), 1024, 8
    bk = block_k or min(bk, 1 << (max(QK, I) - 1).bit_length())
    nw = num_warps or nw
    for name, v in (("block_n", bn), ("block_k", bk)):
        if not mx._pow2(v):
            raise ValueError(f"fused_gemv: {name}={v} must be a power of two")
    if bk % QK:
        raise ValueError(f"fused_gemv: block_k={bk} must be a multiple of {QK}")
    return Plan(bn, bk, nw)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

def _row_stats(x_ref, row, G: int, gt: int, I: int, norm: str, eps: float):
    """(mean, rstd) of one x row in float32 (mean 0 for RMSNorm), summed over all G blocks."""
    if G <= STATS_ONE_LOAD_BLOCKS:
        # The whole row in one load (<= 4096 values): both passes reduce registers, no second
        # round trip to memory (the loop below is latency-bound: ~1 µs per pass).
        gp = 1 << (G - 1).bit_length()
        ok = (_iota(gp) < G)[:, None]
        xt = _x32(x_ref, row, 0, gp, G)

        def total(f):
            return jnp.sum(jnp.where(ok, f(xt), 0.0))
    else:
        steps = cdiv(G, gt)

        def total(f):
            def body(t, s):
                g0 = t * gt
                okt = ((g0 + _iota(gt)) < G)[:, None]                     # blocks past G: 0
                return s + jnp.sum(jnp.where(okt, f(_x32(x_ref, row, g0, gt, G)), 0.0))
            return lax.fori_loop(0, steps, body, jnp.zeros((), F32))

    n = np.float32(I)
    if norm == "rms":
        ms = total(jnp.square) / n
        return jnp.zeros((), F32), lax.rsqrt(ms + np.float32(eps))
    mean = total(lambda a: a) / n
    var = total(lambda a: jnp.square(a - mean)) / n                         # centred, as the ref
    return mean, lax.rsqrt(var + np.float32(eps))


def _normed_x(x_ref, g_ref, b_ref, row, stats, g0, gt, g_end, norm, cdt):
    """x tile [gt, 32] (float32) of row ``row``, blocks ``g0 + [0, gt)`` (0 from ``g_end`` on):
    as stored (``norm`` None), or normalised with ``stats`` (:func:`_row_stats`) and the norm
    weights (``g_ref``, and ``b_ref`` for LayerNorm, viewed [1, G, 32]), rounded to ``cdt``."""
    xt = _x32(x_ref, row, g0, gt, g_end)
    if not norm:
        return xt
    mean, rstd = stats
    g = _x32(g_ref, 0, g0, gt, g_end)
    if norm == "rms":
        h = xt * rstd * g
    else:
        h = (xt - mean) * rstd * g + _x32(b_ref, 0, g0, gt, g_end)
    return h.astype(cdt).astype(F32)


def _gelu(y, act):
    return jax.nn.gelu(y, approximate=act != "gelu_erf")      # the twin also takes "gelu_erf"


def _kernel(*refs, kind: str, w: _W, M: int, p: Plan, norm, eps, act, round_to, cdt,
            has_bias: bool, has_res: bool, norm_out: bool):
    ops = _OPS[kind]
    it = iter(refs)
    x_ref = next(it)
    w_refs = tuple(next(it) for _ in w.arrays)
    g_ref = next(it) if norm else None
    b_ref = next(it) if norm == "layer" else None
    bias_ref = next(it) if has_bias else None
    res_ref = next(it) if has_res else None
    out_ref = next(it)
    h_ref = next(it) if norm_out else None

    gt, bn = p.block_k // QK, p.block_n
    n0 = pl.program_id(0) * bn
    R = min(M, MAX_ROWS)                                   # rows of this program
    if M > R:                       # row groups: grid axis 1 picks rows base .. base + R - 1
        base = pl.program_id(1) * R
        rows = tuple(jnp.minimum(base + i, M - 1) for i in range(R))        # loads: in range
        row_ok = tuple(base + i < M for i in range(R))                      # stores: masked
    else:
        rows, row_ok = tuple(range(M)), (True,) * M
    stats = tuple(_row_stats(x_ref, r, w.G, gt, w.I, norm, eps) for r in rows) if norm else None

    first = pl.program_id(0) == 0            # read outside the loop (interpret mode needs that)

    def step(t, accs):
        g0 = t * gt
        xs = tuple(_normed_x(x_ref, g_ref, b_ref, r, stats and stats[i], g0, gt, w.G, norm, cdt)
                   for i, r in enumerate(rows))
        if norm_out:               # the programs of output block 0 keep the normalised rows
            g_ok = ((g0 + _iota(gt)) < w.G)[:, None]

            @pl.when(first)
            def _():
                for r, ok, xt in zip(rows, row_ok, xs):
                    pltriton.store(h_ref.at[_ix(r), pl.ds(g0, gt), pl.ds(0, QK)], xt.astype(cdt),
                                   mask=g_ok & ok)
        return ops.compute(accs, (*ops.w_tile(w, w_refs, n0, bn, g0, gt, w.G), xs))

    accs = lax.fori_loop(0, cdiv(w.G, gt), step, tuple(jnp.zeros((bn, gt), F32) for _ in rows))
    n_ok = (n0 + _iota(bn)) < w.O
    bias = pltriton.load(bias_ref.at[pl.ds(n0, bn)], mask=n_ok, other=0.0) if has_bias else None
    for r, ok, acc in zip(rows, row_ok, accs):
        y = jnp.sum(acc, axis=1)                                            # [bn]
        if has_bias:
            y = y + bias
        if act:
            y = _gelu(y, act)
        if round_to is not None:
            y = y.astype(round_to).astype(F32)
        if has_res:
            y = y + pltriton.load(res_ref.at[_ix(r), pl.ds(n0, bn)], mask=n_ok,
                                  other=0.0).astype(F32)
        pltriton.store(out_ref.at[_ix(r), pl.ds(n0, bn)], y, mask=n_ok & ok)


def _check(x, kind, wp: _W, norm, act, norm_weight, norm_bias, residual, fn):
    if norm not in NORMS:
        raise ValueError(f"{fn}: norm={norm!r}: expected one of {NORMS}")
    if act not in ACTS:
        raise ValueError(f"{fn}: act={act!r}: expected one of {ACTS}")
    if x.shape[-1] != wp.I:
        raise WeightsError(f"{fn}: x[..., {x.shape[-1]}] does not match the weight "
                           f"[O={wp.O}, I={wp.I}]")
    if norm and (norm_weight is None or norm_weight.shape != (wp.I,)):
        raise WeightsError(f"{fn}: norm {norm!r} needs norm_weight [{wp.I}], got "
                           f"{None if norm_weight is None else list(norm_weight.shape)}")
    if norm == "layer" and (norm_bias is None or norm_bias.shape != (wp.I,)):
        raise WeightsError(f"{fn}: LayerNorm needs norm_bias [{wp.I}]")
    if residual is not None and residual.shape != (*x.shape[:-1], wp.O):
        raise WeightsError(f"{fn}: residual {list(residual.shape)} must be "
                           f"{[*x.shape[:-1], wp.O]}")


@functools.partial(jax.jit, static_argnames=_STATIC)
def fused_gemv(x, w, bias=None, norm_weight=None, norm_bias=None, residual=None, *, norm=None,
               eps=1e-5, act=None, round_to=None, cdt=jnp.bfloat16, norm_out=False, block_n=None,
               block_k=None, num_warps=None, interpret=False):
    """``act(norm(x) @ w^T + bias)`` rounded to ``round_to``, plus ``residual`` -> float32
    ``[..., O]`` in one kernel (module docstring).  ``norm_out=True`` (needs a norm): returns
    ``(y, h)`` with h ``cdt [..., I]``, the normalised rows that the matmul consumed (written by
    the programs of the first output block), for a next kernel that needs the same input.

    x: float ``[..., I]`` with at most MAX_ROWS rows (:func:`max_rows`: up to :func:`group_max_rows`
    against a small plain weight, in row groups); w: plain float ``[O, I]``, or Q8_0 / MXFP4
    weights; bias: ``[O]`` or None; norm: None, "rms" (needs ``norm_weight [I]``) or "layer"
    (``norm_weight``, ``norm_bias [I]``), ``eps`` its epsilon; the normalised row is rounded to
    ``cdt``; act: None or "gelu_tanh"; residual: float ``[..., O]`` or None.
    """
    fn = "fused_gemv"
    kind, wp = _parse(w, fn)
    _check(x, kind, wp, norm, act, norm_weight, norm_bias, residual, fn)
    lead = x.shape[:-1]
    M = int(np.prod(lead)) if lead else 1
    if M > max_rows(kind, wp.O):
        raise ValueError(f"{fn}: {M} rows; the fused GEMV takes at most "
                         f"{max_rows(kind, wp.O)} here (use the unfused path: "
                         f"fused_gemv.supports)")
    p = plan(kind, wp.O, wp.I, M=M, block_n=block_n, block_k=block_k, num_warps=num_warps)
    def view(a, G):
        return a.reshape(a.shape[0], G, QK)

    args = [view(x.reshape(M, wp.I), wp.G), *wp.arrays]
    if norm:
        args.append(view(jnp.asarray(norm_weight, F32).reshape(1, wp.I), wp.G))
    if norm == "layer":
        args.append(view(jnp.asarray(norm_bias, F32).reshape(1, wp.I), wp.G))
    if bias is not None:
        args.append(jnp.asarray(bias, F32).reshape(wp.O))
    if residual is not None:
        args.append(residual.reshape(M, wp.O))
    if norm_out and not norm:
        raise ValueError(f"{fn}: norm_out=True needs a norm")
    kernel = functools.partial(
        _kernel, kind=kind, w=wp.static(), M=M, p=p, norm=norm, eps=float(eps), act=act,
        round_to=None if round_to is None else jnp.dtype(round_to), cdt=jnp.dtype(cdt),
        has_bias=bias is not None, has_res=residual is not None, norm_out=norm_out)
    shapes = [jax.ShapeDtypeStruct((M, wp.O), F32)]
    if norm_out:
        shapes.append(jax.ShapeDtypeStruct((M, wp.G, QK), cdt))
    grid = (cdiv(wp.O, p.block_n), cdiv(M, MAX_ROWS))               # axis 1: row groups
    outs = pl.pallas_call(kernel, out_shape=shapes, grid=grid,
                          compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                  num_stages=3),
                          interpret=interpret, name=f"fused_gemv_{kind}")(*args)
    y = outs[0].reshape(*lead, wp.O)
    return (y, outs[1].reshape(*lead, wp.I)) if norm_out else y


def _dense(kind: str, wp: _W):
    """Exact float32 [O, I] of a parsed weight."""
    if kind == "plain":
        return wp.arrays[0].reshape(wp.O, wp.I).astype(F32)
    if kind == "mxfp4":
        return mx._dense_weights(wp)
    from gptjax.quant import dequantize_q8_0

    return dequantize_q8_0(q8._ggml_blocks(wp)).reshape(wp.O, wp.I)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fused_gemv_ref(x, w, bias=None, norm_weight=None, norm_bias=None, residual=None, *,
                   norm=None, eps=1e-5, act=None, round_to=None, cdt=jnp.bfloat16, norm_out=False,
                   block_n=None, block_k=None, num_warps=None, interpret=False):
    """Plain-jnp twin of :func:`fused_gemv` (tiling arguments ignored): the norm in float32
    (``gptjax.models.layers`` formulas), the row rounded to ``cdt``, packed weights decoded
    exactly and rounded to ``cdt`` as the XLA reference path does (plain ones as they are), one
    float32-accumulated dot, bias, activation, rounding, residual."""
    del block_n, block_k, num_warps, interpret
    fn = "fused_gemv_ref"
    kind, wp = _parse(w, fn)
    _check(x, kind, wp, norm, act, norm_weight, norm_bias, residual, fn)
    from gptjax.models.layers import layer_norm, rms_norm     # the models' own norms

    if norm == "rms":
        h = rms_norm(x, norm_weight, eps, out_dtype=cdt).astype(F32)
    elif norm == "layer":
        h = layer_norm(x, norm_weight, norm_bias, eps, out_dtype=cdt).astype(F32)
    else:
        h = x.astype(F32)
    wd = _dense(kind, wp)
    if kind != "plain":                     # packed: decoded, rounded to the compute dtype
        wd = wd.astype(cdt).astype(F32)
    y = jnp.einsum("...i,oi->...o", h, wd, precision=lax.Precision.HIGHEST,
                   preferred_element_type=F32)
    if bias is not None:
        y = y + jnp.asarray(bias, F32)
    if act:
        y = _gelu(y, act)
    if round_to is not None:
        y = y.astype(round_to).astype(F32)
    if residual is not None:
        y = y + residual.astype(F32)
    return (y, h.astype(cdt)) if norm_out else y
