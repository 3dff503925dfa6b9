"""The MoE routing kernel (pallas_kernels/moe_route.py) and the grouped expert matmul on sorted rows
(mxfp4_matmul.mxfp4_moe_grouped), against independent numpy oracles.

* Routing: integer ids and positions must match exactly; the softmax weights to float32
  rounding (rtol 1e-6: exp and the division, one or two ulps apart between Triton and XLA).
  Logits drawn from a few integers, so ties are everywhere (top-k order: the lower expert first).
* Grouped on sorted rows: every routed row against the float64 product of its own expert (the
  bound of test_matmul_kernels.check_bound), and equal to the unsorted
  ``mxfp4_moe_matmul`` once un-sorted.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from pallas_kernels import moe_route as mr
from pallas_kernels import mxfp4_matmul as mx
from kernel_modes import MODES
from test_matmul_kernels import as_x, check_bound, mxfp4_bytes, oracle, tol


def route_oracle(logits: np.ndarray, U: int, bm: int):
    """numpy: (weights, ids, inv, order, tiles) by sorting and walking, no shared code."""
    Tn, E = logits.shape
    ids = np.stack([np.argsort(-row, kind="stable")[:U] for row in logits]).astype(np.int32)
    top = np.take_along_axis(logits, ids, 1).astype(np.float64)
    ex = np.exp(top - top[:, :1])
    weights = ex / ex.sum(1, keepdims=True)
    order = np.argsort(ids.reshape(-1), kind="stable").astype(np.int32)
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size, dtype=np.int32)
    tiles, start = [], 0
    for e in range(E):
        n = int(np.sum(ids == e))
        tiles += [(e, r, min(r + bm, start + n)) for r in range(start, start + n, bm)]
        start += n
    nt = mx.moe_n_tiles(Tn * U, E, bm)
    assert len(tiles) <= nt
    tiles += [(E - 1, 0, 0)] * (nt - len(tiles))
    return weights, ids, inv.reshape(Tn, U), order, np.array(tiles, np.int32).T


ROUTE_CASES = [(64, 32, 4, 16), (1, 32, 4, 16), (3, 4, 2, 16), (100, 32, 4, 64), (7, 128, 4, 16),
               (128, 32, 4, 16), (5, 8, 1, 2), (16, 6, 6, 4)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("T_, E, U, bm", ROUTE_CASES)
def test_route_against_numpy(T_, E, U, bm, interpret):
    rng = np.random.default_rng(T_ * 1000 + E * 10 + U)
    logits = rng.integers(-3, 4, (T_, E)).astype(np.float32)             # ties everywhere
    logits[0] = 1.0                                                      # one row all tied
    if T_ > 2:
        logits[2] = rng.standard_normal(E) * 30                          # a spread-out row
    want = route_oracle(logits, U, bm)
    assert mr.fits(T_, E)
    for got in (mr.moe_route(jnp.asarray(logits), n_used=U, block_m=bm, interpret=interpret),
                mr.moe_route_ref(jnp.asarray(logits), n_used=U, block_m=bm)):
        np.testing.assert_allclose(np.asarray(got.weights), want[0], rtol=1e-6, atol=1e-7)
        for name, g, w in zip(got._fields[1:], got[1:], want[1:]):
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


@pytest.mark.parametrize("interpret", MODES)
def test_route_nan_and_inf_logits(interpret):
    """NaN and +-inf logits: the routing stays a valid permutation (every index in range: the
    grouped kernel reads and writes rows by these) and equals the reference's (lax.top_k puts
    NaN first, as the kernel's NaN-as-+inf does unless a row also holds +inf: row 4, checked for
    validity only); NaN weights where the reference has them."""
    rng = np.random.default_rng(7)
    logits = rng.integers(-2, 3, (16, 8)).astype(np.float32)
    logits[1, [2, 5]] = np.nan
    logits[2, :] = np.nan
    logits[3, [0, 7]] = np.inf
    logits[4, [1, 6]] = [np.nan, np.inf]
    logits[5, :] = -np.inf
    got = mr.moe_route(jnp.asarray(logits), n_used=4, block_m=4, interpret=interpret)
    ids = np.asarray(got.ids)
    assert all(len(set(row)) == 4 for row in ids) and ids.min() >= 0 and ids.max() < 8
    assert sorted(np.asarray(got.order).tolist()) == list(range(64))
    np.testing.assert_array_equal(np.asarray(got.order)[np.asarray(got.inv).reshape(-1)],
                                  np.arange(64))
    assert np.asarray(got.tiles)[2].max() <= 64
    logits[4, 1] = 0.0                                           # no NaN beside +inf
    got = mr.moe_route(jnp.asarray(logits), n_used=4, block_m=4, interpret=interpret)
    ref = mr.moe_route_ref(jnp.asarray(logits), n_used=4, block_m=4)
    for name, g, w in zip(got._fields[1:], got[1:], ref[1:]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    np.testing.assert_allclose(np.asarray(got.weights), np.asarray(ref.weights), rtol=1e-6,
                               equal_nan=True)


def test_route_size_and_argument_errors():
    assert mr.fits(128, 32) and not mr.fits(129, 32) and not mr.fits(64, 128)
    with pytest.raises(ValueError, match="exceed one program"):
        mr.moe_route(jnp.zeros((256, 32)), n_used=4, block_m=16, interpret=True)
    with pytest.raises(ValueError, match="n_used"):
        mr.moe_route(jnp.zeros((4, 8)), n_used=9, block_m=16, interpret=True)
    # the reference takes any size
    r = mr.moe_route_ref(jnp.zeros((256, 32)), n_used=4, block_m=16)
    assert r.order.shape == (1024,) and r.tiles.shape == (3, mx.moe_n_tiles(1024, 32, 16))


GROUPED_CASES = [
    # (T, U, E, O, I, dtype, layout, bias)
    (9, 4, 5, 40, 64, jnp.float32, "split", True),               # byte view (R = 36)
    (16, 4, 8, 24, 96, jnp.bfloat16, "ggml", False),             # byte view, bf16
    (70, 4, 6, 40, 96, jnp.bfloat16, "split", True),             # R = 280: word decode, bm 64
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: f"T{c[0]}-E{c[2]}-{c[6]}")
def test_grouped_on_sorted_rows(case, interpret):
    t, U, E, o, i, dtype, layout, with_bias = case
    rng = np.random.default_rng(t * 10 + E)
    raw = mxfp4_bytes(rng, (E, o, i))
    w64 = oracle(raw.reshape(E * o, -1), T.MXFP4).reshape(E, o, i)
    x, x64 = as_x(rng, (t, i), dtype)
    b = jnp.asarray(rng.standard_normal((E, o)).astype(np.float32)) if with_bias else None
    w = mx.repack_mxfp4(raw) if layout == "split" else jnp.asarray(raw)
    bm = mx.moe_block_m(t * U)
    r = mr.moe_route_ref(jnp.asarray(rng.standard_normal((t, E)), jnp.float32), n_used=U,
                         block_m=bm)
    xs = jnp.take(x, r.order // U, axis=0)
    ys = np.asarray(mx.mxfp4_moe_grouped(xs, w, r.tiles, b, block_m=bm, interpret=interpret))
    ys_ref = np.asarray(mx.mxfp4_moe_grouped_ref(xs, w, r.tiles, b))
    ids, order = np.asarray(r.ids).reshape(-1), np.asarray(r.order)
    for s in range(t * U):
        row = order[s]
        ex = ids[row]
        b64 = None if b is None else np.asarray(b)[ex].astype(np.float64)
        for got in (ys[s][None], ys_ref[s][None]):
            check_bound(got, x64[row // U][None], w64[ex], b64, tol(dtype, i))
    # un-sorted, the same numbers as the unsorted call (same kernel, same tiles)
    y = np.asarray(mx.mxfp4_moe_matmul(x, w, r.ids, b, interpret=interpret)).reshape(t * U, o)
    np.testing.assert_array_equal(ys[np.asarray(r.inv).reshape(-1)], y)


def test_tile_experts():
    tiles = jnp.array([[2, 0, 1, 1], [0, 3, 5, 0], [3, 5, 6, 0]])
    np.testing.assert_array_equal(np.asarray(mx.tile_experts(tiles, 7)), [2, 2, 2, 0, 0, 1, 0])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_warps", [4, 16])
def test_route_num_warps_override(num_warps, interpret):
    """The warps override changes the program's layout only: same routing as the reference."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    got = mr.moe_route(logits, n_used=4, block_m=16, num_warps=num_warps, interpret=interpret)
    ref = mr.moe_route_ref(logits, n_used=4, block_m=16)
    for name, g, w in zip(got._fields[1:], got[1:], ref[1:]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    np.testing.assert_allclose(np.asarray(got.weights), np.asarray(ref.weights), rtol=1e-6)
