"""Decode (flash-decoding) and prefill (flash attention) Pallas kernels against their jnp twins.

Layers of checks:
* literal masks: with q = 0 every visible key gets the same weight, so with one-hot values the
  output spells out the visible set, written here by hand;
* each ``_ref`` against an independent float64 numpy loop and against
  ``gptjax.models.layers.attention`` (the model's attention) with the layouts converted;
* each kernel in Pallas interpret mode (CPU) against its ``_ref`` on shapes that hit the edges:
  one row, rows of different lengths, lengths not divisible by the block, length 1, the window
  boundary (window 8 at lengths 7, 8, 9, 20), sinks on and off, G = 1, 3, 8, head dims 64, 16
  and 24 (not a power of two: masked head-dim loads), float32 and bfloat16, the 5-D cache stack;
* the same kernel cases for real on a GPU (``-m gpu``; skipped without one).

Errors are relative norms ||a - b|| / ||b||.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import GptjaxError
from gptjax.models.layers import attention
from pallas_kernels.decode_attention import (combine_splits, combine_splits_kernel, decode_attention,
                                              decode_attention_ref, decode_attention_update,
                                              decode_attention_update_qkv,
                                              decode_attention_update_ref)
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kernel_modes import MODES

F32_RTOL = 2e-6     # float32 inputs (observed <= 4e-7 in interpret mode)
BF16_RTOL = 2e-2    # bfloat16 inputs and cache (observed ~3e-3)



def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def attention_np(q, k, v, positions, window, sinks, scale):
    """float64 loop oracle. q [B, T, N, H]; k, v [B, K, S, H]; positions [B, T] → [B, T, N, H]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            p = int(positions[b, t])
            js = [j for j in range(S) if j <= p and (window is None or j > p - window)]
            if not js:
                continue
            for n in range(N):
                kh = n // G
                logits = scale * (k[b, kh, js] @ q[b, t, n])          # [len(js)]
                if sinks is not None:
                    logits = np.append(logits, float(sinks[n]))       # sink: a logit, no value
                w = np.exp(logits - logits.max())
                out[b, t, n] = w[: len(js)] @ v[b, kh, js] / w.sum()
    return out


def make(seed, B, T, N, K, S, H, sinks, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, H)).astype(np.float32)
    s = rng.standard_normal(N).astype(np.float32) * 2 if sinks else None
    # round through the compute dtype so that the oracle sees exactly the kernel's inputs
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    cast = lambda x: jnp.asarray(x, dtype)                            # noqa: E731
    return q, k, v, s, cast


# ---- literal masks -------------------------------------------------------------------------

def one_hot_values(B, K, S):
    """(v, k): v[b, k, j] = e_j (H = S), k = 0. With q = 0 the output is the indicator of the
    visible set divided by its size."""
    v = np.broadcast_to(np.eye(S, dtype=np.float32), (B, K, S, S)).copy()
    return jnp.asarray(v), jnp.zeros((B, K, S, S), jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
def test_decode_visible_sets_literal(interpret):
    S = 32
    v, k = one_hot_values(4, 1, S)
    q = jnp.zeros((4, 2, S), jnp.float32)
    lengths = jnp.array([7, 8, 9, 20], jnp.int32)
    out = decode_attention(q, k, v, lengths, window=8, scale=1.0, block_k=16, num_splits=2,
                           interpret=interpret)
    visible = [range(0, 7), range(0, 8), range(1, 9), range(12, 20)]
    want = np.zeros((4, 2, S), np.float32)
    for b, js in enumerate(visible):
        want[b, :, list(js)] = 1.0 / len(js)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-6)
    # a zero sink logit adds exactly one more unit to the denominator
    out = decode_attention(q, k, v, lengths, window=8, sinks=jnp.zeros(2), scale=1.0,
                           block_k=16, num_splits=2, interpret=interpret)
    np.testing.assert_allclose(np.asarray(out), want * [[[len(js) / (len(js) + 1)]]
                                                        for js in visible], rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpret", MODES)
def test_prefill_visible_sets_literal(interpret):
    S = 32
    v, k = one_hot_values(2, 1, S)
    q = jnp.zeros((2, 4, 1, S), jnp.float32)
    q_start = jnp.array([0, 17], jnp.int32)
    out = prefill_attention(q, k, v, q_start, window=8, scale=1.0, block_q=16, block_k=16,
                            interpret=interpret)
    want = np.zeros((2, 4, 1, S), np.float32)
    visible = {(0, 0): range(0, 1), (0, 1): range(0, 2), (0, 2): range(0, 3),
               (0, 3): range(0, 4), (1, 0): range(10, 18), (1, 1): range(11, 19),
               (1, 2): range(12, 20), (1, 3): range(13, 21)}
    for (b, t), js in visible.items():
        want[b, t, 0, list(js)] = 1.0 / len(js)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-6)


