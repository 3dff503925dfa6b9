"""The L2 prefetch hint (pallas_kernels/l2_prefetch.py).

* CPU: the chunk plan covers every whole 16 bytes of the array exactly once, in bounds, with at
  most one chunk per thread, each chunk's address and size multiples of 16; the generated PTX
  spells out that plan (thread -> chunk, the guards, the sizes).
* GPU (``-m gpu``): the decode-attention kernel with a prefetch list gives bit-for-bit the
  results (output and both caches) of the same call without one, and the hint is really on
  there (``l2_prefetch.enabled()``), so the kernel with the inline asm was compiled and run.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import l2_prefetch as l2
from pallas_kernels.decode_attention import decode_attention_update_qkv
from kernel_modes import HAS_GPU


def _chunks(nbytes, n_threads):
    """The byte ranges the threads ask for, by the asm's rule: thread c takes [c * chunk,
    c * chunk + chunk) if c < full, [full * chunk, + tail) if c == full and tail > 0."""
    chunk, full, tail = l2.plan_chunks(nbytes, n_threads)
    out = []
    for c in range(n_threads):
        if c < full:
            out.append((c * chunk, chunk))
        elif c == full and tail:
            out.append((c * chunk, tail))
    return out


@pytest.mark.parametrize("nbytes", [16, 4096, 4112, 5000, 11_796_480, 737_280, 201088 * 3060,
                                    7, 3 * 4096 + 31])
@pytest.mark.parametrize("n_threads", [1, 128, 2048, 65536])
def test_plan_covers_every_16_bytes_once(nbytes, n_threads):
    ranges = _chunks(nbytes, n_threads)
    assert len(ranges) <= n_threads
    covered = np.zeros(nbytes, np.int32)
    for start, size in ranges:
        assert start % 16 == 0 and size % 16 == 0 and size > 0
        assert start + size <= nbytes                                 # never past the end
        covered[start:start + size] += 1
    whole = nbytes // 16 * 16
    np.testing.assert_array_equal(covered[:whole], 1)                 # all whole 16-byte units
    np.testing.assert_array_equal(covered[whole:], 0)


def test_asm_spells_out_the_plan():
    chunk, full, tail = l2.plan_chunks(5 * 4096 + 48, 128)
    assert (chunk, full, tail) == (4096, 5, 48)
    asm = l2._asm(chunk, full, tail, 128)
    assert "mad.lo.u32 %pf_c, $2, 128, %pf_c;" in asm                 # c = program * 128 + tid
    assert f"mad.wide.u32 %pf_a, %pf_c, {chunk}, $1;" in asm          # address = base + c chunk
    assert re.search(rf"setp.lt.u32 %pf_p, %pf_c, {full};\s*@%pf_p cp.async.bulk.prefetch"
                     rf".L2.global \[%pf_a\], {chunk};", asm)
    assert re.search(rf"setp.eq.u32 %pf_p, %pf_c, {full};\s*@%pf_p cp.async.bulk.prefetch"
                     rf".L2.global \[%pf_a\], {tail};", asm)
    no_tail = l2._asm(4096, 3, 0, 128)
    assert "setp.eq" not in no_tail and no_tail.count("cp.async.bulk.prefetch") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("B,P", [(1, 2), (3, 1), (1, 8)])
def test_prefetch_leaves_decode_attention_bitwise_equal(B, P):
    assert l2.enabled("attention"), "the hint should be on on this GPU"
    rng = np.random.default_rng(B * 10 + P)
    L, N, K, S, H = 2, 16, 4, 96, 64
    bf = jnp.bfloat16
    kc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), bf)
    vc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), bf)
    qkv = jnp.asarray(rng.standard_normal((B, (N + 2 * K) * H)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, S, B), jnp.int32)
    ang = pos[:, None].astype(jnp.float32) * jnp.linspace(0.01, 1.0, H // 2, dtype=jnp.float32)
    kw = dict(n_heads=N, rope_type="neox", scale=H ** -0.5, layer=1, num_splits=P,
              sinks=jnp.asarray(rng.standard_normal(N), jnp.float32))
    args = (qkv, kc, vc, pos + 1, pos, jnp.cos(ang), jnp.sin(ang))
    # a weight-sized array with a ragged tail (not a multiple of 16 bytes) and a small one
    big = jnp.asarray(rng.integers(0, 256, 3 * 2 ** 20 + 37), jnp.uint8)
    small = jnp.asarray(rng.standard_normal(1000), jnp.float16)
    want = decode_attention_update_qkv(*args, **kw)
    got = decode_attention_update_qkv(*args, **kw, prefetch=(big, small))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("M,E,F", [(1, 32, 96), (2, 8, 200)])
def test_prefetch_leaves_moe_gate_up_bitwise_equal(M, E, F):
    """The batch-1 gate/up kernel asking L2 for the routed experts' down weights (slabs of
    [E, ...] stacks, one chunk per program; F = 200: a ragged last row block) gives the bits
    of the call without the hint."""
    from pallas_kernels import moe_decode as md
    from pallas_kernels.mxfp4_matmul import repack_mxfp4

    assert l2.enabled("moe"), "the hint should be on on this GPU"
    rng = np.random.default_rng(M * E + F)
    D = 128
    raw = rng.integers(0, 256, size=(E, 2 * F, D // 32, 17), dtype=np.uint8)
    raw[..., 0] = rng.integers(122, 128, size=raw.shape[:-1])
    w1 = repack_mxfp4(jnp.asarray(raw.reshape(E, 2 * F, -1)))
    b1 = jnp.asarray(rng.standard_normal((E, 2 * F)), jnp.float32)
    down = repack_mxfp4(jnp.asarray(rng.integers(0, 256, size=(E, D, 6 * 17), dtype=np.uint8)))
    h = jnp.asarray(rng.standard_normal((M, D)), jnp.bfloat16).astype(jnp.float32)
    logits = jnp.asarray(rng.standard_normal((M, E)), jnp.float32)
    kw = dict(n_used=4, alpha=1.702, limit=7.0)
    want = md.moe_gate_up_swiglu(h, logits, w1, b1, **kw)
    got = md.moe_gate_up_swiglu(h, logits, w1, b1, **kw,
                                prefetch=(down.qs, down.scales))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
