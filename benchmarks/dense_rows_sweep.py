"""Q8_0 dense matmul tiles at batch-decode row counts (gpt-oss-20b attention projections and the
output head at 16 / 64 rows): device time per call from a profiler trace, default plan vs a
grid, in one process.

    python benchmarks/dense_rows_sweep.py [--rows 64] [--head]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import q8_matmul as q8  # noqa: E402
from pallas_kernels.mxfp4_matmul import plan_dense  # noqa: E402
from report import device_us_per_call  # noqa: E402


def q8w(rng, O, I):
    return q8.Q8Weights(jnp.asarray(rng.integers(0, 256, (O, I // 32, 32), dtype=np.uint8)),
                        jnp.asarray(rng.uniform(1e-3, 1e-2, (O, I // 32)).astype(np.float16)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64")
    ap.add_argument("--head", action="store_true", help="also the 201088-row output head")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = {"qkv 5120x2880": (5120, 2880), "out 2880x4096": (2880, 4096)}
    if args.head:
        shapes["head 201088x2880"] = (201088, 2880)
    grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, k_splits=s)
            for bm, bn, bk, w, s in itertools.product((16, 64), (32, 64, 128), (64, 128),
                                                      (4, 8), (1, 4))]
    fns, meta = {}, {}
    for sname, (O, I) in shapes.items():
        w = q8w(rng, O, I)
        nbytes = O * I // 32 * 34
        for M in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
            ref = np.asarray(q8.q8_0_matmul_ref(x, w))
            cands = [("default", {})] + [(str(c), c) for c in grid
                                         if not (sname.startswith("head") and c["k_splits"] > 1)]
            for label, c in cands:
                name = f"drs{len(fns)}z"

                def fn(x, w, c=c):
                    return q8.q8_0_matmul(x, w, **c)
                fn.__name__ = name
                jf = jax.jit(fn)
                try:
                    y = np.asarray(jax.block_until_ready(jf(x, w)))
                except Exception as e:                                       # report, go on
                    print(f"{sname} M={M} {label}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
                if err > 2e-2:
                    print(f"{sname} M={M} {label}: WRONG rel err {err:.2e}")
                    continue
                fns[name] = (jf, (x, w))
                meta[name] = (f"{sname} M={M}", label, nbytes)
            print(f"{sname} M={M}: default plan {plan_dense(M, O, I)}")
    times = device_us_per_call(fns, reps=10)
    by = {}
    for name, us in times.items():
        by.setdefault(meta[name][0], []).append((us, meta[name][1], meta[name][2]))
    for key, rs in by.items():
        rs = [r for r in rs if r[0] > 0]
        base = next((us for us, lab, _ in rs if lab == "default"), float("nan"))
        rs.sort()
        print(f"\n### {key}: default {base:.2f} µs")
        print("| µs | vs default | TB/s | config |\n|---|---|---|---|")
        for us, lab, nb in rs[:6] + [r for r in rs[6:] if r[1] == "default"]:
            print(f"| {us:.2f} | {base / us:.2f}x | {nb / (us * 1e-6) / 1e12:.2f} | {lab} |")


if __name__ == "__main__":
    main()
