"""The fused decode GEMV (pallas_kernels/fused_gemv.py) at GPT-2 124M and gpt-oss-20b batch-1
shapes against the unfused path in the same process: device time per call from a profiler trace
(every kernel of the call), and a sweep of its tiles.

    python benchmarks/fused_sweep.py [--quick] [--oss] [--copies 4]

``--copies N``: every candidate runs on N distinct copies of the weight one after the other
(times are per copy), so that a weight of 10-20 MB is not served from the 50 MB L2 as it would
be when one copy is timed again and again (the model streams ~12 GB per token).

Unfused = what the model ran before: the XLA norm, then the matmul (XLA's dot for plain bf16
weights, the Pallas Q8_0 GEMV for Q8_0), then bias / GELU / residual as XLA ops.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Kernels inside CUDA graphs (XLA command buffers) carry no hlo_module in the trace.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.models.layers import Norm  # noqa: E402
from pallas_kernels.fused_gemv import fused_gemv  # noqa: E402
from pallas_kernels.q8_matmul import Q8Weights  # noqa: E402
from report import add_candidate, device_us_per_call, print_ranked  # noqa: E402

PEAK = 2.6e12


def shapes(rng):
    bf = jnp.bfloat16

    def plain(o, i):
        return jnp.asarray(rng.standard_normal((o, i)) * 0.02, bf), o * i * 2

    def q8(o, i):
        return Q8Weights(jnp.asarray(rng.integers(0, 256, (o, i // 32, 32), dtype=np.uint8)),
                         jnp.asarray(rng.uniform(1e-3, 1e-2, (o, i // 32)).astype(np.float16))), \
            o * i * 34 // 32

    # name: (weight, bytes, I, O, norm kind or None, act, residual?, out dtype)
    return {
        "gpt2 ln+qkv 2304x768": (*plain(2304, 768), 768, 2304, "layer", None, False, bf),
        "gpt2 out+res 768x768": (*plain(768, 768), 768, 768, None, None, True, jnp.float32),
        "gpt2 ln+fc+gelu 3072x768": (*plain(3072, 768), 768, 3072, "layer", "gelu_tanh", False, bf),
        "gpt2 proj+res 768x3072": (*plain(768, 3072), 3072, 768, None, None, True, jnp.float32),
        "oss rms+qkv q8 5120x2880": (*q8(5120, 2880), 2880, 5120, "rms", None, False, bf),
        "oss out+res q8 2880x4096": (*q8(2880, 4096), 4096, 2880, None, None, True, jnp.float32),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--oss", action="store_true", help="only the gpt-oss-20b shapes")
    ap.add_argument("--copies", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    grid = dict(block_n=[4, 8, 16, 32], block_k=[256, 512, 1024], num_warps=[4, 8])
    if args.oss:
        grid = dict(block_n=[4, 8, 16, 32], block_k=[512, 1024, 2048], num_warps=[4, 8])
    if args.quick:
        grid = dict(block_n=[8, 16], block_k=[512], num_warps=[4, 8])
    configs = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    fns, meta = {}, {}
    for si, (sname, (w, nbytes, I, O, nk, act, res, odt)) in enumerate(shapes(rng).items()):
        if args.oss and not sname.startswith("oss"):
            continue
        ws = [w] + [jax.tree.map(lambda a: a + jnp.ones((), a.dtype), w)
                    for _ in range(args.copies - 1)]               # distinct buffers
        x = jnp.asarray(rng.standard_normal((1, I)), jnp.float32 if nk else jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal(I), jnp.float32)
        b = jnp.asarray(rng.standard_normal(I), jnp.float32)
        bias = jnp.asarray(rng.standard_normal(O), jnp.float32)
        r = jnp.asarray(rng.standard_normal((1, O)), jnp.float32) if res else None
        norm = Norm(nk, g, b if nk == "layer" else None) if nk else None

        def unfused(w, x, bias, r, norm=norm, act=act, odt=odt):
            os.environ["GPTJAX_KERNELS"] = "ref" if not isinstance(w, Q8Weights) else "pallas"
            from gptjax.packed import PackedWeight
            ww = PackedWeight(w, 8, (w.qs.shape[0], w.qs.shape[1] * 32), layout="kernel") \
                if isinstance(w, Q8Weights) else w
            h = x if norm is None else norm(x, out_dtype=jnp.bfloat16)
            from gptjax.models.layers import gelu, linear
            y = linear(h, ww, bias, out_dtype=jnp.float32 if act else odt)
            if act:
                y = gelu(y).astype(odt)
            return y if r is None else r + y

        cands = [("unfused", unfused)]
        for c in [{}] + configs:
            cands.append((str(c) if c else "default",
                          lambda w, x, bias, r, c=c, nk=nk, g=g, b=b, act=act, odt=odt:
                          fused_gemv(x, w, bias, g if nk else None, b if nk == "layer" else None,
                                     r, norm=nk, act=act,
                                     round_to=None if odt == jnp.float32 else odt, **c)))
        for label, f in cands:
            name, _ = add_candidate(fns, f"{sname} {label}",
                                    lambda ws, x, bias, r, f=f: [f(w, x, bias, r) for w in ws],
                                    (ws, x, bias, r), prefix="fsw")
            if name:
                meta[name] = (sname, label, nbytes)
    os.environ["GPTJAX_KERNELS"] = "pallas"
    times = {n: us / args.copies for n, us in device_us_per_call(fns).items()}
    print_ranked(times, meta, "unfused", keep=("default",))


if __name__ == "__main__":
    main()
