"""Does XLA launch our Pallas kernels with programmatic dependent launch (PDL)?

    XLA_FLAGS="--xla_gpu_enable_pdl=true --xla_dump_to=DIR" python benchmarks/pdl_probe.py DIR

Times a loop over a chain of 48 tiny Pallas kernels (wall time per kernel), without and with
our early trigger (``pallas_kernels.pdl``), and reports whether the PTX that XLA dumped (if
any) holds ``griddepcontrol`` instructions.  Compare processes with different XLA_FLAGS
(``--xla_gpu_enable_pdl=false`` / ``true``).
"""
import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pallas_kernels import pdl  # noqa: E402


def add_one(x, trigger):
    def kernel(x_ref, o_ref):
        i = pdl.program_id(0) if trigger else pl.program_id(0)        # what the trigger rides on
        o_ref[...] = x_ref[...] + (1.0 + 0.0 * i.astype(jnp.float32))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(x.shape[0] // 128,),
                          in_specs=[pl.BlockSpec((128,), lambda i: (i,))],
                          out_specs=pl.BlockSpec((128,), lambda i: (i,)),
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
                          interpret=jax.default_backend() == "cpu")(x)


def chain(trigger):
    @jax.jit
    def f(x):
        def body(i, x):
            for _ in range(48):
                x = add_one(x, trigger)
            return x
        return jax.lax.fori_loop(0, 20, body, x)
    return f


def main():
    x = jnp.zeros((128 * 132,), jnp.float32)
    for trigger in (False, True, False, True):
        f = chain(trigger)
        y = f(x).block_until_ready()
        assert bool(jnp.all(y == 960.0)), y
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            ts.append(time.perf_counter() - t0)
        per = min(ts) / (20 * 48) * 1e6
        print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, trigger {trigger}: {per:.2f} µs per "
              f"chained kernel (wall, min of 5)")
    if len(sys.argv) > 1:
        ptx = glob.glob(os.path.join(sys.argv[1], "*.ptx"))
        hits = [p for p in ptx if "griddepcontrol" in open(p).read()]
        print(f"ptx files {len(ptx)}, with griddepcontrol {len(hits)}")
        for p in hits[:2]:
            lines = [ln.strip() for ln in open(p) if "griddepcontrol" in ln]
            print(os.path.basename(p), lines[:4])


if __name__ == "__main__":
    main()
