"""Tile sweep of the decode matmul kernels at gpt-oss-20b's batch-1 shapes, timed from a profiler
trace (device time of every kernel the call launches: the Pallas kernel plus any split-K sum),
so launch gaps and host overhead do not blur small kernels.

    python benchmarks/tile_sweep.py [--quick]

Shapes (kernel layout, random bytes): MoE "pairs" gate_up [32 experts, 5760, 2880] and down
[32, 2880, 2880] with 4 distinct routed experts of one token; Q8_0 GEMV 5120 x 2880 (fused
q/k/v) and 2880 x 4096 (attention output).  Bandwidth counts the weight bytes read (4 experts
for the MoE) against the measured 2.6 TB/s.  Prints, per shape, every config sorted by time.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.mxfp4_matmul import Mxfp4Weights, mxfp4_moe_matmul  # noqa: E402
from pallas_kernels.q8_matmul import Q8Weights, q8_0_matmul  # noqa: E402
from report import device_us_per_call  # noqa: E402

PEAK = 2.6e12
REPS = 20


def mxfp4_w(rng, e, o, i):
    return Mxfp4Weights(jnp.asarray(rng.integers(0, 256, (e, o, i // 32, 16), dtype=np.uint8)),
                        jnp.asarray(rng.integers(118, 123, (e, o, i // 32), dtype=np.uint8)))


def q8_w(rng, o, i):
    return Q8Weights(jnp.asarray(rng.integers(0, 256, (o, i // 32, 32), dtype=np.uint8)),
                     jnp.asarray(rng.uniform(1e-3, 1e-2, (o, i // 32)).astype(np.float16)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    D = 2880
    ids = jnp.asarray([[3, 17, 8, 29]], jnp.int32)
    x = jnp.asarray(rng.standard_normal((1, D)), jnp.bfloat16)
    shapes = {
        "moe gate_up 4x5760x2880": (mxfp4_w(rng, 32, 5760, D), 4 * 5760 * D * 17 // 32,
                                    lambda w, xx, **c: mxfp4_moe_matmul(xx, w, ids, mode="pairs", **c)),
        "moe down 4x2880x2880": (mxfp4_w(rng, 32, D, D), 4 * D * D * 17 // 32,
                                 lambda w, xx, **c: mxfp4_moe_matmul(
                                     jnp.broadcast_to(xx, (4, D)), w, ids.reshape(4, 1), mode="pairs", **c)),
        "q8 qkv 5120x2880": (q8_w(rng, 5120, D), 5120 * D * 34 // 32,
                             lambda w, xx, **c: q8_0_matmul(xx, w, mode="gemv", **c)),
        "q8 out 2880x4096": (q8_w(rng, D, 4096), D * 4096 * 34 // 32,
                             lambda w, xx, **c: q8_0_matmul(jnp.tile(xx, (1, 2))[:, :4096], w, mode="gemv", **c)),
    }
    grid = dict(block_n=[16, 32, 64], block_k=[256, 512], k_splits=[1, 2, 3], num_warps=[4, 8],
                prefetch=[True, False])
    if args.quick:
        grid = dict(block_n=[32, 64], block_k=[256, 512], k_splits=[1, 3], num_warps=[4], prefetch=[True])
    configs = [{}] + [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    ggrid = dict(block_m=[16, 32, 64, 128], block_n=[64, 128], block_k=[64, 128], num_warps=[4, 8],
                 num_stages=[2, 3])
    if args.quick:
        ggrid = dict(block_m=[16, 64], block_n=[64, 128], block_k=[64, 128], num_warps=[4], num_stages=[3])
    gconfigs = [{}] + [dict(zip(ggrid, v)) for v in itertools.product(*ggrid.values())]
    wg = shapes["moe gate_up 4x5760x2880"][0]
    for T in (64, 512):                       # batch-64 decode, pp512: top-4 of 32, random routing
        gids = jnp.asarray(np.argsort(rng.random((T, 32)), axis=1)[:, :4], jnp.int32)
        xt = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
        shapes[f"moe grouped gate_up T={T}"] = (
            wg, 32 * 5760 * D * 17 // 32,
            lambda w, xx, gids=gids, xt=xt, **c: mxfp4_moe_matmul(xt, w, gids, mode="grouped", **c))
    fns = {}
    for sname, (w, nbytes, call) in shapes.items():
        for ci, c in enumerate(gconfigs if "grouped" in sname else configs):
            def f(w, xx, c=c, call=call):
                return call(w, xx, **c)
            f.__name__ = f"sweep_{abs(hash(sname)) % 10**6}_{ci}"
            fn = jax.jit(f)
            try:
                jax.block_until_ready(fn(w, x))                    # compile + warm
                fns[f.__name__] = (sname, c, fn, w, nbytes)
            except Exception as e:                                 # report, keep sweeping
                print(f"{sname} {c}: {type(e).__name__}: {str(e)[:120]}")
    times = device_us_per_call({name: (v[2], (v[3], x)) for name, v in fns.items()}, REPS)
    results = collections.defaultdict(list)
    for name, (sname, c, fn, w, nbytes) in fns.items():
        results[sname].append((times[name] * 1e3, c, nbytes))
    for sname, rs in results.items():
        rs.sort(key=lambda r: r[0])
        print(f"\n### {sname} (device µs per call; weight bytes {rs[0][2] / 1e6:.1f} MB)")
        print("| µs | TB/s | % of 2.6 | config |\n|---|---|---|---|")
        dflt = [r for r in rs if not r[1]]
        if dflt:
            print(f"| {dflt[0][0] / 1e3:.2f} | | | default (plan_dense / plan_moe) |")
        for ns, c, nbytes in rs[:12]:
            if ns <= 0:
                continue
            bw = nbytes / (ns * 1e-9)
            print(f"| {ns / 1e3:.2f} | {bw / 1e12:.2f} | {bw / PEAK:.0%} | {c} |")


if __name__ == "__main__":
    main()
