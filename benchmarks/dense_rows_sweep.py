"""Q8_0 dense matmul tiles at batch-decode row counts (gpt-oss-20b attention projections and the
output head at 16 / 64 rows): device time per call from a profiler trace, default plan vs a
grid, in one process.

    python benchmarks/dense_rows_sweep.py [--rows 64] [--head] [--copies 4] [--wide]

``--copies N``: every candidate runs on N distinct copies of the weight one after the other
(times are per copy), so that the 12-16 MB projections are not served from the 50 MB L2 as they
are when one copy is timed again and again (the fourth session's sweep that chose the 64-row
plan did that; in the model these kernels read from HBM, at ~0.6 TB/s at batch 64, ninth
session).  ``--wide``: more splits and narrower tiles (more programs per wave).
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
from report import add_candidate, device_us_per_call, print_ranked  # noqa: E402


def q8w(rng, O, I):
    return q8.Q8Weights(jnp.asarray(rng.integers(0, 256, (O, I // 32, 32), dtype=np.uint8)),
                        jnp.asarray(rng.uniform(1e-3, 1e-2, (O, I // 32)).astype(np.float16)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64")
    ap.add_argument("--head", action="store_true", help="also the 201088-row output head")
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--wide", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = {"qkv 5120x2880": (5120, 2880), "out 2880x4096": (2880, 4096)}
    if args.head:
        shapes["head 201088x2880"] = (201088, 2880)
    grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
            for bm, bn, bk, w, s in itertools.product((16, 64), (32, 64, 128), (64, 128),
                                                      (4, 8), (1, 4))]
    if args.wide:
        grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
                for bm, bn, bk, w, s in itertools.product((32, 64), (32, 64, 128), (64, 128),
                                                          (4, 8), (2, 4, 8))]
    fns, meta = {}, {}
    for sname, (O, I) in shapes.items():
        w = q8w(rng, O, I)
        ws = [w] + [q8w(rng, O, I) for _ in range(args.copies - 1)]     # distinct buffers
        nbytes = O * I // 32 * 34
        for M in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
            ref = np.stack([np.asarray(q8.q8_0_matmul_ref(x, w)) for w in ws])   # [copies, M, O]
            cands = [("default", {})] + [(str(c), c) for c in grid
                                         if not (sname.startswith("head") and c["k_splits"] > 1)]
            for label, c in cands:
                name, _ = add_candidate(fns, f"{sname} M={M} {label}",
                                        lambda x, ws, c=c: [q8.q8_0_matmul(x, w, **c)
                                                            for w in ws], (x, ws), ref,
                                        rtol=2e-2, prefix="drs")
                if name:
                    meta[name] = (f"{sname} M={M}", label, nbytes)
            print(f"{sname} M={M}: default plan {plan_dense(M, O, I)}")
    times = {n: us / args.copies for n, us in device_us_per_call(fns, reps=10).items()}
    print_ranked(times, meta, "default", top=6)

if __name__ == "__main__":
    main()
