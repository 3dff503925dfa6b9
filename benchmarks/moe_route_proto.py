"""Prototype: what the in-kernel routing prologue of the batch-1 MoE kernels costs.

Every program of ``moe_gate_up_swiglu`` ranks the token's 32 router logits and picks its slot's
expert before its first weight load can be issued; every program of ``moe_down_combine`` picks
all four experts and their softmax weights.  Variants (H100, gpt-oss-20b shapes, 4 distinct
layers, device time per kernel from a trace):

* ``default``: the kernels as in pallas_kernels/moe_decode.py;
* ``handover``: the gate/up programs of the first row block also store their slot's expert id
  and logit; the down kernel loads the four ids and logits (no ranking, a 4-term softmax);
* ``fixed``: experts 0..3 with equal weights, no routing at all (timing only: a lower bound).
* ``down split h:n:k:w``: the down kernel over ``h`` programs per row block, each a share of
  the experts, atomically added into a zeroed output (two addends are order-independent).

Eighth session, H100: default 21.90 / 15.07 µs, handover 22.15 / 14.86, no routing 21.96 (gate/up)
and 14.55 (down); down split over 2 programs 15.29 at best against 15.16 (RESULTS.md).

    python benchmarks/moe_route_proto.py [--layers 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from gptjax.models.layers import Norm, norm_linear  # noqa: E402
from gptjax.models.moe import swiglu_oai  # noqa: E402
from pallas_kernels import moe_decode as md  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
from pallas_kernels.mxfp4_matmul import QK, _iota, cdiv  # noqa: E402
import report  # noqa: E402
from moe_decode_sweep import params  # noqa: E402

F32 = jnp.float32


def _gate_up_kernel(h_ref, logits_ref, *refs, wg, wu, up_row0, F, U, E, p, cdt, alpha, limit,
                    mode):
    n_g = len(wg.arrays)
    wg_refs, bg_ref = refs[:n_g], refs[n_g]
    wu_refs, bu_ref = refs[n_g + 1:2 * n_g + 1], refs[2 * n_g + 1]
    out_ref = refs[2 * n_g + 2]
    r, i_n = pl.program_id(0), pl.program_id(1)
    t, u = lax.div(r, np.int32(U)), lax.rem(r, np.int32(U))
    if mode == "fixed":
        e = u
    else:
        e, top = md._slot(*md._ranks(logits_ref, t, E), u, E)
    if mode == "handover":
        ids_ref, top_ref = refs[-2:]

        @pl.when(i_n == 0)
        def _():
            ids_ref[r] = e
            top_ref[r] = top
    gt, bn = p.block_k // QK, p.block_n
    n0 = i_n * bn

    def x_tile(g0):
        return mx.load_x32(h_ref, t, None, g0, gt, wg.G).astype(F32)

    gate, up = md._expert_gemvs([(wg, wg_refs, e, n0, x_tile),
                                 (wu, wu_refs, e, up_row0 + n0, x_tile)], wg.G, gt, bn)
    gate = gate + md._load_row(bg_ref, e, n0, bn, F)
    up = up + md._load_row(bu_ref, e, n0, bn, F, up_row0)
    h = swiglu_oai(gate, up, alpha=alpha, limit=limit).astype(cdt).astype(F32)
    pltriton.store(out_ref.at[r, pl.ds(n0, bn)], h, mask=(n0 + _iota(bn)) < F)


def _down_kernel(h_ref, route_ref, *refs, w, U, E, p, mode):
    n_w = len(w.arrays)
    w_refs, b_ref, res_ref, out_ref = refs[:n_w], refs[n_w], refs[n_w + 1], refs[-1]
    t, i_n = pl.program_id(0), pl.program_id(1)
    if mode == "fixed":
        ids, weights = [np.int32(u) for u in range(U)], [1.0 / U] * U
    elif mode == "handover":
        ids_ref, top_ref = route_ref
        ids = [ids_ref[t * U + u] for u in range(U)]
        top = [top_ref[t * U + u] for u in range(U)]
        ex = [jnp.exp(v - top[0]) for v in top]
        total = functools.reduce(lambda a, b: a + b, ex)
        weights = [v / total for v in ex]
    else:
        ids, weights = md._route(route_ref, t, E, U)
    gt, bn = p.block_k // QK, p.block_n
    n0 = i_n * bn
    n_ok = (n0 + _iota(bn)) < w.O
    y = pltriton.load(res_ref.at[t, pl.ds(n0, bn)], mask=n_ok, other=0.0)

    def x_tile(u):
        return lambda g0: mx.load_x32(h_ref, t * U + u, None, g0, gt, w.G).astype(F32)

    ys = md._expert_gemvs([(w, w_refs, ids[u], n0, x_tile(u)) for u in range(U)], w.G, gt, bn)
    terms = [wu * (yu + md._load_row(b_ref, e, n0, bn, w.O)) for wu, yu, e in zip(weights, ys, ids)]
    y = y + functools.reduce(lambda a, b: a + b, terms)
    pltriton.store(out_ref.at[t, pl.ds(n0, bn)], y, mask=n_ok)


def _down_split_kernel(h_ref, route_ref, *refs, w, U, E, p, halves):
    """Program (t, row block, half): the slots of one half of the U experts; half 0 adds the
    residual.  Both halves add into a zeroed output: 0 + a + b is the same in either order."""
    n_w = len(w.arrays)
    w_refs, b_ref, res_ref, out_ref = refs[:n_w], refs[n_w], refs[n_w + 1], refs[-1]
    t, i_n, half = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ids, weights = md._route(route_ref, t, E, U)
    gt, bn = p.block_k // QK, p.block_n
    n0 = i_n * bn
    n_ok = (n0 + _iota(bn)) < w.O
    per = U // halves
    res = pltriton.load(res_ref.at[t, pl.ds(n0, bn)], mask=n_ok, other=0.0)

    def x_tile(u):
        return lambda g0: mx.load_x32(h_ref, t * U + u, None, g0, gt, w.G).astype(F32)

    def part(k):
        us = range(k * per, (k + 1) * per)
        ys = md._expert_gemvs([(w, w_refs, ids[u], n0, x_tile(u)) for u in us], w.G, gt, bn)
        terms = [weights[u] * (yu + md._load_row(b_ref, ids[u], n0, bn, w.O))
                 for u, yu in zip(us, ys)]
        return functools.reduce(lambda a, b: a + b, terms)

    for k in range(halves):
        @pl.when(half == k)
        def _():
            y = part(k)
            if k == 0:
                y = res + y
            pltriton.atomic_add(out_ref, (t, pl.ds(n0, bn)), y,
                                mask=None if w.O % bn == 0 else n_ok)


def down_split(h, route, w_down, b_down, residual, *, U=4, halves=2, block_n=8, block_k=1024,
               num_warps=4, interpret=False):
    w = mx._parse_weights(w_down, 1, "proto")
    E, M = w.lead[0], residual.shape[0]
    p = md.plan("down", block_n=block_n, block_k=block_k, num_warps=num_warps)
    args = [h.reshape(M * U, w.G, QK), route, *md._weight_arrays(w, p),
            jnp.asarray(b_down, F32), residual.astype(F32), jnp.zeros((M, w.O), F32)]
    kernel = functools.partial(_down_split_kernel, w=w.static(), U=U, E=E, p=p, halves=halves)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M, w.O), F32),
                          grid=(M, cdiv(w.O, p.block_n), halves),
                          input_output_aliases={len(args) - 1: 0},
                          compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                  num_stages=1),
                          interpret=interpret, name="moe_down_combine")(*args)


def gate_up(h, logits, w_gu, b_gu, *, mode, U=4, cdt=jnp.bfloat16, interpret=False):
    wg, wu, bu, up_row0, F = md._first(w_gu, b_gu, None, None, "proto")
    E, M = wg.lead[0], h.shape[0]
    p = md.plan("gate_up")
    args = [h.reshape(M, wg.G, QK), logits.astype(F32), *md._weight_arrays(wg, p),
            jnp.asarray(b_gu, F32), *md._weight_arrays(wu, p), jnp.asarray(bu, F32)]
    kernel = functools.partial(
        _gate_up_kernel, wg=dataclasses.replace(wg.static(), O=F),
        wu=dataclasses.replace(wu.static(), O=up_row0 + F), up_row0=up_row0, F=F, U=U, E=E, p=p,
        cdt=jnp.dtype(cdt), alpha=1.702, limit=7.0, mode=mode)
    shapes = [jax.ShapeDtypeStruct((M * U, F), F32)]
    if mode == "handover":
        shapes += [jax.ShapeDtypeStruct((M * U,), jnp.int32), jax.ShapeDtypeStruct((M * U,), F32)]
    out = pl.pallas_call(kernel, out_shape=tuple(shapes), grid=(M * U, cdiv(F, p.block_n)),
                         compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                 num_stages=1),
                         interpret=interpret, name="moe_gate_up_swiglu")(*args)
    return out[0], (logits if mode != "handover" else tuple(out[1:]))


def down(h, route, w_down, b_down, residual, *, mode, U=4, interpret=False):
    w = mx._parse_weights(w_down, 1, "proto")
    E, M = w.lead[0], residual.shape[0]
    p = md.plan("down")
    args = [h.reshape(M * U, w.G, QK), route, *md._weight_arrays(w, p),
            jnp.asarray(b_down, F32), residual.astype(F32)]
    kernel = functools.partial(_down_kernel, w=w.static(), U=U, E=E, p=p, mode=mode)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((M, w.O), F32),
                          grid=(M, cdiv(w.O, p.block_n)),
                          compiler_params=pltriton.CompilerParams(num_warps=p.num_warps,
                                                                  num_stages=1),
                          interpret=interpret, name="moe_down_combine")(*args)


def block(x, p, *, gu_mode, dn_mode, interpret=False):
    norm = Norm("rms", p["post_attention_norm"]["weight"], eps=1e-5)
    logits, n = norm_linear(x, p["ffn_gate_inp"]["weight"], p["ffn_gate_inp"]["bias"],
                            norm=norm, dtype=jnp.bfloat16, return_normed=True)
    pg, pd = p["ffn_gate_up_exps"], p["ffn_down_exps"]
    h, route = gate_up(n, logits, pg["weight"].data, pg["bias"], mode=gu_mode, interpret=interpret)
    if dn_mode.startswith("split"):
        kw = dict(zip(("halves", "block_n", "block_k", "num_warps"),
                      (int(v) for v in dn_mode.split(":")[1:])))
        return down_split(h, route, pd["weight"].data, pd["bias"], x, interpret=interpret, **kw)
    return down(h, route, pd["weight"].data, pd["bias"], x, mode=dn_mode, interpret=interpret)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ps = [params(rng) for _ in range(args.layers)]
    x = jnp.asarray(rng.standard_normal((1, 2880)) * 3, jnp.float32)
    variants = [("default", "default", "default"), ("handover", "handover", "handover"),
                ("fixed gate/up, default down", "fixed", "default"),
                ("default gate/up, fixed down", "default", "fixed")]
    # down over two (four) programs per row block, each a half (quarter) of the experts, added
    # into a zeroed output (two addends: order-independent; four are not, timing only)
    variants += [(f"down split {m}", "default", f"split:{m}") for m in
                 ("2:8:1024:4", "2:8:512:4", "2:16:1024:4", "2:16:512:4", "4:8:1024:4", "4:16:1024:4")]
    fns, meta, want = {}, {}, None
    for label, gm, dm in variants:
        def f(x, ps, gm=gm, dm=dm):
            for p in ps:
                x = block(x, p, gu_mode=gm, dn_mode=dm)
            return x
        exact = "fixed" not in label and "split 4" not in label
        name, y = report.add_candidate(fns, label, f, (x, ps), want if exact else None,
                                       prefix="mrp", fresh=True,
                                       rtol=1e-4 if "split" in label else 1e-6)
        if name:
            want = y if want is None else want
            meta[name] = label
    device_us = report.device_us_per_call(fns)
    print(f"\n### MoE routing prologue (H100, {args.layers} distinct layers; µs per layer)")
    print("| variant | block | gate_up | down |\n|---|---|---|---|")
    for n, lab in meta.items():
        ks = report.BY_KERNEL.get(n, {})
        part = lambda s: sum(us for k, us in ks.items() if s in k) / args.layers  # noqa: E731
        print(f"| {lab} | {device_us[n] / args.layers:.2f} | {part('gate_up'):.2f} | "
              f"{part('down'):.2f} |")


if __name__ == "__main__":
    main()
