"""The gpt-oss-20b MoE block at batch-1 decode: the decode MoE kernels (pallas_kernels/moe_decode.py:
router GEMV + gate/up/SwiGLU + down/combine) against the previous path (XLA RMSNorm, router,
top-k, softmax and SwiGLU around the MXFP4 "pairs" kernels, weighted sum and residual add in
XLA), in the same process: device time per call from a profiler trace (every kernel of the
call), plus a sweep of the two kernels' tiles.

    python benchmarks/moe_decode_sweep.py [--quick]
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

from gptjax.models import moe  # noqa: E402
from gptjax.models.layers import Norm, norm_linear  # noqa: E402
from gptjax.packed import PackedWeight  # noqa: E402
from pallas_kernels import moe_decode as md  # noqa: E402
import report  # noqa: E402
from report import device_us_per_call  # noqa: E402

PEAK = 2.6e12
MXFP4 = 39


class Cfg:
    n_experts, n_experts_used, swiglu_alpha, swiglu_limit, norm_eps = 32, 4, 1.702, 7.0, 1e-5


def params(rng, E=32, D=2880, F=2880):
    def stack(O, I):
        b = rng.integers(0, 256, (E, O, I // 32, 17), dtype=np.uint8)
        b[..., 0] = rng.integers(118, 128, b.shape[:-1])
        pw = PackedWeight.from_bytes(b.reshape(E, O, -1), MXFP4, (E, O, I))
        return pw.to_kernel_layout()

    f32 = jnp.float32
    return {
        "ffn_gate_inp": {"weight": jnp.asarray(rng.standard_normal((E, D)) * 0.02, jnp.bfloat16),
                         "bias": jnp.asarray(rng.standard_normal(E), f32)},
        "ffn_gate_up_exps": {"weight": stack(2 * F, D),
                             "bias": jnp.asarray(rng.standard_normal((E, 2 * F)), f32)},
        "ffn_down_exps": {"weight": stack(D, F), "bias": jnp.asarray(rng.standard_normal((E, D)), f32)},
        "post_attention_norm": {"weight": jnp.asarray(rng.uniform(0.5, 1.5, D), f32)},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = params(rng)
    cfg = Cfg()
    x = jnp.asarray(rng.standard_normal((1, 2880)) * 3, jnp.float32)
    bf = jnp.bfloat16
    # bytes one token's block reads: 4 experts x (gate_up + down) + the router
    nbytes = 4 * (5760 + 2880) * 2880 // 32 * 17 + 32 * 2880 * 2

    def norm_of(p):
        return Norm("rms", p["post_attention_norm"]["weight"], eps=1e-5)

    def old(x, p):
        os.environ["GPTJAX_KERNELS"] = "pallas"
        return x + moe.moe(norm_of(p)(x, out_dtype=bf), p, cfg)

    def new(x, p, g=None, d=None):
        norm = norm_of(p)
        kw = dict(n_used=4, alpha=1.702, limit=7.0, cdt=bf)
        logits, n = norm_linear(x, p["ffn_gate_inp"]["weight"], p["ffn_gate_inp"]["bias"],
                                norm=norm, dtype=bf, return_normed=True)
        pg = p["ffn_gate_up_exps"]
        h = md.moe_gate_up_swiglu(n, logits, pg["weight"].data, pg["bias"], **kw, **(g or {}))
        pd = p["ffn_down_exps"]
        return md.moe_down_combine(h, logits, pd["weight"].data, pd["bias"], x, **kw, **(d or {}))

    cands = [("old (XLA + pairs kernels)", old), ("new default", new)]
    gs = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
          itertools.product((8, 16), (512, 1024, 2048), (4, 8))]
    ds = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
          itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]
    if args.quick:
        gs, ds = gs[:2], ds[:2]
    cands += [(f"gate_up {g}", lambda x, p, g=g: new(x, p, g=g)) for g in gs]
    cands += [(f"down {d}", lambda x, p, d=d: new(x, p, d=d)) for d in ds]
    fns, meta = {}, {}
    os.environ["GPTJAX_KERNELS"] = "pallas"
    want = None
    for label, f in cands:
        name, y = report.add_candidate(fns, label, f, (x, p), want, prefix="mds", fresh=True)
        if name:
            want = y if want is None else want
            meta[name] = label
    times = device_us_per_call(fns)
    rows = sorted((us, meta[n]) for n, us in times.items() if us > 0)
    base = next((us for us, lab in rows if lab.startswith("old")), float("nan"))
    print(f"\n### gpt-oss-20b MoE block, batch 1 (H100): old path {base:.2f} µs per layer")
    print("| µs per layer | vs old | TB/s (4 experts + router) | config |\n|---|---|---|---|")
    for us, lab in rows[:24] + [r for r in rows[24:] if r[1].startswith(("old", "new default"))]:
        print(f"| {us:.2f} | {base / us:.2f}x | {nbytes / (us * 1e-6) / 1e12:.2f} | {lab} |")
    print_breakdown(meta)


def print_breakdown(meta, labels=("old (XLA + pairs kernels)", "new default")):
    for name, lab in meta.items():
        if lab in labels:
            ks = sorted(report.BY_KERNEL.get(name, {}).items(), key=lambda kv: -kv[1])
            print(f"\n{lab}: " + ", ".join(f"{k} {us:.2f}" for k, us in ks))


if __name__ == "__main__":
    main()
