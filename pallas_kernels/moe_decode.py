"""The gpt-oss MoE block at decode (one or two tokens) in two Pallas kernels after the router.

Why.  At batch 1 the MoE block was ten XLA kernels around the two expert GEMVs (RMSNorm, the
router reduce, top-k as a sort, softmax, the f32 copy of x, SwiGLU, the weighted sum, the
residual add): ~10 µs of a ~52 µs layer in small kernels and their launch gaps (RESULTS.md,
third session).  Here the router logits come from the fused norm+GEMV kernel
(``layers.norm_linear``) and everything else rides in the expert kernels:

* the router: ``fused_gemv`` with the RMSNorm folded in and ``norm_out=True``, so that it also
  hands over the normalised row it consumed (written once, by its first program).
* :func:`moe_gate_up_swiglu`: one program per (token t, slot u, block of ``block_n`` expert
  features).  It finds expert ``e = top_k(logits[t])[u]`` itself (the rank of each of the E
  logits from one [E, E] comparison, in registers), streams the gate rows and the up rows of
  expert e against the normalised row (two accumulators in one K loop, the MXFP4 GEMV of
  ``mxfp4_matmul``), adds the biases and applies the clamped SwiGLU.  Out: float32
  ``[M*U, F]`` holding compute-dtype values (rounded to ``cdt``): the down kernel reads its
  inputs without a conversion per use (H100, benchmarks/moe_decode_sweep.py: down 16.3 -> 14.9
  µs against a bf16 hand-over, though every down program re-reads twice the bytes from L2).
* :func:`moe_down_combine`: one program per (token t, block of ``block_n`` model features): the
  U experts of t one after the other (down rows of expert e_u against h[t, u]), each sum plus its
  bias weighted by the softmax of the U selected logits, plus the residual.  Out: float32
  ``[M, D]``, the residual stream after the block.  No partials, no atomics: deterministic.

Math (``gptjax.models.moe``; OpenAI ``MLPBlock``; transformers ``GptOssTopKRouter`` /
``GptOssExperts``)::

    ids, top = top_k(logits[t], U)             ties: lower expert id first (lax.top_k)
    w = softmax(top)                           over the U selected logits
    n = round_c(RMSNorm(x[t]; g))             the router kernel's second output
    h[t, u] = round_c(swiglu(n @ gate_e.T + bg_e, n @ up_e.T + bu_e))       e = ids[u]
    out[t] = x[t] + sum_u w_u (h[t, u] @ down_e.T + bd_e)

Weights: MXFP4 expert stacks ``[E, O, I]`` in any layout ``mxfp4_matmul`` parses (the kernel
layout on the GPU).  The first projection is either one fused stack ``[E, 2F, D]`` (gate rows
then up rows; ``gptjax.fusion``) or two stacks; biases float ``[E, O]``.

``*_ref`` twins: the XLA composition (``lax.top_k``, ``jax.nn.softmax``, the routed experts
decoded exactly by ``mxfp4_moe_matmul_ref``, ``moe.swiglu_oai``), same signatures.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import WeightsError
from gptjax.models.moe import swiglu_oai
from pallas_kernels import mxfp4_matmul as mx
from pallas_kernels.decode_attention import next_pow2
from pallas_kernels.mxfp4_matmul import QK, _iota, _ix, cdiv

__all__ = ["moe_gate_up_swiglu", "moe_gate_up_swiglu_ref", "moe_down_combine",
           "moe_down_combine_ref", "MAX_ROWS", "Plan", "plan"]

F32 = jnp.float32
#: Tokens the decode kernels take (GEMV math; more tokens go to the grouped kernel).
MAX_ROWS = 2
_STATIC = ("n_used", "alpha", "limit", "cdt", "block_n", "block_k", "num_warps", "flat",
           "interpret")


class Plan(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    flat: bool = True       # code words loaded as [rows, blocks * 4] (mxfp4_matmul.flat_words)


def plan(stage: str, *, block_n=None, block_k=None, num_warps=None, flat=None) -> Plan:
    """Tiles.  H100, gpt-oss-20b, one token (benchmarks/moe_decode_sweep.py): gate/up 8 rows x
    512 inputs, 4 warps, one expert per program; down 8 rows (the program runs all U experts,
    so few rows keep ~2.7 waves of programs) x 1024, 4 warps; both read the code words flat
    (seventh session: gate/up 22.74 -> 21.87 µs, down 15.39 -> 15.08; two or four routed
    experts per gate/up program, sharing one x tile, were slower every time, 24.0-28.1 µs:
    fewer, fatter programs hide less latency)."""
    d = {"gate_up": Plan(8, 512, 4), "down": Plan(8, 1024, 4)}[stage]
    p = Plan(block_n or d.block_n, block_k or d.block_k, num_warps or d.num_warps,
             d.flat if flat is None else bool(flat))
    for name, v in zip(p._fields[:3], p):
        if not mx._pow2(v):
            raise ValueError(f"moe_decode: {name}={v} must be a power of two")
    if p.block_k % QK:
        raise ValueError(f"moe_decode: block_k={p.block_k} must be a multiple of {QK}")
    return p


# ---------------------------------------------------------------------------------------------
# In-kernel routing
# ---------------------------------------------------------------------------------------------

def _ranks(logits_ref, t, E: int):
    """(expert ids [Ep], logits [Ep], rank [Ep]) of token t, Ep = pow2 >= E: ``rank[i]`` = how
    many experts come before i in ``lax.top_k`` order (a larger logit, or an equal one with a
    lower id).  One [Ep, Ep] comparison and one reduction (not U rounds of max-then-argmin:
    a chain of dependent cross-warp reductions at the start of every program)."""
    Ep = next_pow2(E)
    idx = _iota(Ep)
    lg = pltriton.load(logits_ref.at[_ix(t), pl.ds(0, Ep)], mask=idx < E, other=-jnp.inf)
    li, lj = lg[:, None], lg[None, :]
    before = (lj > li) | ((lj == li) & (idx[None, :] < idx[:, None]))      # [Ep, Ep]: j before i
    return idx, lg, jnp.sum(before.astype(jnp.int32), axis=1)


def _slot(idx, lg, rank, u, E: int):
    """(expert id, logit) of top-k slot u (traced or static)."""
    sel = rank == u
    e = jnp.sum(jnp.where(sel, idx, 0))
    return jnp.minimum(e, E - 1), jnp.sum(jnp.where(sel, lg, 0.0))      # NaN logits: in range


def _route(logits_ref, t, E: int, U: int):
    """The U experts of token t and their weights: ([U int32 scalars], [U float32 scalars]), the
    softmax over the U selected logits (slot 0 holds the largest)."""
    idx, lg, rank = _ranks(logits_ref, t, E)
    ids, top = zip(*(_slot(idx, lg, rank, u, E) for u in range(U)))
    ex = [jnp.exp(v - top[0]) for v in top]
    total = functools.reduce(lambda a, b: a + b, ex)
    return list(ids), [v / total for v in ex]


def _expert_gemvs(streams, G: int, gt: int, bn: int):
    """Several expert GEMVs in one K loop: ``streams`` is a list of ``(w, w_refs, e, row0,
    x_tile)`` (rows ``row0 + [0, bn)`` of expert e, rows past ``w.O`` read 0, against the input
    given tile by tile by ``x_tile(g0) -> [gt, 32]``) -> a float32 [bn] sum per stream.  Each
    step issues every stream's loads before any arithmetic, so the streams' memory latencies
    overlap (one loop per stream would run them back to back: a program's chain of dependent
    steps is what limits these small grids)."""
    def step(s, accs):
        g0 = s * gt
        xs = {}                                   # one load per distinct x (streams share it)
        for *_, x_tile in streams:
            if x_tile not in xs:
                xs[x_tile] = x_tile(g0)
        tiles = [(*mx._load_w_tile(w, w_refs, (e,), row0, bn, g0, gt), (xs[x_tile],))
                 for w, w_refs, e, row0, x_tile in streams]
        return tuple(mx._mxfp4_gemv_compute((acc,), tile)[0] for acc, tile in zip(accs, tiles))

    accs = lax.fori_loop(0, cdiv(G, gt), step, tuple(jnp.zeros((bn, gt), F32) for _ in streams))
    return [jnp.sum(acc, axis=1) for acc in accs]


def _load_row(ref, e, n0, bn, n_out, col0=0):
    ok = (n0 + _iota(bn)) < n_out
    return pltriton.load(ref.at[e, pl.ds(col0 + n0, bn)], mask=ok, other=0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _gate_up_kernel(h_ref, logits_ref, *refs, wg, wu, up_row0, F, U, E, p, cdt, alpha, limit):
    n_g = len(wg.arrays)
    wg_refs, bg_ref = refs[:n_g], refs[n_g]
    wu_refs, bu_ref = refs[n_g + 1:2 * n_g + 1], refs[2 * n_g + 1]
    out_ref = refs[-1]
    r, i_n = pl.program_id(0), pl.program_id(1)
    t, u = lax.div(r, np.int32(U)), lax.rem(r, np.int32(U))
    e, _ = _slot(*_ranks(logits_ref, t, E), u, E)
    gt, bn = p.block_k // QK, p.block_n
    n0 = i_n * bn

    def x_tile(g0):
        return mx.load_x32(h_ref, t, None, g0, gt, wg.G).astype(F32)

    gate, up = _expert_gemvs([(wg, wg_refs, e, n0, x_tile), (wu, wu_refs, e, up_row0 + n0, x_tile)],
                             wg.G, gt, bn)
    gate = gate + _load_row(bg_ref, e, n0, bn, F)
    up = up + _load_row(bu_ref, e, n0, bn, F, up_row0)
    h = swiglu_oai(gate, up, alpha=alpha, limit=limit).astype(cdt).astype(F32)
    pltriton.store(out_ref.at[r, pl.ds(n0, bn)], h, mask=(n0 + _iota(bn)) < F)


def _down_kernel(h_ref, logits_ref, *refs, w, U, E, p):
    n_w = len(w.arrays)
    w_refs, b_ref, res_ref, out_ref = refs[:n_w], refs[n_w], refs[n_w + 1], refs[-1]
    t, i_n = pl.program_id(0), pl.program_id(1)
    ids, weights = _route(logits_ref, t, E, U)
    gt, bn = p.block_k // QK, p.block_n
    n0 = i_n * bn
    n_ok = (n0 + _iota(bn)) < w.O
    y = pltriton.load(res_ref.at[t, pl.ds(n0, bn)], mask=n_ok, other=0.0)

    def x_tile(u):
        return lambda g0: mx.load_x32(h_ref, t * U + u, None, g0, gt, w.G).astype(F32)

    ys = _expert_gemvs([(w, w_refs, ids[u], n0, x_tile(u)) for u in range(U)], w.G, gt, bn)
    terms = [wu * (yu + _load_row(b_ref, e, n0, bn, w.O)) for wu, yu, e in zip(weights, ys, ids)]
    y = y + functools.reduce(lambda a, b: a + b, terms)
    pltriton.store(out_ref.at[t, pl.ds(n0, bn)], y, mask=n_ok)


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------

def _first(w_gate, b_gate, w_up, b_up, fn):
    """(gate weight, up weight, up bias, up row offset, F) of the first projection, parsed: one
    fused stack [E, 2F, D] (``w_up`` None: up rows start at F, the bias is the fused one) or two
    stacks [E, F, D]."""
    wg = mx._parse_weights(w_gate, 1, fn)
    if w_up is None:
        if wg.O % 2 or b_gate.shape != (wg.lead[0], wg.O):
            raise WeightsError(f"{fn}: a fused gate/up stack needs [E, 2F, D] weights and an "
                               f"[E, 2F] bias, got O={wg.O}, bias {list(b_gate.shape)}")
        F = wg.O // 2
        return wg, wg, b_gate, F, F
    wu = mx._parse_weights(w_up, 1, fn)
    if (wu.lead, wu.O, wu.G) != (wg.lead, wg.O, wg.G):
        raise WeightsError(f"{fn}: gate {[*wg.lead, wg.O, wg.I]} and up {[*wu.lead, wu.O, wu.I]} "
                           f"stacks differ")
    return wg, wu, b_up, 0, wg.O


def _weight_arrays(w, p: Plan) -> tuple:
    """The kernel arguments of a parsed expert stack: its arrays, code words flat if planned."""
    return mx.flat_words(w.arrays) if p.flat else tuple(w.arrays)


def _check_route(x, logits, n_used, E, fn):
    M = x.shape[0]
    if x.ndim != 2 or M > MAX_ROWS:
        raise ValueError(f"{fn}: x must be [M <= {MAX_ROWS}, D], got {list(x.shape)}")
    if logits.shape != (M, E):
        raise WeightsError(f"{fn}: logits must be [M={M}, E={E}], got {list(logits.shape)}")
    if not 1 <= n_used <= E:
        raise ValueError(f"{fn}: n_used={n_used} must be in [1, E={E}]")


@functools.partial(jax.jit, static_argnames=_STATIC)
def moe_gate_up_swiglu(h, logits, w_gate, b_gate, w_up=None, b_up=None, *, n_used, alpha, limit,
                       cdt=jnp.bfloat16, block_n=None, block_k=None, num_warps=None, flat=None,
                       interpret=False):
    """``out[t*U + u] = round_cdt(swiglu(h_t @ gate_e.T + bg_e, h_t @ up_e.T + bu_e))`` with
    ``e = top_k(logits[t], n_used)[u]`` -> float32 ``[M*U, F]`` (values rounded to ``cdt``).
    h: float ``[M, D]``, the normalised block input in compute-dtype values (M <= MAX_ROWS;
    ``fused_gemv(..., norm_out=True)`` of the router gives it); logits float32 ``[M, E]``;
    w_gate MXFP4 ``[E, F, D]`` with w_up ``[E, F, D]``, or the fused ``[E, 2F, D]`` with w_up
    None; biases float ``[E, F]`` (fused: ``[E, 2F]``)."""
    fn = "moe_gate_up_swiglu"
    wg, wu, bu, up_row0, F = _first(w_gate, b_gate, w_up, b_up, fn)
    E, M, D = wg.lead[0], h.shape[0], h.shape[-1]
    _check_route(h, logits, n_used, E, fn)
    if D != wg.I:
        raise WeightsError(f"{fn}: h [.., {D}] does not match experts of input size {wg.I}")
    p = plan("gate_up", block_n=block_n, block_k=block_k, num_warps=num_warps, flat=flat)
    args = [h.reshape(M, wg.G, QK), logits.astype(F32), *_weight_arrays(wg, p),
            jnp.asarray(b_gate, F32), *_weight_arrays(wu, p), jnp.asarray(bu, F32)]
    # Row bounds for the masks: gate rows [0, F), up rows [up_row0, up_row0 + F).
    kernel = functools.partial(
        _gate_up_kernel, wg=dataclasses.replace(wg.static(), O=F),
        wu=dataclasses.replace(wu.static(), O=up_row0 + F), up_row0=up_row0, F=F, U=n_used, E=E, p=p,
        cdt=jnp.dtype(cdt), alpha=float(alpha), limit=float(limit))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M * n_used, F), F32),
                          grid=(M * n_used, cdiv(F, p.block_n)),
                          compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                  num_stages=1),
                          interpret=interpret, name="moe_gate_up_swiglu")(*args)


@functools.partial(jax.jit, static_argnames=_STATIC)
def moe_down_combine(h, logits, w_down, b_down, residual, *, n_used, alpha=None, limit=None,
                     cdt=jnp.bfloat16, block_n=None, block_k=None, num_warps=None, flat=None,
                     interpret=False):
    """``out[t] = residual[t] + sum_u w_u (h[t*U + u] @ down_e.T + bd_e)``, ``e, w`` from
    ``top_k`` / softmax of ``logits[t]`` -> float32 ``[M, D]``.  h: float ``[M*U, F]``; logits
    float32 ``[M, E]``; w_down MXFP4 ``[E, D, F]``; b_down float ``[E, D]``; residual float
    ``[M, D]``.  (alpha, limit, cdt: accepted for a signature shared with the first stage.)"""
    del alpha, limit, cdt
    fn = "moe_down_combine"
    w = mx._parse_weights(w_down, 1, fn)
    E, M = w.lead[0], residual.shape[0]
    _check_route(residual, logits, n_used, E, fn)
    if h.shape != (M * n_used, w.I) or residual.shape != (M, w.O) or b_down.shape != (E, w.O):
        raise WeightsError(f"{fn}: h {list(h.shape)}, residual {list(residual.shape)}, bias "
                           f"{list(b_down.shape)} do not fit experts [E={E}, D={w.O}, F={w.I}] "
                           f"with n_used={n_used}")
    p = plan("down", block_n=block_n, block_k=block_k, num_warps=num_warps, flat=flat)
    args = [h.reshape(M * n_used, w.G, QK), logits.astype(F32), *_weight_arrays(w, p),
            jnp.asarray(b_down, F32), residual.astype(F32)]
    kernel = functools.partial(_down_kernel, w=w.static(), U=n_used, E=E, p=p)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M, w.O), F32),
                          grid=(M, cdiv(w.O, p.block_n)),
                          compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                  num_stages=1),
                          interpret=interpret, name="moe_down_combine")(*args)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def _route_ref(logits, n_used):
    top, ids = lax.top_k(logits.astype(F32), n_used)
    return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


@functools.partial(jax.jit, static_argnames=_STATIC)
def moe_gate_up_swiglu_ref(h, logits, w_gate, b_gate, w_up=None, b_up=None, *, n_used, alpha,
                           limit, cdt=jnp.bfloat16, block_n=None, block_k=None, num_warps=None,
                           flat=None, interpret=False):
    """Plain-jnp twin of :func:`moe_gate_up_swiglu` (tiling arguments ignored)."""
    del block_n, block_k, num_warps, flat, interpret
    fn = "moe_gate_up_swiglu_ref"
    wg, wu, bu, up_row0, F = _first(w_gate, b_gate, w_up, b_up, fn)
    _check_route(h, logits, n_used, wg.lead[0], fn)
    ids, _ = _route_ref(logits, n_used)                                    # [M, U]
    n = h.astype(cdt)                                                      # exact: cdt values
    y1 = mx.mxfp4_moe_matmul_ref(n, mx.Mxfp4Weights(*wg.arrays), ids, b_gate)   # [M, U, O]
    if up_row0:
        gate, up = y1[..., :F], y1[..., F:]
    else:
        gate = y1
        up = mx.mxfp4_moe_matmul_ref(n, mx.Mxfp4Weights(*wu.arrays), ids, bu)
    return swiglu_oai(gate, up, alpha=alpha, limit=limit).astype(cdt).astype(F32).reshape(-1, F)


@functools.partial(jax.jit, static_argnames=_STATIC)
def moe_down_combine_ref(h, logits, w_down, b_down, residual, *, n_used, alpha=None, limit=None,
                         cdt=jnp.bfloat16, block_n=None, block_k=None, num_warps=None,
                         flat=None, interpret=False):
    """Plain-jnp twin of :func:`moe_down_combine` (tiling arguments ignored)."""
    del alpha, limit, cdt, block_n, block_k, num_warps, flat, interpret
    w = mx._parse_weights(w_down, 1, "moe_down_combine_ref")
    M = residual.shape[0]
    _check_route(residual, logits, n_used, w.lead[0], "moe_down_combine_ref")
    ids, weights = _route_ref(logits, n_used)
    hr = h.astype(F32).reshape(M * n_used, w.I)
    y = mx.mxfp4_moe_matmul_ref(hr, mx.Mxfp4Weights(*w.arrays), ids.reshape(-1, 1), b_down)
    y = y.reshape(M, n_used, w.O)
    return residual.astype(F32) + jnp.einsum("mu,mud->md", weights, y)