# ---- the references ----------------------------------------------------------------------

REF_CASES = [  # B, N, K, S, H, lengths, window, sinks
    (3, 6, 2, 24, 16, [1, 13, 24], None, True),
    (4, 8, 1, 24, 16, [7, 8, 9, 20], 8, False),
    (2, 4, 4, 24, 16, [5, 24], 8, True),
]


@pytest.mark.parametrize("B,N,K,S,H,lengths,window,sinks", REF_CASES)
def test_decode_ref_matches_numpy_and_layers(B, N, K, S, H, lengths, window, sinks):
    q, k, v, s, _ = make(1, B, 1, N, K, S, H, sinks)
    pos = np.asarray(lengths)[:, None] - 1                            # [B, 1]
    ref = decode_attention_ref(jnp.asarray(q[:, 0]), jnp.asarray(k), jnp.asarray(v),
                               jnp.asarray(lengths, jnp.int32), window=window,
                               sinks=None if s is None else jnp.asarray(s), scale=H ** -0.5)
    want = attention_np(q, k, v, pos, window, s, H ** -0.5)[:, 0]
    assert rel_err(ref, want) < F32_RTOL
    model = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                      window=window, sinks=None if s is None else jnp.asarray(s),
                      scale=H ** -0.5)[:, 0]
    assert rel_err(ref, model) < F32_RTOL


@pytest.mark.parametrize("B,N,K,S,H,lengths,window,sinks", REF_CASES)
def test_prefill_ref_matches_numpy_and_layers(B, N, K, S, H, lengths, window, sinks):
    T = 5
    q, k, v, s, _ = make(2, B, T, N, K, S, H, sinks)
    q_start = np.maximum(np.asarray(lengths) - T, 0)
    pos = q_start[:, None] + np.arange(T)                             # [B, T]
    ref = prefill_attention_ref(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(q_start, jnp.int32), window=window,
                                sinks=None if s is None else jnp.asarray(s), scale=H ** -0.5)
    want = attention_np(q, k, v, pos, window, s, H ** -0.5)
    assert rel_err(ref, want) < F32_RTOL
    model = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                      window=window, sinks=None if s is None else jnp.asarray(s),
                      scale=H ** -0.5)
    assert rel_err(ref, model) < F32_RTOL


# ---- kernels against the references ----------------------------------------------------------

