"""Run the batch-64 Q8_0 q/k/v projection of gpt-oss-20b ([64, 2880] x [5120, 2880], the dot
mode's default plan) and the 64-row output head a few times, for Nsight Compute (``ncu``): why
the 64-row Q8_0 dot streams at ~0.65 TB/s for the attention projections but 1.48 TB/s for the
head with the same kernel (RESULTS.md, tenth session).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats -k regex:q8_0_matmul --launch-skip 2 --launch-count 2 \
        python3 benchmarks/ncu_q8.py
(device_run.sh step ncu-q8.)  Without ncu it just runs them.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import q8_matmul as q8  # noqa: E402


def q8w(rng, O, I):
    return q8.Q8Weights(jnp.asarray(rng.integers(0, 256, (O, I // 32, 32), dtype=np.uint8)),
                        jnp.asarray(rng.uniform(1e-3, 1e-2, (O, I // 32)).astype(np.float16)))


def main():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 2880)), jnp.bfloat16)
    w_qkv, w_head = q8w(rng, 5120, 2880), q8w(rng, 201088, 2880)
    f = jax.jit(lambda x, w: q8.q8_0_matmul(x, w))
    for _ in range(2):               # launches: qkv, head, qkv, head (skip the first two)
        jax.block_until_ready(f(x, w_qkv))
        jax.block_until_ready(f(x, w_head))
    print("done")


if __name__ == "__main__":
    main()
