"""The gpt-oss router at batch decode (64 tokens) and prefill: RMSNorm + float32 router matmul
as XLA runs it, with JAX's default matmul precision (TF32 for float32 operands on recent GPUs)
and with ``precision=HIGHEST``, and as one fused GEMV kernel (``fused_gemv`` row groups, up to
``GROUP_MAX_ROWS`` rows): device time per call and the error against a float64 product.

    python benchmarks/router_b64.py [--rows 64,512] [--route-warps 4,8,16]

``--route-warps``: instead, the routing kernel (pallas_kernels/moe_route.py, one program) on 64
tokens' logits with each number of warps.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from gptjax.models.layers import rms_norm  # noqa: E402
from pallas_kernels import fused_gemv as fg  # noqa: E402
from report import add_candidate, device_us_per_call  # noqa: E402

F32 = jnp.float32


def router(prec, transposed=False):
    def f(x, g, w, b):
        n = rms_norm(x, g, 1e-5, out_dtype=jnp.bfloat16)                     # [M, D] bf16
        eq = "md,de->me" if transposed else "md,ed->me"
        return jnp.einsum(eq, n.astype(F32), w, precision=prec, preferred_element_type=F32) + b
    return f


def fused(**tiles):
    def f(x, g, w, b):
        return fg.fused_gemv(x, w, b, g, norm="rms", cdt=jnp.bfloat16, norm_out=True,
                             interpret=jax.default_backend() == "cpu", **tiles)[0]
    return f


#: Row-group tiles for --sweep: (outputs per program, inputs per step, warps).
SWEEP = [(2, 2048, 4), (2, 4096, 4), (4, 1024, 4), (4, 2048, 8), (8, 512, 4), (8, 1024, 4),
         (8, 1024, 8), (16, 512, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,512")
    ap.add_argument("--sweep", action="store_true", help="also other row-group tiles")
    ap.add_argument("--route-warps", default="")
    args = ap.parse_args()
    if args.route_warps:
        return route_warps([int(w) for w in args.route_warps.split(",")])
    rng = np.random.default_rng(0)
    D, E = 2880, 32
    g = jnp.asarray(rng.uniform(0.5, 1.5, D), F32)
    w_np = (rng.standard_normal((E, D)) * 0.02).astype(np.float32)       # not bf16-valued
    w, wt = jnp.asarray(w_np), jnp.asarray(np.ascontiguousarray(w_np.T))
    b = jnp.asarray(rng.standard_normal(E) * 0.1, F32)
    print(f"| rows | variant | µs | max |err| / max |logit| vs float64 |\n|---|---|---|---|")
    for M in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((M, D)) * 3, F32)
        n64 = np.asarray(rms_norm(x, g, 1e-5, out_dtype=jnp.bfloat16), np.float64)
        want = n64 @ w_np.astype(np.float64).T + np.asarray(b, np.float64)
        fns, labels = {}, {}
        for label, prec, tr in (("default precision", None, False),
                                ("HIGHEST", lax.Precision.HIGHEST, False),
                                ("HIGHEST, weight stored [D, E]", lax.Precision.HIGHEST, True)):
            name, y = add_candidate(fns, label, router(prec, tr), (x, g, wt if tr else w, b),
                                    want=want.astype(np.float32), rtol=1e-2, prefix=f"r{M}_")
            if name:
                labels[name] = (label, float(np.max(np.abs(y - want)) / np.max(np.abs(want))))
        if M <= fg.GROUP_MAX_ROWS:
            tiles = [{}] + [dict(block_n=n, block_k=k, num_warps=nw) for n, k, nw in SWEEP] * \
                args.sweep
            for t in tiles:
                label = "fused GEMV kernel (row groups)" + (f", {t}" if t else ", default tiles")
                name, y = add_candidate(fns, label, fused(**t), (x, g, w, b),
                                        want=want.astype(np.float32), rtol=1e-2, prefix=f"r{M}_")
                if name:
                    labels[name] = (label, float(np.max(np.abs(y - want)) / np.max(np.abs(want))))
        times = device_us_per_call(fns)
        for name, (label, err) in labels.items():
            print(f"| {M} | {label} | {times[name]:.2f} | {err:.2e} |")


def route_warps(warps, T=64, E=32, U=4):
    """Device time of the routing kernel per call, by warps (same result checked)."""
    from pallas_kernels import moe_route as mr

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((T, E)), F32)
    fns, labels = {}, {}
    want = None
    for nw in warps:
        def f(lg, nw=nw):
            r = mr.moe_route(lg, n_used=U, block_m=16, num_warps=nw)
            return jnp.concatenate([r.order.astype(F32), r.tiles.reshape(-1).astype(F32),
                                    r.weights.reshape(-1)])
        name, y = add_candidate(fns, f"{nw} warps", f, (logits,), want=want, rtol=0.0,
                                prefix="route")
        if name:
            want = y if want is None else want
            labels[name] = nw
    times = device_us_per_call(fns)
    print(f"| routing kernel, {T} tokens x {E} experts | µs |\n|---|---|")
    for name, nw in labels.items():
        print(f"| {nw} warps | {times[name]:.2f} |")


if __name__ == "__main__":
    main()
