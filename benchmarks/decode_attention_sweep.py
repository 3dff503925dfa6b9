"""Decode attention (kernel + split combine) at gpt-oss-20b's full-layer shape, batch 1, over a
4096-token context in an 8192-slot cache stack: device time per call from a profiler trace
(every kernel of the call, so the XLA combine counts), default tiles vs a grid.

    python benchmarks/decode_attention_sweep.py [--ctx 4096]
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

from pallas_kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from report import add_candidate, device_us_per_call  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=8192)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    L, B, N, K, H, S = 2, 1, 64, 8, 64, args.slots
    bf = jnp.bfloat16
    kc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), bf)
    vc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), bf)
    q = jnp.asarray(rng.standard_normal((B, N, H)), bf)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    lengths = jnp.full((B,), args.ctx, jnp.int32)
    ref = np.asarray(decode_attention_ref(q, kc, vc, lengths, sinks=sinks, scale=H ** -0.5,
                                          layer=1), np.float32)
    cands = [("default", {}), ("default, XLA combine", dict(combine="xla"))]
    cands += [(f"bk{bk} splits{s} w{w} combine {cb}", dict(block_k=bk, num_splits=s,
                                                           num_warps=w, combine=cb))
              for bk, s, w, cb in itertools.product((64, 128), (8, 16, 32, 64), (4, 8),
                                                    ("kernel", "xla"))]
    fns, meta = {}, {}
    for label, c in cands:
        def fn(q, kc, vc, lengths, sinks, c=c):
            return decode_attention(q, kc, vc, lengths, sinks=sinks, scale=H ** -0.5, layer=1, **c)
        name, _ = add_candidate(fns, label, fn, (q, kc, vc, lengths, sinks), ref, rtol=2e-2,
                                prefix="das")
        if name:
            meta[name] = label
    times = device_us_per_call(fns)
    nbytes = 2 * B * K * args.ctx * H * 2
    rows = sorted((us, meta[n]) for n, us in times.items() if us > 0)
    base = next((us for us, lab in rows if lab == "default"), float("nan"))
    print(f"\n### decode attention, ctx {args.ctx} (kernel + combine): default {base:.2f} µs")
    print("| µs | vs default | TB/s (K+V) | config |\n|---|---|---|---|")
    for us, lab in rows[:12] + [r for r in rows[12:] if r[1].startswith("default")]:
        print(f"| {us:.2f} | {base / us:.2f}x | {nbytes / (us * 1e-6) / 1e12:.2f} | {lab} |")


if __name__ == "__main__":
    main()
