"""How fast can the batch-1 MoE gate/up kernel's weights be read at all?  Pallas kernels that read
exactly what ``moe_decode.moe_gate_up_swiglu`` reads (four routed experts of gpt-oss-20b's fused
gate/up stack, kernel layout: code words uint32 [E, 2F, G, 4] and scale bytes [E, 2F, G]) with
the same grid and tiles but next to no arithmetic (an integer sum), against XLA reductions over
the same bytes and the real kernel, in one process.  If the read-only kernel is no faster than
the real one, the access pattern (grid, tiles, bytes in flight) bounds the kernel, not its
decode arithmetic.  Ablations: the real kernel's GEMV with the x tile, the block scales or the
tiles changed (:func:`_ablation_kernel`), to price each part.

H100, sixth session (RESULTS.md): read-only 15.7 µs with the real tiles (2.24 TB/s), 14.4 µs at
best (2.45 TB/s); the real kernel 22.8-23.4 µs; x = 1 instead of the x tile 17.9 µs.

    python benchmarks/moe_read_ceiling.py [--layers 4]

Each candidate runs over ``--layers`` distinct weight stacks (L2-cold, like the model); times are
per layer.  Device time from a profiler trace (report.device_us_per_call).
"""
from __future__ import annotations

import argparse
import functools
import itertools
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

from pallas_kernels import moe_decode as md  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
import report  # noqa: E402

E, D, F, U = 32, 2880, 2880, 4
G = D // 32
U32 = jnp.uint32


def _read_kernel(ids_ref, qs_ref, sc_ref, out_ref, *, bn, gt, scales):
    """Program (u, row block): the gate rows and the up rows of expert ids[u], K step by K step,
    summed as integers (one add per word)."""
    u, i_n = pl.program_id(0), pl.program_id(1)
    e = ids_ref[u]
    n0 = i_n * bn

    def step(s, acc):
        g0 = s * gt
        for row0 in (n0, F + n0):
            qs, sc = mx._load_w_tile(mx._W("split", (None, None), (E,), 2 * F, G), (qs_ref, sc_ref),
                                     (e,), row0, bn, g0, gt)
            acc = acc + jnp.sum(qs, axis=2)
            if scales:
                acc = acc + sc.astype(U32)
        return acc

    acc = lax.fori_loop(0, mx.cdiv(G, gt), step, jnp.zeros((bn, gt), U32))
    pltriton.store(out_ref.at[u, pl.ds(n0, bn)], jnp.sum(acc, axis=1), mask=(n0 + mx._iota(bn)) < F)


def read_only(ids, qs, sc, *, bn, gt, nw, scales=True):
    kernel = functools.partial(_read_kernel, bn=bn, gt=gt, scales=scales)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((U, F), U32), grid=(U, mx.cdiv(F, bn)),
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=1),
        name="read_only")(ids, qs, sc)


def _ablation_kernel(ids_ref, x_ref, qs_ref, sc_ref, out_ref, *, bn, gt, x_mode, scales):
    """The gate/up GEMV of the real kernel (two streams, same grid, same decode) with parts
    switched off or changed: x_mode "load" (a [gt, 32] tile per step, as the real kernel; Triton
    moves it through shared memory into the layout of the decoded weights), "const" (x = 1: no x
    at all), "pieces" (x pre-permuted so that each of the eight word pieces meets a [gt, 4] tile
    of its own: loads small enough for Triton to issue them in the compute layout, no shared
    memory, no joins); ``scales`` False: the block scales are not applied (nor converted)."""
    u, i_n = pl.program_id(0), pl.program_id(1)
    e = ids_ref[u]
    n0 = i_n * bn
    w = mx._W("split", (None, None), (E,), 2 * F, G)

    def block_sums(qs, g0):
        if x_mode == "pieces":                  # x [1, G, 8 (k), 4 (q)]: element 8q + k
            g_ok = ((g0 + mx._iota(gt)) < G)[:, None]
            xk = [pltriton.load(x_ref.at[0, pl.ds(g0, gt), k, pl.ds(0, 4)], mask=g_ok,
                                other=0).astype(jnp.float32)[None] for k in range(8)]
            tot = None
            for (s1, s2), pw in mx._word_pairs(qs).items():
                lo, hi = mx._lanes(pw)
                tot = lo * xk[2 * s1 + s2] if tot is None else tot + lo * xk[2 * s1 + s2]
                tot = tot + hi * xk[4 + 2 * s1 + s2]
            return jnp.sum(tot, axis=2)
        h = mx._words_fp4(qs)
        if x_mode == "const":
            return jnp.sum(h, axis=2)
        return jnp.sum(h * mx.load_x32(x_ref, 0, None, g0, gt, G).astype(jnp.float32)[None],
                       axis=2)

    def step(s, accs):
        g0 = s * gt
        out = []
        for acc, row0 in zip(accs, (n0, F + n0)):
            qs, sc = mx._load_w_tile(w, (qs_ref, sc_ref), (e,), row0, bn, g0, gt)
            y = block_sums(qs, g0)
            if scales:
                d1, d2 = mx._e8m0_split(sc)
                y = y * d1 * d2
            out.append(acc + y)
        return tuple(out)

    z = jnp.zeros((bn, gt), jnp.float32)
    g, up = lax.fori_loop(0, mx.cdiv(G, gt), step, (z, z))
    pltriton.store(out_ref.at[u, pl.ds(n0, bn)], jnp.sum(g, axis=1) + jnp.sum(up, axis=1),
                   mask=(n0 + mx._iota(bn)) < F)


