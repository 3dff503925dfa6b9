"""Q8_0 dense matmul tiles at batch-decode row counts (gpt-oss-20b attention projections and the
output head at 16 / 64 rows): device time per call from a profiler trace, default plan vs a
grid, in one process.

    python benchmarks/dense_rows_sweep.py [--rows 64] [--head] [--copies 4] [--wide] [--asm] [--big]

``--copies N``: every candidate runs on N distinct copies of the weight one after the other
(times are per copy), so that the 12-16 MB projections are not served from the 50 MB L2 as they
are when one copy is timed again and again (the fourth session's sweep that chose the 64-row
plan did that; in the model these kernels read from HBM, at ~0.6 TB/s at batch 64, ninth
session).  ``--wide``: more splits and narrower tiles (more programs per wave).  ``--asm``: a few
tiles each with the dot mode's inline-PTX decode (``q8_matmul.ASM_Q8_DECODE``) on and off.
``--big``: 256-wide output tiles too (every tile re-reads its 64 x rows: at 64 x 128 tiles as
many bytes of x as of weights).  ``--swap``: the swapped dot's tiles (``swap=True``) and
the default without it (``swap=False``). ``--gemv-head``: batch-1 GEMV tiles for the vocab head
alone, with XLA's max over the same bytes for comparison (on the H200 slower than the kernel).
``--xla``: XLA's own fusion of the same matmul (the exact decode ``round_bf16(q * d)`` written
in jnp in front of one dot, no Pallas) and a plain bf16 dot on already-decoded weights (twice
the bytes), with the kernels each one launched.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import q8_matmul as q8  # noqa: E402
from pallas_kernels.mxfp4_matmul import plan_dense  # noqa: E402
from report import (BY_KERNEL, add_candidate, device_us_per_call, gpt_oss_q8_shapes,  # noqa: E402
                    print_ranked)
from jax import lax  # noqa: E402


def q8w(rng, O, I):
    return q8.Q8Weights(jnp.asarray(rng.integers(0, 256, (O, I // 32, 32), dtype=np.uint8)),
                        jnp.asarray(rng.uniform(1e-3, 1e-2, (O, I // 32)).astype(np.float16)))


def xla_dot(x, w):
    """x [M, I] bf16 @ Q8Weights [O, G, 32]: the exact decode as plain jnp, one XLA dot."""
    q = lax.bitcast_convert_type(w.qs, jnp.int8).astype(jnp.float32)
    wd = (q * w.scales.astype(jnp.float32)[..., None]).astype(x.dtype)
    wd = wd.reshape(wd.shape[0], -1)
    return jnp.einsum("mi,oi->mo", x, wd, preferred_element_type=jnp.float32)


def dense_dot(x, wd):
    return jnp.einsum("mi,oi->mo", x, wd, preferred_element_type=jnp.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64")
    ap.add_argument("--head", action="store_true", help="also the 201088-row output head")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--wide", action="store_true")
    ap.add_argument("--asm", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--xla", action="store_true")
    ap.add_argument("--swap8", action="store_true",
                    help="swapped-dot tiles at 64 rows with 8 warps / wider steps")
    ap.add_argument("--swap", action="store_true",
                    help="the swapped dot (Plan.swap) over a grid of tiles, vs the default")
    ap.add_argument("--gemv-head", action="store_true",
                    help="batch-1 GEMV tiles of the output head only (rows 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = gpt_oss_q8_shapes(head=args.head or args.gemv_head)
    grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
            for bm, bn, bk, w, s in itertools.product((16, 64), (32, 64, 128), (64, 128),
                                                      (4, 8), (1, 4))]
    if args.wide:
        grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
                for bm, bn, bk, w, s in itertools.product((32, 64), (32, 64, 128), (64, 128),
                                                          (4, 8), (2, 4, 8))]
    if args.big:
        grid = [dict(block_m=64, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
                for bn, bk, w, s in itertools.product((128, 256), (32, 64), (4, 8), (1, 4, 8))]
    if args.xla:
        grid = []
    if args.swap:
        grid = [dict(block_m=bm, block_n=64, block_k=bk, num_warps=4, k_splits=s, swap=True)
                for bm, bk, s in itertools.product((16, 32, 64), (64, 128), (1, 2, 4, 8))]
    if args.swap8:
        grid = [dict(block_m=64, block_n=bn, block_k=bk, num_warps=w, k_splits=sp, swap=True)
                for bn, bk, w, sp in ((64, 128, 4, 4), (128, 128, 8, 2), (128, 128, 8, 4),
                                      (128, 64, 8, 4), (128, 64, 8, 8), (64, 128, 8, 4),
                                      (64, 256, 4, 2), (64, 256, 4, 4), (128, 256, 8, 2),
                                      (64, 128, 4, 1), (128, 128, 8, 1), (64, 256, 4, 1),
                                      (128, 256, 8, 1))]
    if args.gemv_head:      # the head alone, one row: GEMV tiles (no split: 6,284 programs)
        shapes = {k: v for k, v in shapes.items() if k.startswith("head")}
        args.rows = "1"
        grid = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, prefetch=pf)
                for bn, bk, w, st, pf in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8),
                                                           (3,), (False,))
                if bn * bk <= 32768]
        grid += [dict(block_n=32, block_k=256, num_warps=4, num_stages=st, prefetch=pf)
                 for st, pf in ((4, False), (2, False), (3, True))]
        grid += [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=4, prefetch=False)
                 for bn, bk, w in ((16, 512, 8), (32, 512, 8), (16, 1024, 8), (64, 256, 8))]
        grid += [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, prefetch=pf)
                 for bn, bk, w, st, pf in ((16, 2048, 4, 3, False), (16, 1024, 2, 3, False),
                                           (8, 1024, 4, 3, False), (8, 2048, 4, 3, False),
                                           (16, 1024, 4, 4, False), (16, 1024, 4, 2, False),
                                           (16, 1024, 4, 3, True), (32, 1024, 4, 3, False),
                                           (32, 1024, 8, 3, False), (8, 2048, 2, 3, False))]
    if args.asm:
        few = [{}, dict(block_m=64, block_n=128, block_k=64, num_warps=4, k_splits=8),
               dict(block_m=32, block_n=64, block_k=128, num_warps=4, k_splits=4),
               dict(block_m=64, block_n=64, block_k=128, num_warps=4, k_splits=8)]
        grid = [dict(c, asm=a) for c in few for a in (False, True)]
    fns, meta = {}, {}
    for sname, (O, I) in shapes.items():
        w = q8w(rng, O, I)
        ws = [w] + [q8w(rng, O, I) for _ in range(args.copies - 1)]     # distinct buffers
        nbytes = O * I // 32 * 34
        for M in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
            ref = np.stack([np.asarray(q8.q8_0_matmul_ref(x, w)) for w in ws])   # [copies, M, O]
            cands = [("default", {})] * (not args.asm) + [
                (str(c), c) for c in grid
                if not (sname.startswith("head") and c.get("k_splits", 1) > 1)
                and c.get("block_m", 0) <= max(16, M)
                and (args.gemv_head or c.get("block_m", 0) > 0)
                and not ((args.swap or args.swap8) and c["k_splits"] == 1
                         and not sname.startswith("head"))]
            if args.swap:
                cands.append(("unswapped default", dict(swap=False)))
            for label, c in cands:
                c = dict(c)
                q8.ASM_Q8_DECODE = c.pop("asm", True)      # read at trace time (fresh below)
                name, _ = add_candidate(fns, f"{sname} M={M} {label}",
                                        lambda x, ws, c=c: [q8.q8_0_matmul(x, w, **c)
                                                            for w in ws], (x, ws), ref,
                                        rtol=2e-2, prefix="drs", fresh=args.asm)
                if name:
                    meta[name] = (f"{sname} M={M}", label, nbytes)
            if args.xla:
                name, _ = add_candidate(fns, f"{sname} M={M} xla", lambda x, ws: [
                    xla_dot(x, w) for w in ws], (x, ws), ref, rtol=2e-2, prefix="drs")
                if name:
                    meta[name] = (f"{sname} M={M}", "xla dequant + dot", nbytes)
                wds = [(q8.q8_values(w.qs) * w.scales.astype(jnp.float32)[..., None]).astype(
                    jnp.bfloat16).reshape(O, I) for w in ws]
                name, _ = add_candidate(fns, f"{sname} M={M} bf16", lambda x, wds: [
                    dense_dot(x, wd) for wd in wds], (x, wds), ref, rtol=2e-2, prefix="drs")
                if name:
                    meta[name] = (f"{sname} M={M}", "bf16 weights, one dot (2x bytes)", nbytes)
            if args.gemv_head:     # XLA reading the same bytes (max), for comparison
                name, _ = add_candidate(fns, f"{sname} read", lambda x, ws: [
                    jnp.max(w.qs) + jnp.max(w.scales) for w in ws], (x, ws), prefix="drs")
                if name:
                    meta[name] = (f"{sname} M={M}", "xla read ceiling (max over the bytes)",
                                  nbytes)
            print(f"{sname} M={M}: default plan {plan_dense(M, O, I)}")
    times = {n: us / args.copies for n, us in device_us_per_call(fns, reps=10).items()}
    print_ranked(times, meta, "{'asm': False}" if args.asm else "default", top=6 + 6 * args.asm,
                 keep=("xla dequant + dot", "bf16 weights, one dot (2x bytes)",
                       "xla read ceiling (max over the bytes)"))
    for name, (case, label, _) in meta.items():
        if label.startswith(("xla", "bf16", "default")):
            ks = sorted(BY_KERNEL.get(name, {}).items(), key=lambda kv: -kv[1])
            print(f"{case} {label}: " + ", ".join(f"{k} {v / args.copies:.2f}" for k, v in ks[:5]))

if __name__ == "__main__":
    main()