DECODE_CASES = {  # B, N, K, S, H, lengths, window, sinks, dtype, tiling
    "one_row_G8_H64": (1, 8, 1, 37, 64, [37], None, False, jnp.float32, {}),
    "B3_G3_H16_sinks": (3, 6, 2, 50, 16, [1, 23, 50], None, True, jnp.float32,
                        dict(block_k=16, num_splits=4)),
    "window8_edges_G1": (4, 2, 2, 24, 64, [7, 8, 9, 20], 8, False, jnp.float32,
                         dict(block_k=16, num_splits=2)),
    "window8_edges_G1_sinks": (4, 2, 2, 24, 64, [7, 8, 9, 20], 8, True, jnp.float32,
                               dict(block_k=16, num_splits=2)),
    "G3_H24_window_sinks": (2, 6, 2, 40, 24, [20, 40], 8, True, jnp.float32, dict(block_k=16)),
    "bf16_G8_sinks": (2, 16, 2, 40, 64, [5, 33], None, True, jnp.bfloat16, dict(block_k=16)),
    # 3 splits (not a power of two); a row with nothing visible (length 0)
    "G3_H24_splits3_sinks": (3, 6, 2, 70, 24, [0, 30, 70], None, True, jnp.float32,
                             dict(block_k=16, num_splits=3)),
    "G3_splits3_no_sinks": (2, 6, 2, 70, 24, [0, 70], None, False, jnp.bfloat16,
                            dict(block_k=16, num_splits=3)),
    # >= COMBINE_KERNEL_MIN_SPLITS splits: merged by the Pallas combine kernel (12: not a power
    # of two; most splits of the short rows are empty)
    "G3_H24_splits8_sinks_window": (3, 6, 2, 150, 24, [0, 40, 150], 100, True, jnp.float32,
                                    dict(block_k=16, num_splits=8)),
    "G8_splits12_bf16": (2, 16, 2, 200, 64, [3, 200], None, False, jnp.bfloat16,
                         dict(block_k=16, num_splits=12)),
    # one split: the kernel normalises its output itself (sinks, a window, an empty row, G and
    # H not powers of two: padded rows / columns sliced off); and the same forced to the XLA
    # merge
    "G3_H24_one_split_sinks_window": (3, 6, 2, 70, 24, [0, 30, 70], 20, True, jnp.float32,
                                      dict(block_k=16, num_splits=1)),
    "G8_one_split_bf16_no_sinks": (2, 16, 2, 40, 64, [5, 33], None, False, jnp.bfloat16,
                                   dict(block_k=16, num_splits=1)),
    "G8_one_split_sinks_empty_row": (2, 16, 2, 40, 64, [0, 33], None, True, jnp.float32,
                                     dict(block_k=16, num_splits=1)),
    "G1_one_split_window": (2, 4, 4, 24, 64, [7, 20], 8, False, jnp.float32,
                            dict(block_k=16, num_splits=1)),                # GPT-2-like MHA
    "one_split_xla_merge_sinks": (2, 6, 2, 40, 24, [0, 33], None, True, jnp.float32,
                                  dict(block_k=16, num_splits=1, combine="xla")),
}


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_kernel_matches_ref(case, interpret):
    B, N, K, S, H, lengths, window, sinks, dtype, tiling = DECODE_CASES[case]
    q, k, v, s, cast = make(3, B, 1, N, K, S, H, sinks, dtype)
    args = (cast(q[:, 0]), cast(k), cast(v), jnp.asarray(lengths, jnp.int32))
    kw = dict(window=window, sinks=None if s is None else jnp.asarray(s), scale=H ** -0.5)
    got = decode_attention(*args, **kw, **tiling, interpret=interpret)
    ref = decode_attention_ref(*args, **kw)
    assert got.shape == (B, N, H) and got.dtype == dtype
    tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
    assert rel_err(got, ref) < tol, rel_err(got, ref)


PREFILL_CASES = {  # B, T, N, K, S, H, q_start, window, sinks, dtype, tiling
    "one_row_T37_G8_H64": (1, 37, 8, 1, 40, 64, [0], None, False, jnp.float32, {}),
    "B3_G3_H16_sinks": (3, 9, 6, 2, 50, 16, [0, 5, 41], None, True, jnp.float32,
                        dict(block_k=16)),
    "window8_edges_G1": (2, 21, 2, 2, 24, 64, [0, 3], 8, False, jnp.float32,
                         dict(block_q=16, block_k=16)),
    "window8_edges_G1_sinks": (2, 21, 2, 2, 24, 64, [0, 3], 8, True, jnp.float32,
                               dict(block_q=16, block_k=16)),
    "G3_H24_window_sinks": (2, 13, 6, 2, 40, 24, [2, 27], 8, True, jnp.float32, {}),
    "bf16_G8_sinks": (2, 13, 16, 2, 40, 64, [2, 27], None, True, jnp.bfloat16, {}),
}


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_kernel_matches_ref(case, interpret):
    B, T, N, K, S, H, q_start, window, sinks, dtype, tiling = PREFILL_CASES[case]
    q, k, v, s, cast = make(4, B, T, N, K, S, H, sinks, dtype)
    args = (cast(q), cast(k), cast(v), jnp.asarray(q_start, jnp.int32))
    kw = dict(window=window, sinks=None if s is None else jnp.asarray(s), scale=H ** -0.5)
    got = prefill_attention(*args, **kw, **tiling, interpret=interpret)
    ref = prefill_attention_ref(*args, **kw)
    assert got.shape == (B, T, N, H) and got.dtype == dtype
    tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
    assert rel_err(got, ref) < tol, rel_err(got, ref)


