"""MXFP4 "dot" mode (prefill, batch decode) at gpt-oss-20b shapes: the dense matmul and the
grouped MoE kernel (64 tokens: byte view of the words; 512 tokens: word decode), device time per
call (profiler); ``--grouped-sweep`` times a grid of grouped tiles.

The comparison that chose the two decodes (fourth session, H100): gate/up [32, 5760, 2880],
words joined into element order / lanes joined, four dots / byte view, two dots: 64 tokens
369 / 323 / 293 µs, 512 tokens 801 / 939 / 2,018 µs, dense 512 x 2880 x 2880 67 / 112 / 216 µs.
Fifth session (``--decode-variants``: each candidate traced afresh, see ``report.add_candidate``):
a decode straight to bf16 bit patterns (packed bf16 multiplies by the scale, in jnp or inline
PTX, four dots on a pre-permuted x) cut the loop's SASS from 10.3 to 6.5 instructions per weight
at 64 tokens, yet ran 315-402 µs against the byte view's 289 (512 tokens: 615-1,067 against
602-613).  Removed.  Ninth session (``--asm``): the same idea kept inside the byte view -- the
PTX decodes four code bytes into the two dots' operands elementwise, in the layout Triton already
gives the byte tile, so no join, no pre-permuted x and no extra layout conversion -- cut the
64-token loop from 331 to 204 SASS instructions per K step (184 with one scale factor) and did
pay: gate/up 261 -> 223 µs, down 155 -> 129 µs (``mx.ASM_BYTE_DECODE``, now the default).

    python benchmarks/mxfp4_dot_variants.py [--grouped-sweep | --decode-variants | --asm]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gguf import GGMLQuantizationType as T  # noqa: E402

from gptjax.packed import PackedWeight  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
from report import add_candidate, device_us_per_call, print_ranked, random_mxfp4  # noqa: E402


def main():
    import argparse
    import itertools

    ap = argparse.ArgumentParser()
    ap.add_argument("--grouped-sweep", action="store_true",
                    help="only the grouped MoE kernel, over a grid of tiles")
    ap.add_argument("--decode-variants", action="store_true")
    ap.add_argument("--asm", action="store_true",
                    help="batch-64 grouped kernel (gate/up and down): inline-PTX byte decode "
                         "straight to bf16 (mx.ASM_BYTE_DECODE) on / off x tiles")
    ap.add_argument("--stages", action="store_true",
                    help="batch-64 grouped kernel: software-pipeline depth (num_stages) x tiles")
    ap.add_argument("--scale-ablation", action="store_true",
                    help="batch-64 grouped kernel with its per-step scale-byte load replaced by a "
                         "constant (timing only: wrong values), against the model's path")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    E, D = 32, 2880

    w_dense = random_mxfp4(rng, D, D)
    w_moe = random_mxfp4(rng, E, 2 * D, D)
    bf = jnp.bfloat16
    x512 = jnp.asarray(rng.standard_normal((512, D)), bf)
    ids = {T: jnp.asarray(rng.integers(0, E, (T, 4)), jnp.int32) for T in (64, 512)}
    cases = {
        "dense 512x2880x2880": (lambda x, w, i, t: mx.mxfp4_matmul(x, w, **t),
                                x512, w_dense, None),
        "moe gate_up T=64 (b64)": (lambda x, w, i, t: mx.mxfp4_moe_matmul(x, w, i, **t),
                                   x512[:64], w_moe, ids[64]),
        "moe gate_up T=512 (pp512)": (lambda x, w, i, t: mx.mxfp4_moe_matmul(x, w, i, **t),
                                      x512, w_moe, ids[512]),
    }
    tilings = [("default", {}), ("bk128", dict(block_k=128))]
    bv0 = mx.BYTE_VIEW_MAX_ROWS
    variants = [("", bv0)]                   # (label, BYTE_VIEW_MAX_ROWS while it is traced)
    if args.decode_variants:
        tilings = [("default", {})] + [
            (f"{bm}x{bn}x{bk} w{w}", dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w))
            for bm, bn, bk, w in ((16, 128, 64, 8), (16, 128, 128, 4), (64, 128, 64, 4))]
        variants = [("default decode", bv0), ("words at every size", 0)]
    if args.grouped_sweep:
        del cases["dense 512x2880x2880"]
        tilings = [("default", {})] + [
            (f"{bm}x{bn}x{bk} w{w}", dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w))
            for bm, bn, bk, w in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8))]
    if args.stages:
        # more K steps' tiles in flight per program (cp.async stages): bytes in flight per SM,
        # not decode arithmetic, is the suspect for the grouped kernel (RESULTS.md, seventh session)
        cases = {"moe gate_up T=64 (b64)": cases["moe gate_up T=64 (b64)"]}
        tilings = [("default", {})] + [
            (f"{bm}x{bn}x{bk} w{w} s{st}", dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w,
                                                num_stages=st))
            for (bm, bn, bk, w), st in itertools.product(
                ((16, 128, 64, 8), (16, 128, 64, 4), (16, 128, 128, 4), (16, 64, 128, 4)),
                (2, 4, 6))]
    asm0 = mx.ASM_BYTE_DECODE
    asm = {vname: asm0 for vname, _ in variants}
    if args.asm:
        w_down = random_mxfp4(rng, E, D, D)
        cases = {"moe gate_up T=64 (b64)": cases["moe gate_up T=64 (b64)"],
                 "moe down T=64 (b64)": (cases["moe gate_up T=64 (b64)"][0], x512[:64], w_down,
                                         ids[64])}
        asm = {"jnp decode": False, "asm decode": True, "asm 1 factor": True}
        variants = [(v, bv0) for v in asm]
        tilings = [("default", {})] + [
            (f"{bm}x{bn}x{bk} w{w}", dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w))
            for bm, bn, bk, w in ((16, 128, 64, 4), (16, 256, 64, 8), (32, 128, 64, 8),
                                  (16, 256, 64, 4))]
    real_tile = mx._load_w_tile
    if args.scale_ablation:
        w_down = random_mxfp4(rng, E, D, D)
        cases = {"moe gate_up T=64 (b64)": cases["moe gate_up T=64 (b64)"],
                 "moe down T=64 (b64)": (cases["moe gate_up T=64 (b64)"][0], x512[:64], w_down,
                                         ids[64])}
        asm = {"asm 1 factor": True, "no scale load (wrong values)": True}
        variants = [(v, bv0) for v in asm]
        tilings = [("default", {})]

    def const_scale_tile(w, w_refs, lead, row0, bn, g0, gt, g_end=None):
        qs, e = real_tile(w, w_refs, lead, row0, bn, g0, gt, g_end)
        return qs, jnp.full(e.shape, 120, e.dtype)           # the scale load is dead code

    fns, meta = {}, {}
    for cname, (f, x, w, i) in cases.items():
        want, wbytes = None, w.qs.size * 4 + w.scales.size
        for vname, bv in variants:
            mx.BYTE_VIEW_MAX_ROWS = bv           # read at trace time: fresh=True below
            mx._load_w_tile = const_scale_tile if vname.startswith("no scale") else real_tile
            if vname in ("asm 1 factor", "no scale load (wrong values)") and \
                    not isinstance(w, PackedWeight):
                # the PackedWeight the model passes, with its scale_max (random_mxfp4 draws
                # scale bytes 118..127): one bf16 multiply per weight pair instead of two
                w = PackedWeight(w, T.MXFP4, (*w.scales.shape[:-1], w.scales.shape[-1] * 32),
                                 layout="kernel", scale_max=int(w.scales.max()))
            mx.ASM_BYTE_DECODE = asm[vname]
            for tname, t in tilings:
                label = f"{vname} {tname}".strip()
                wrong = vname.startswith("no scale")
                name, y = add_candidate(fns, f"{cname} {label}",
                                        lambda x, w, i, f=f, t=t: f(x, w, i, t), (x, w, i),
                                        None if wrong else want, prefix="mdv", fresh=True)
                if name and not wrong:
                    want = y if want is None else want
                if name:
                    # bytes: the whole weight (64 tokens x top-4 route to all 32 experts)
                    meta[name] = (cname, label, wbytes)
    mx.BYTE_VIEW_MAX_ROWS, mx.ASM_BYTE_DECODE, mx._load_w_tile = bv0, asm0, real_tile
    base = ("default decode default" if args.decode_variants else
            "jnp decode default" if args.asm else
            "asm 1 factor default" if args.scale_ablation else "default")
    print_ranked(device_us_per_call(fns, reps=10), meta, base, top=12)


if __name__ == "__main__":
    main()
