"""Run the gpt-oss-20b MoE kernels a few times, for Nsight Compute (``ncu``) to profile: the
batch-64 grouped kernel (gate/up [32, 5760, 2880] and down [32, 2880, 2880], 64 tokens x top-4)
and the batch-1 decode kernels (``moe_gate_up_swiglu``, ``moe_down_combine``).

    ncu --set full -k regex:'mxfp4_moe_grouped|moe_gate_up|moe_down' --launch-skip 4 \
        --launch-count 4 python3 benchmarks/ncu_moe.py
(device_run.sh step ncu-moe.)  Without ncu it just runs them.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import moe_decode as md  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
from report import random_mxfp4  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    E, D = 32, 2880

    w_gu, w_dn = random_mxfp4(rng, E, 2 * D, D), random_mxfp4(rng, E, D, D)
    b_gu = jnp.asarray(rng.standard_normal((E, 2 * D)), jnp.float32)
    b_dn = jnp.asarray(rng.standard_normal((E, D)), jnp.float32)
    bf = jnp.bfloat16
    x64 = jnp.asarray(rng.standard_normal((64, D)), bf)
    ids = jnp.asarray(np.argsort(rng.standard_normal((64, E)), axis=1)[:, :4], jnp.int32)
    x1 = jnp.asarray(rng.standard_normal((1, D)), bf).astype(jnp.float32)
    logits = jnp.asarray(rng.standard_normal((1, E)), jnp.float32)
    kw = dict(n_used=4, alpha=1.702, limit=7.0)
    gu64 = jax.jit(lambda x, w, i: mx.mxfp4_moe_matmul(x, w, i))
    for _ in range(3):                                   # launches: gate/up, down, b1 gate/up, b1 down
        jax.block_until_ready(gu64(x64, w_gu, ids))
        jax.block_until_ready(gu64(x64, w_dn, ids))
        h = md.moe_gate_up_swiglu(x1, logits, w_gu, b_gu, **kw)
        jax.block_until_ready(md.moe_down_combine(h, logits, w_dn, b_dn, x1, **kw))
    print("ran")


if __name__ == "__main__":
    main()
