"""Does XLA launch our Pallas kernels with programmatic dependent launch (PDL)?

    XLA_FLAGS="--xla_gpu_enable_pdl=true --xla_dump_to=DIR" python benchmarks/pdl_probe.py DIR

Compiles two chained Pallas kernels in one jit, then reports whether the PTX that XLA dumped
holds ``griddepcontrol`` instructions (``.wait``: the kernel waits for its predecessor; the
thunk then launches it with the PDL launch attribute), and the device time of a chain of 48
small kernels with and without (compare two processes with different XLA_FLAGS).
"""
import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def add_one(x):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(x.shape[0] // 128,),
                          in_specs=[pl.BlockSpec((128,), lambda i: (i,))],
                          out_specs=pl.BlockSpec((128,), lambda i: (i,)),
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
                          interpret=jax.default_backend() == "cpu")(x)


@jax.jit
def chain(x):
    def body(i, x):
        for _ in range(48):
            x = add_one(x)
        return x
    return jax.lax.fori_loop(0, 20, body, x)


def main():
    x = jnp.zeros((128 * 132,), jnp.float32)
    y = chain(x).block_until_ready()
    assert float(y[0]) == 960.0, float(y[0])
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        chain(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    per = min(ts) / (20 * 48) * 1e6
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: {per:.2f} µs per chained kernel (wall, min of 5)")
    if len(sys.argv) > 1:
        ptx = glob.glob(os.path.join(sys.argv[1], "*.ptx"))
        hits = [p for p in ptx if "griddepcontrol" in open(p).read()]
        print(f"ptx files {len(ptx)}, with griddepcontrol {len(hits)}")
        for p in hits[:2]:
            lines = [ln.strip() for ln in open(p) if "griddepcontrol" in ln]
            print(os.path.basename(p), lines[:4])


if __name__ == "__main__":
    main()
