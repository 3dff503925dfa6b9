"""The gpt-oss-20b MoE block at batch-1 decode: the decode MoE kernels (pallas_kernels/moe_decode.py:
router GEMV + gate/up/SwiGLU + down/combine) against the previous path (XLA RMSNorm, router,
top-k, softmax and SwiGLU around the MXFP4 "pairs" kernels, weighted sum and residual add in
XLA), in the same process: device time per call from a profiler trace (every kernel of the
call), plus a sweep of the two kernels' tiles.

The block runs over ``--layers`` distinct layers one after the other (each layer's output is the
next one's input, so each routes differently): one layer's four routed experts (53 MB) would
sit in the H100's 50 MB L2 if a single layer were timed again and again, and flatter the kernels.
Times are per layer.

    python benchmarks/moe_decode_sweep.py [--quick] [--layers 4] [--set tiles|variants]
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
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--set", choices=("tiles", "variants", "flat-tiles", "warps"),
                    default="variants")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ps = [params(rng) for _ in range(args.layers)]
    cfg = Cfg()
    x = jnp.asarray(rng.standard_normal((1, 2880)) * 3, jnp.float32)
    bf = jnp.bfloat16
    # bytes one token's block reads: 4 experts x (gate_up + down) + the router
    nbytes = 4 * (5760 + 2880) * 2880 // 32 * 17 + 32 * 2880 * 2

    def norm_of(p):
        return Norm("rms", p["post_attention_norm"]["weight"], eps=1e-5)

    def layers(block):
        def f(x, ps, **kw):
            for p in ps:
                x = block(x, p, **kw)
            return x
        return f

    def old1(x, p):
        os.environ["GPTJAX_KERNELS"] = "pallas"
        return x + moe.moe(norm_of(p)(x, out_dtype=bf), p, cfg)

    def new1(x, p, g=None, d=None):
        norm = norm_of(p)
        kw = dict(n_used=4, alpha=1.702, limit=7.0, cdt=bf)
        logits, n = norm_linear(x, p["ffn_gate_inp"]["weight"], p["ffn_gate_inp"]["bias"],
                                norm=norm, dtype=bf, return_normed=True)
        pg = p["ffn_gate_up_exps"]
        g = dict(g or {})
        if g.pop("h32", False):               # the normalised row handed over as float32
            n = n.astype(jnp.float32)
        h = md.moe_gate_up_swiglu(n, logits, pg["weight"].data, pg["bias"], **kw, **g)
        pd = p["ffn_down_exps"]
        return md.moe_down_combine(h, logits, pd["weight"].data, pd["bias"], x, **kw, **(d or {}))

    old, new = layers(old1), layers(new1)
    cands = [("new default", new), ("old (XLA + pairs kernels)", old)]
    if args.set == "tiles":
        gs = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
              itertools.product((8, 16), (512, 1024, 2048), (4, 8))]
        ds = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
              itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]
    elif args.set == "flat-tiles":
        # tiles around the defaults with the (default) flat code-word loads
        gs = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
              ((4, 1024, 4), (8, 1024, 4), (16, 512, 4), (8, 256, 4), (8, 512, 2), (4, 512, 4),
               (16, 256, 4))]
        ds = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
              ((4, 1024, 4), (8, 512, 4), (8, 2048, 8), (8, 1024, 2), (4, 2048, 4), (16, 1024, 8))]
    elif args.set == "warps":
        # 8 warps per program (ncu, eighth session: the down kernel has 10 warps per SM and no
        # eligible warp 42 % of the time)
        gs = [dict(block_n=n, block_k=k, num_warps=8) for n, k in ((8, 512), (4, 512), (16, 512))]
        ds = [dict(block_n=n, block_k=k, num_warps=8) for n, k in
              ((8, 1024), (4, 1024), (8, 512), (4, 512), (16, 1024))]
    else:      # decode-time variants: fill in while experimenting
        gs = [dict(h32=True)] + [dict(h32=True, block_n=n, block_k=k, num_warps=w)
                                 for n, k, w in ((8, 1024, 4), (4, 1024, 4), (8, 512, 8))]
        gs += [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in ((8, 1024, 4), (4, 1024, 4))]
        ds = [dict(block_n=n, block_k=k, num_warps=w) for n, k, w in
              ((8, 512, 4), (4, 1024, 4), (8, 2048, 4), (16, 1024, 8), (4, 2048, 4))]
    if args.quick:
        gs, ds = gs[:2], ds[:2]
    cands += [(f"gate_up {g}", lambda x, p, g=g: new(x, p, g=g)) for g in gs]
    cands += [(f"down {d}", lambda x, p, d=d: new(x, p, d=d)) for d in ds]
    fns, meta = {}, {}
    os.environ["GPTJAX_KERNELS"] = "pallas"
    want = None
    for label, f in cands:
        # the old path rounds differently, and over several layers a near-tie may route
        # differently: it is timed, not compared
        name, y = report.add_candidate(fns, label, f, (x, ps), want, prefix="mds", fresh=True,
                                       rtol=1e9 if label.startswith("old") else 1e-2)
        if name:
            want = y if want is None else want
            meta[name] = label
    times = {n: us / args.layers for n, us in device_us_per_call(fns).items()}
    def kernel_us(name, part):
        return sum(us for k, us in report.BY_KERNEL.get(name, {}).items() if part in k) / args.layers

    rows = sorted((us, meta[n], kernel_us(n, "gate_up"), kernel_us(n, "down"))
                  for n, us in times.items() if us > 0)
    base = next((r[0] for r in rows if r[1].startswith("old")), float("nan"))
    print(f"\n### gpt-oss-20b MoE block, batch 1 (H100, {args.layers} distinct layers): old path "
          f"{base:.2f} µs per layer")
    print("| µs per layer | vs old | TB/s (4 experts + router) | gate_up µs | down µs | config |\n"
          "|---|---|---|---|---|---|")
    for us, lab, gu, dn in rows[:30] + [r for r in rows[30:] if r[1].startswith(("old", "new d"))]:
        print(f"| {us:.2f} | {base / us:.2f}x | {nbytes / (us * 1e-6) / 1e12:.2f} | {gu:.2f} | "
              f"{dn:.2f} | {lab} |")
    print_breakdown(meta, args.layers)


def print_breakdown(meta, n_layers, labels=("old (XLA + pairs kernels)", "new default")):
    """Per-kernel µs per layer of the labelled candidates (kernels of the same name summed)."""
    for name, lab in meta.items():
        if lab in labels:
            ks = sorted(report.BY_KERNEL.get(name, {}).items(), key=lambda kv: -kv[1])
            print(f"\n{lab}: " + ", ".join(f"{k} {us / n_layers:.2f}" for k, us in ks))


if __name__ == "__main__":
    main()