@pytest.mark.parametrize("interpret", MODES)
def test_layer_stack_and_prefill_t1_equals_decode(interpret):
    """The [L, B, K, S, H] stack with ``layer`` reads that layer; a one-token prefill at
    position lengths-1 is a decode step."""
    L, B, N, K, S, H = 3, 2, 6, 2, 40, 16
    rng = np.random.default_rng(5)
    kc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    lengths = jnp.array([11, 40], jnp.int32)
    kw = dict(window=16, sinks=sinks, scale=0.25)
    want = decode_attention_ref(q, kc[1], vc[1], lengths, **kw)
    assert rel_err(decode_attention_ref(q, kc, vc, lengths, **kw, layer=1), want) < F32_RTOL
    got = decode_attention(q, kc, vc, lengths, **kw, layer=1, block_k=16, interpret=interpret)
    assert rel_err(got, want) < F32_RTOL
    got = prefill_attention(q[:, None], kc, vc, lengths - 1, **kw, layer=1,
                            interpret=interpret)[:, 0]
    assert rel_err(got, want) < F32_RTOL


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("sinks", [False, True])
def test_combine_kernel_equals_xla_combine(sinks, interpret):
    """The Pallas merge of split partials against the XLA one on the same partials: empty splits
    (m = -inf, l = 0), a head with nothing visible anywhere, P = 12 (not a power of two), padded
    G and H.  Same float32 operations per element: equal to a few ulps."""
    rng = np.random.default_rng(11)
    B, K, P, G, H, Gp, Hp = 2, 3, 12, 5, 40, 16, 64
    o = rng.standard_normal((B, K, P, Gp, Hp)).astype(np.float32)
    m = (rng.standard_normal((B, K, P, Gp)) * 4).astype(np.float32)
    l = rng.uniform(0.5, 30, (B, K, P, Gp)).astype(np.float32)
    m[0, 1, 3:] = -np.inf                                            # empty splits
    l[0, 1, 3:], o[0, 1, 3:] = 0.0, 0.0
    m[1, 2], l[1, 2], o[1, 2] = -np.inf, 0.0, 0.0                    # nothing visible
    s = jnp.asarray(rng.standard_normal(K * G).astype(np.float32)) if sinks else None
    args = tuple(jnp.asarray(a) for a in (o, m, l))
    want = np.asarray(combine_splits(*args, s, G, H).reshape(B, K * G, H))
    got = np.asarray(combine_splits_kernel(*args, s, G, H, jnp.float32, interpret=interpret))
    assert got.shape == (B, K * G, H)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if not sinks:
        np.testing.assert_array_equal(got[1, 2 * G:3 * G], 0.0)


