"""Why the 64-row Q8_0 dot runs at ~0.65 TB/s: the same kernel structure with the decode taken
out, at gpt-oss-20b attention-projection shapes, L2-cold (distinct weight copies), device time
per call from a profiler trace.

Candidates per shape (64 bf16 rows):

* ``q8 default``: ``q8_0_matmul`` with its default plan (incl. the XLA split-K sum);
* ``q8 no scales``: the same kernel with the scale loads replaced by 1.0 (timing only: wrong
  values; shows what the per-step scale tile costs);
* ``bf16 pallas``: a Pallas kernel with the Q8_0 dot's grid and loop (x tile [bm, bk], weight
  tile [bn, bk] loaded as bf16, one tensor-core dot per step, split-K partials + XLA sum) on
  decoded bf16 weights: twice the bytes, no decode;
* ``xla bf16``: XLA's own dot on the decoded bf16 weights (its autotuned GEMM; the chosen
  config is printed).

    python benchmarks/q8_rows_ablation.py [--copies 4]
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from pallas_kernels import q8_matmul as q8  # noqa: E402
from pallas_kernels.mxfp4_matmul import _W, _dot_nt, _iota, cdiv, load_x32  # noqa: E402
from report import (BY_KERNEL, add_candidate, device_us_per_call, gpt_oss_q8_shapes,  # noqa: E402
                    print_ranked)

F32 = jnp.float32


def _bf16_kernel(x_ref, w_ref, o_ref, *, M, O, I, bm, bn, bk, steps, splits):
    i_m, i_n, i_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0, k_first = i_m * bm, i_n * bn, i_s * steps * bk
    m_ok = (m0 + _iota(bm)) < M
    n_ok = (n0 + _iota(bn)) < O

    def body(t, acc):
        k0 = k_first + t * bk
        k_ok = (k0 + _iota(bk)) < I
        xt = pltriton.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                           mask=m_ok[:, None] & k_ok[None, :], other=0)
        wt = pltriton.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)],
                           mask=n_ok[:, None] & k_ok[None, :], other=0)
        return acc + _dot_nt(xt, wt, False)

    y = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), F32))
    pltriton.store(o_ref.at[i_s, pl.ds(m0, bm), pl.ds(n0, bn)], y,
                   mask=m_ok[:, None] & n_ok[None, :])


def _split_k_call(kern, args, name, *, M, O, bm, bn, splits, warps, stages):
    """One program per (row block, output block, K split); float32 partials [splits, M, O],
    summed by XLA (as the Q8_0 kernel's split-K)."""
    y = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((splits, M, O), F32),
                       grid=(cdiv(M, bm), cdiv(O, bn), splits),
                       compiler_params=pltriton.CompilerParams(num_warps=warps,
                                                               num_stages=stages),
                       name=name)(*args)
    return y.sum(axis=0)


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "splits", "warps", "stages"))
def bf16_pallas(x, w, *, bm=64, bn=128, bk=64, splits=7, warps=4, stages=3):
    M, I = x.shape
    O = w.shape[0]
    steps = cdiv(cdiv(I, bk), splits)
    kern = functools.partial(_bf16_kernel, M=M, O=O, I=I, bm=bm, bn=bn, bk=bk, steps=steps,
                             splits=splits)
    return _split_k_call(kern, (x, w), "bf16_pallas", M=M, O=O, bm=bm, bn=bn, splits=splits,
                         warps=warps, stages=stages)




def _q8_swap_kernel(x_ref, qs_ref, sc_ref, o_ref, *, M, O, G, bm, bn, gt, steps, x2d, pack):
    """The Q8_0 dot with the operands swapped: out^T [bn, bm] += W [bn, bk] . x^T, so that the
    decoded weight tile is the wgmma's register operand (A) and x the shared-memory one (B).
    The prototype of ``q8_matmul``'s swapped dot (``Plan.swap``, which keeps x2d and pack 2),
    kept for the variants it dropped: a 3-D x tile, the four-byte decode."""
    i_m, i_n, i_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0, n0, g_first = i_m * bm, i_n * bn, i_s * steps * gt
    m_ok = (m0 + _iota(bm)) < M
    n_ok = (n0 + _iota(bn)) < O
    wv = _W("split", (None, None), (), O, G)

    def body(t, acc):
        g0 = g_first + t * gt
        wt = q8._decoded_tile(wv, (qs_ref, sc_ref), n0, bn, g0, gt, jnp.bfloat16, False, pack)
        if x2d:
            k_ok = (g0 * 32 + _iota(gt * 32)) < G * 32
            xt = pltriton.load(x_ref.at[pl.ds(m0, bm), pl.ds(g0 * 32, gt * 32)],
                               mask=m_ok[:, None] & k_ok[None, :], other=0)
        else:
            xt = load_x32(x_ref, pl.ds(m0, bm), m_ok, g0, gt, G).reshape(bm, gt * 32)
        return acc + _dot_nt(wt, xt, False)                                # [bn, bm]

    y = lax.fori_loop(0, steps, body, jnp.zeros((bn, bm), F32))
    pltriton.store(o_ref.at[i_s, pl.ds(m0, bm), pl.ds(n0, bn)], y.T,
                   mask=m_ok[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "splits", "warps", "stages",
                                             "x2d", "pack"))
def q8_swapped(x, w, *, bm=64, bn=128, bk=64, splits=7, warps=4, stages=3, x2d=True, pack=4):
    M, I = x.shape
    O, G = w.scales.shape
    gt = bk // 32
    steps = cdiv(cdiv(G, gt), splits)
    kern = functools.partial(_q8_swap_kernel, M=M, O=O, G=G, bm=bm, bn=bn, gt=gt, steps=steps,
                             x2d=x2d, pack=pack)
    args = (x if x2d else x.reshape(M, G, 32), w.qs, w.scales)
    return _split_k_call(kern, args, "q8_swapped", M=M, O=O, bm=bm, bn=bn, splits=splits,
                         warps=warps, stages=stages)


