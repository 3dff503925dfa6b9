"""Batch-1 MoE on the tensor cores?  The decode MoE kernels (pallas_kernels/moe_decode.py) run GEMV
math (~5.8 SASS instructions per weight, issue-bound); the grouped kernel's byte-view dot
(mxfp4_matmul.mxfp4_moe_grouped: PTX decode straight into mma.sync operands) needs ~2.5 for the
decode plus a share of one mma per 8 weights.  This times, over ``--layers`` distinct layers
(L2-cold), one token's four routed experts through:

* gate/up: ``moe_gate_up_swiglu`` (default) against the grouped kernel on the 4 sorted rows (one
  row per expert, tiles of 16 rows) with a sweep of its tiles;
* down: ``moe_down_combine`` against the grouped kernel likewise.

    python benchmarks/moe_b1_dot.py [--layers 4] [--quick]
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

from moe_decode_sweep import params  # noqa: E402
from pallas_kernels import moe_decode as md  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
import report  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ps = [params(rng) for _ in range(args.layers)]
    bf = jnp.bfloat16
    D, F, E, U = 2880, 2880, 32, 4
    n = jnp.asarray(rng.standard_normal((1, D)), bf)
    # each layer routes its own 4 experts; logits make them the top 4
    ids = [np.sort(rng.choice(E, U, replace=False)) for _ in ps]
    logits = []
    for e in ids:
        lg = rng.standard_normal((1, E)).astype(np.float32) - 10.0
        lg[0, e] = rng.uniform(1.0, 2.0, U)
        logits.append(jnp.asarray(lg))
    tiles = [mx.moe_tiles(jnp.asarray(e, jnp.int32), E, 16)[1] for e in ids]
    h = jnp.asarray(rng.standard_normal((U, F)), bf)
    kw = dict(n_used=U, alpha=1.702, limit=7.0, cdt=bf)
    gu_bytes = U * 2 * F * D // 32 * 17
    dn_bytes = U * D * F // 32 * 17

    def gemv_gu(n, lgs, ps):
        return [md.moe_gate_up_swiglu(n, lg, p["ffn_gate_up_exps"]["weight"].data,
                                      p["ffn_gate_up_exps"]["bias"], **kw) for lg, p in zip(lgs, ps)]

    def gemv_dn(h, lgs, ps):
        x = jnp.zeros((1, D), jnp.float32)
        return [md.moe_down_combine(h, lg, p["ffn_down_exps"]["weight"].data,
                                    p["ffn_down_exps"]["bias"], x, **kw) for lg, p in zip(lgs, ps)]

    def grouped(name, x, tls, ps, t):
        xs = jnp.broadcast_to(x[:1], (U, x.shape[1])) if name == "ffn_gate_up_exps" else x
        return [mx.mxfp4_moe_grouped(xs, p[name]["weight"].data, tl, p[name]["bias"], block_m=16,
                                     **t) for tl, p in zip(tls, ps)]

    tilings = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=3)
               for bn, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))
               if not (bn == 16 and w == 8)]
    if args.quick:
        tilings = tilings[:3]
    fns, meta = {}, {}

    def add(case, label, f, a, nb):
        name, _ = report.add_candidate(fns, label, lambda *z: jnp.stack([jnp.sum(y) for y in f(*z)]),
                                       a, None, prefix="b1d")
        if name:
            meta[name] = (case, label, nb)

    add("gate/up, 4 experts of one token", "GEMV (moe_gate_up_swiglu)", gemv_gu, (n, logits, ps),
        gu_bytes)
    add("down, 4 experts of one token", "GEMV (moe_down_combine)", gemv_dn, (h, logits, ps), dn_bytes)
    for t in tilings:
        add("gate/up, 4 experts of one token", f"grouped dot {t}",
            lambda x, tl, ps, t=t: grouped("ffn_gate_up_exps", x, tl, ps, t), (n, tiles, ps), gu_bytes)
        add("down, 4 experts of one token", f"grouped dot {t}",
            lambda x, tl, ps, t=t: grouped("ffn_down_exps", x, tl, ps, t), (h, tiles, ps), dn_bytes)
    # correctness of the grouped path once (first tiling) against the reference twin
    p0 = ps[0]["ffn_gate_up_exps"]
    y = mx.mxfp4_moe_grouped(jnp.broadcast_to(n, (U, D)), p0["weight"].data, tiles[0], p0["bias"],
                             block_m=16, **tilings[0])
    want = mx.mxfp4_moe_grouped_ref(jnp.broadcast_to(n, (U, D)), p0["weight"].data, tiles[0],
                                    p0["bias"])
    print("grouped vs ref rel err", float(jnp.max(jnp.abs(y - want)) / jnp.max(jnp.abs(want))))
    times = {k: us / args.layers for k, us in report.device_us_per_call(fns).items()}
    for base in ("GEMV (moe_gate_up_swiglu)", "GEMV (moe_down_combine)"):
        case = next(c for c, lab, _ in meta.values() if lab == base)
        report.print_ranked({k: v for k, v in times.items() if meta[k][0] == case}, meta, base,
                            top=12)


if __name__ == "__main__":
    main()