UPDATE_CASES = {  # L, B, N, K, S, H, positions, ring, window, sinks, rope, dtype, tiling
    "full_neox_sinks_2rows": (2, 2, 6, 2, 40, 24, [5, 39], False, None, True, "neox",
                              jnp.float32, dict(block_k=16, num_splits=2)),
    "full_norm_window_bf16": (2, 2, 16, 2, 64, 64, [0, 50], False, 8, False, "norm",
                              jnp.bfloat16, dict(block_k=16)),
    # a ring of 16 slots: slot = position mod 16, every written slot visible (no window)
    "ring_neox_sinks": (3, 2, 8, 2, 16, 32, [3, 37], True, None, True, "neox", jnp.float32,
                        dict(block_k=16)),
    # 8 splits: the new token in split 0 and the Pallas merge of the splits
    "full_neox_splits8": (1, 1, 8, 1, 200, 64, [150], False, None, True, "neox",
                          jnp.bfloat16, dict(block_k=16, num_splits=8)),
    # one split: normalised in the kernel (sinks; G = 3, H = 24 padded; a window) -- and a
    # ring without sinks
    "full_one_split_sinks_G3": (2, 2, 6, 2, 48, 24, [5, 47], False, 16, True, "neox",
                                jnp.float32, dict(block_k=16, num_splits=1)),
    "ring_one_split_bf16": (3, 2, 8, 2, 16, 32, [3, 37], True, None, False, "norm",
                            jnp.bfloat16, dict(block_k=16, num_splits=1)),
}


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_decode_attention_update_matches_ref(case, interpret):
    """RoPE + cache write + attention in one kernel against apply_rope, a scatter and the
    decode reference: the output within the dtype's tolerance, the written slot equal up to
    float32 rounding of RoPE's products (one bf16 rounding of the same values for bf16), every
    other slot of every layer untouched."""
    L, B, N, K, S, H, pos, ring, window, sinks, rope, dtype, tiling = UPDATE_CASES[case]
    rng = np.random.default_rng(len(case))
    kc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), dtype)
    vc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), dtype)
    q = jnp.asarray(rng.standard_normal((B, N, H)), dtype)
    kn, vn = (jnp.asarray(rng.standard_normal((B, K, H)), dtype) for _ in range(2))
    p = jnp.asarray(pos, jnp.int32)
    ang = p[:, None].astype(jnp.float32) * jnp.asarray(rng.uniform(1e-3, 1.0, H // 2), jnp.float32)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    lengths, slots = (jnp.minimum(p + 1, S), p % S) if ring else (p + 1, p)
    kw = dict(rope_type=rope, window=window, scale=H ** -0.5, layer=L - 1,
              sinks=jnp.asarray(rng.standard_normal(N), jnp.float32) if sinks else None)
    args = (q, kn, vn, kc, vc, lengths, slots, cos, sin)
    out, k2, v2 = decode_attention_update(*args, **kw, **tiling, interpret=interpret)
    want, kw2, vw2 = decode_attention_update_ref(*args, **kw)
    assert out.shape == (B, N, H) and out.dtype == dtype
    tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
    assert rel_err(out, want) < tol, rel_err(out, want)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(vw2))
    k2, kw2 = np.asarray(k2, np.float32), np.asarray(kw2, np.float32)
    np.testing.assert_allclose(k2, kw2, rtol=1e-6 if dtype == jnp.float32 else 2 ** -7, atol=1e-6)
    written = np.zeros(k2.shape, bool)
    written[L - 1, np.arange(B), :, np.asarray(slots)] = True
    np.testing.assert_array_equal(k2[~written], np.asarray(kc, np.float32)[~written])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", ["full_neox_sinks_2rows", "full_norm_window_bf16",
                                  "ring_one_split_bf16"])