def ablation(ids, x, qs, sc, *, bn=8, gt=16, nw=4, x_mode="load", scales=True):
    kernel = functools.partial(_ablation_kernel, bn=bn, gt=gt, x_mode=x_mode, scales=scales)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((U, F), jnp.float32), grid=(U, mx.cdiv(F, bn)),
        compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=1),
        name="ablation")(ids, x, qs, sc)


def x_view(x, x_mode):
    """x [1, D] as the kernel reads it: [1, G, 32], or permuted [1, G, 8, 4] for "pieces"."""
    if x_mode == "pieces":
        return x.reshape(1, G, 4, 8).transpose(0, 1, 3, 2)
    return x.reshape(1, G, 32)


def xla_gather_sum(ids, qs, sc):
    """XLA: each routed expert's slab summed (dynamic slices, one reduce each)."""
    outs = []
    for u in range(U):
        q = lax.dynamic_index_in_dim(qs, ids[u], keepdims=False)          # [2F, G, 4]
        s = lax.dynamic_index_in_dim(sc, ids[u], keepdims=False)
        outs.append(jnp.sum(q, axis=(1, 2), dtype=U32) + jnp.sum(s, axis=1, dtype=U32))
    return jnp.stack(outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(args.layers):
        qs = jnp.asarray(rng.integers(0, 2 ** 32, (E, 2 * F, G, 4), dtype=np.uint32))
        sc = jnp.asarray(rng.integers(118, 128, (E, 2 * F, G), dtype=np.uint8))
        layers.append((qs, sc))
    ids = [jnp.asarray(rng.choice(E, U, replace=False).astype(np.int32)) for _ in layers]
    # logits whose top-U are ids, in order (for the real kernel)
    logits = []
    for i in ids:
        lg = np.zeros((1, E), np.float32)
        lg[0, np.asarray(i)] = np.arange(U, 0, -1, dtype=np.float32) + 1.0
        logits.append(jnp.asarray(lg))
    bias = jnp.zeros((E, 2 * F), jnp.float32)
    h = jnp.asarray(rng.standard_normal((1, D)), jnp.bfloat16)
    nbytes = U * 2 * F * G * 17

    def over_layers(f):
        def g(ls, ids, logits):
            return [f(i, q, s, lg) for (q, s), i, lg in zip(ls, ids, logits)]
        return g

    def real(**kw):
        return over_layers(lambda i, q, s, lg: md.moe_gate_up_swiglu(
            h, lg, mx.Mxfp4Weights(q, s), bias, n_used=U, alpha=1.702, limit=7.0, **kw))

    cands = [("XLA dynamic slice + reduce",
              over_layers(lambda i, q, s, lg: xla_gather_sum(i, q, s))),
             ("real gate/up kernel (default plan)", real())]
    cands += [(f"real gate/up kernel bn={bn} block_k={bk} warps={nw}",
               real(block_n=bn, block_k=bk, num_warps=nw))
              for bn, bk, nw in ((8, 256, 4), (4, 512, 4), (8, 512, 8), (16, 512, 8))]
    for (bn, gt, nw), scales in itertools.product(((8, 16, 4), (4, 32, 4), (8, 16, 8)),
                                                  (True, False)):
        cands.append((f"read-only bn={bn} block_k={gt * 32} warps={nw} scales={scales}",
                      over_layers(lambda i, q, s, lg, bn=bn, gt=gt, nw=nw, scales=scales:
                                  read_only(i, q, s, bn=bn, gt=gt, nw=nw, scales=scales))))
    abl = [dict(), dict(x_mode="const"), dict(x_mode="const", scales=False),
           dict(x_mode="pieces"), dict(x_mode="pieces", scales=False)]
    abl += [dict(bn=bn, gt=gt, nw=nw) for bn, gt, nw in ((8, 8, 4), (4, 16, 4), (8, 16, 8))]
    for kw in abl:
        xv = x_view(h, kw.get("x_mode", "load"))
        cands.append((f"ablation {kw}", over_layers(
            lambda i, q, s, lg, kw=kw, xv=xv: ablation(i, xv, q, s, **kw))))
    fns, meta = {}, {}
    want = None
    for label, f in cands:
        # the ablations that compute the real sums (x loaded, scales on) must agree
        same = label.startswith("ablation") and not any(k in label for k in ("const", "False"))
        name, y = report.add_candidate(fns, label, f, (layers, ids, logits),
                                       want if same else None, prefix="rc", rtol=1e-5)
        if same and want is None:
            want = y
        if name:
            meta[name] = (f"gate/up read, 4 experts ({nbytes / 1e6:.1f} MB) per layer", label,
                          nbytes)
    times = {n: us / args.layers for n, us in report.device_us_per_call(fns).items()}
    report.print_ranked(times, meta, "real gate/up kernel (default plan)", top=30)


if __name__ == "__main__":
    main()