def xla_dot(x, wd):
    return jnp.einsum("mi,oi->mo", x, wd, preferred_element_type=F32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--swap-only", action="store_true",
                    help="the swapped kernel's tiles (+ default, one bf16 row), and the head")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = gpt_oss_q8_shapes(head=args.swap_only)
    fns, meta = {}, {}
    M = 64
    real_load_tile = q8._load_tile

    def unscaled_load_tile(w, w_refs, lead, row0, bn, g0, gt, g_end=None):
        qs, d = real_load_tile(w, w_refs, lead, row0, bn, g0, gt, g_end)
        return qs, jnp.ones(d.shape, F32)          # the scale load is dead: DCE drops it

    for sname, (O, I) in shapes.items():
        ws = [q8.Q8Weights(jnp.asarray(rng.integers(0, 256, (O, I // 32, 32), dtype=np.uint8)),
                           jnp.asarray(rng.uniform(1e-3, 1e-2, (O, I // 32)).astype(np.float16)))
              for _ in range(args.copies)]
        wds = [(q8.q8_values(w.qs) * w.scales.astype(F32)[..., None]).astype(jnp.bfloat16)
               .reshape(O, I) for w in ws]
        nbytes = O * I // 32 * 34
        x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
        ref = np.stack([np.asarray(q8.q8_0_matmul_ref(x, w)) for w in ws])
        case = f"{sname} M={M}"

        def add(label, f, a, want=ref, fresh=False):
            name, _ = add_candidate(fns, f"{case} {label}", f, a, want, rtol=2e-2, prefix="qra",
                                    fresh=fresh)
            if name:
                meta[name] = (case, label, nbytes)
            return name

        add("q8 default", lambda x, ws: [q8.q8_0_matmul(x, w) for w in ws], (x, ws))
        if not args.swap_only:
            for s in (1, 2, 4, 8):
                add(f"q8 64x128x64 splits {s}", lambda x, ws, s=s: [
                    q8.q8_0_matmul(x, w, block_m=64, block_n=128, block_k=64, k_splits=s)
                    for w in ws], (x, ws))
            q8._load_tile = unscaled_load_tile
            add("q8 no scales (wrong values)", lambda x, ws: [q8.q8_0_matmul(x, w) for w in ws],
                (x, ws), want=None, fresh=True)
            q8._load_tile = real_load_tile
            jax.clear_caches()
        bf16_grid = ((128, 64, 4, 4, 3),) if args.swap_only else (
            (128, 64, 7, 4, 3), (128, 64, 1, 4, 3), (128, 64, 4, 4, 3), (64, 64, 7, 4, 3),
            (128, 128, 4, 4, 3), (64, 128, 4, 4, 4), (128, 64, 7, 4, 5), (256, 64, 4, 8, 3))
        head = sname.startswith("head")
        for bn, bk, s, wp, st in bf16_grid:
            s = 1 if head else s
            add(f"bf16 pallas {bn}x{bk} splits {s} w{wp} s{st}", lambda x, wds, c=(bn, bk, s, wp, st): [
                bf16_pallas(x, wd, bn=c[0], bk=c[1], splits=c[2], warps=c[3], stages=c[4])
                for wd in wds], (x, wds))
        swaps = [(bn, bk, sp, wp, True, p2) for bn, bk, sp, wp in (
            (64, 64, 7, 4), (64, 128, 7, 4), (64, 64, 8, 4), (128, 64, 8, 4), (64, 64, 4, 4),
            (64, 128, 4, 4), (128, 128, 4, 4)) for p2 in (False, True)]
        if not args.swap_only:
            swaps += [(128, 64, 7, 4, False, False), (256, 64, 4, 8, True, False)]
        if head:
            swaps = [(bn, bk, 1, wp, True, p2) for bn, bk, wp in (
                (64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 4)) for p2 in (False, True)]
        for bn, bk, sp, wp, x2, p2 in swaps:
            add(f"q8 swapped {bn}x{bk} splits {sp} w{wp} x2d {x2} pack{2 if p2 else 4}",
                lambda x, ws, c=(bn, bk, sp, wp, x2, 2 if p2 else 4): [
                    q8_swapped(x, w, bn=c[0], bk=c[1], splits=c[2], warps=c[3], x2d=c[4],
                               pack=c[5])
                    for w in ws], (x, ws))
        name = add("xla bf16", lambda x, wds: [xla_dot(x, wd) for wd in wds], (x, wds))
        if name:
            txt = jax.jit(xla_dot).lower(x, wds[0]).compile().as_text()
            cfgs = sorted(set(re.findall(r'"triton_gemm_config":\{[^}]*\}', txt)))
            print(f"{case} xla bf16 configs: {cfgs or 'none (cuBLAS?)'}")
            calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt)))
            print(f"{case} xla bf16 custom calls: {calls}")
    times = {n: us / args.copies for n, us in device_us_per_call(fns, reps=10).items()}
    print_ranked(times, meta, "q8 default", top=30)
    for name, (case, label, _) in meta.items():
        ks = sorted(BY_KERNEL.get(name, {}).items(), key=lambda kv: -kv[1])
        print(f"{case} {label}: " + ", ".join(f"{k} {v / args.copies:.2f}" for k, v in ks[:4]))


if __name__ == "__main__":
    main()