def test_decode_attention_update_reads_split_k_partials(case, interpret):
    """The fused update reading the q/k/v projection as its K splits' partials (packed.SplitK):
    the same outputs and cache as reading the array those partials sum to -- the splits added
    in order, then the bias, then the projection's rounding, as numpy does it here.  Bit for
    bit with a bf16 rounding; float32 within 1e-6 (the compiler may contract the sum's last add
    into RoPE's multiplies, which a bf16 rounding in between prevents)."""
    L, B, N, K, S, H, pos, ring, window, sinks, rope, dtype, tiling = UPDATE_CASES[case]
    rng = np.random.default_rng(len(case) + 1)
    W = (N + 2 * K) * H
    kc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), dtype)
    vc = jnp.asarray(rng.standard_normal((L, B, K, S, H)), dtype)
    parts = rng.standard_normal((3, B, W)).astype(np.float32)
    bias = rng.standard_normal(W).astype(np.float32)
    qkv = jnp.asarray(((parts[0] + parts[1]) + parts[2]) + bias).astype(dtype)
    p = jnp.asarray(pos, jnp.int32)
    ang = p[:, None].astype(jnp.float32) * jnp.asarray(rng.uniform(1e-3, 1.0, H // 2), jnp.float32)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    lengths, slots = (jnp.minimum(p + 1, S), p % S) if ring else (p + 1, p)
    kw = dict(n_heads=N, rope_type=rope, window=window, scale=H ** -0.5, layer=L - 1,
              sinks=jnp.asarray(rng.standard_normal(N), jnp.float32) if sinks else None,
              interpret=interpret, **tiling)
    want = decode_attention_update_qkv(qkv, kc, vc, lengths, slots, cos, sin, **kw)
    got = decode_attention_update_qkv(jnp.asarray(parts), kc, vc, lengths, slots, cos, sin,
                                      qkv_bias=jnp.asarray(bias), qkv_dtype=dtype, **kw)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(GptjaxError, match="qkv_dtype"):
        decode_attention_update_qkv(jnp.asarray(parts), kc, vc, lengths, slots, cos, sin, **kw)
    with pytest.raises(GptjaxError, match="partials"):
        decode_attention_update_qkv(qkv, kc, vc, lengths, slots, cos, sin,
                                    qkv_bias=jnp.asarray(bias), **kw)
    with pytest.raises(GptjaxError, match="qkv_bias"):
        decode_attention_update_qkv(jnp.asarray(parts), kc, vc, lengths, slots, cos, sin,
                                    qkv_bias=jnp.asarray(bias[:-1]), qkv_dtype=dtype, **kw)


@pytest.mark.parametrize("interpret", MODES)
def test_decode_empty_row_is_zero(interpret):
    q = jnp.ones((2, 4, 16), jnp.float32)
    k = jnp.ones((2, 2, 20, 16), jnp.float32)
    lengths = jnp.array([0, 20], jnp.int32)
    for fn in (decode_attention_ref,
               lambda *a, **kw: decode_attention(*a, **kw, interpret=interpret)):
        out = np.asarray(fn(q, k, k, lengths, scale=0.25))
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_allclose(out[1], 1.0, rtol=1e-6)


def test_bad_arguments_raise():
    q = jnp.zeros((2, 6, 16))
    k = jnp.zeros((2, 2, 32, 16))
    lengths = jnp.array([1, 2], jnp.int32)
    with pytest.raises(GptjaxError, match="block_k"):
        decode_attention(q, k, k, lengths, scale=1.0, block_k=24, interpret=True)
    with pytest.raises(GptjaxError, match="sinks"):
        decode_attention(q, k, k, lengths, scale=1.0, sinks=jnp.zeros(16), interpret=True)
    with pytest.raises(GptjaxError, match="N divisible by K"):
        decode_attention_ref(jnp.zeros((2, 5, 16)), k, k, lengths, scale=1.0)
    with pytest.raises(GptjaxError, match="block_q"):
        prefill_attention(q[:, None], k, k, lengths, scale=1.0, block_q=3, interpret=True)
    with pytest.raises(GptjaxError, match="window"):
        prefill_attention_ref(q[:, None], k, k, lengths, scale=1.0, window=0)
    # the fused update: the projection's width, the RoPE tables, the RoPE kind
    stack = k[None]                                                     # [1, B, K, S, H]
    cs = jnp.zeros((2, 8))
    upd = dict(n_heads=6, scale=1.0, layer=0, interpret=True)
    with pytest.raises(GptjaxError, match="qkv"):
        decode_attention_update_qkv(jnp.zeros((2, 9 * 16)), stack, stack, lengths, lengths, cs,
                                    cs, rope_type="neox", **upd)
    with pytest.raises(GptjaxError, match="cos/sin"):
        decode_attention_update_qkv(jnp.zeros((2, 10 * 16)), stack, stack, lengths, lengths,
                                    cs[:, :4], cs, rope_type="neox", **upd)
    with pytest.raises(GptjaxError, match="rope_type"):
        decode_attention_update_qkv(jnp.zeros((2, 10 * 16)), stack, stack, lengths, lengths, cs,
                                    cs, rope_type="yarn", **upd)
