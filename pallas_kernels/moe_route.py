"""MoE routing for the grouped expert kernel in one Pallas program: top-k, softmax, the sort of
the routed rows by expert and the expert tiles.

Why.  At batch 64 the routing between the router logits and the grouped expert kernel was
~13 small XLA kernels per layer (``lax.top_k`` and ``argsort`` as sorts, softmax, ``bincount`` as
a scatter, ``cumsum`` as a reduce-window, the inverse permutation as another scatter, clamps,
stacks): ~20 µs of launch-bound work per layer, ~0.5 ms of a ~10.3 ms step (H100 profile,
RESULTS.md tenth session).  Here it is one kernel of one program.

Math, for logits ``[T, E]`` (float32), U = ``n_used`` experts per token, tiles of ``block_m``
rows (:func:`pallas_kernels.mxfp4_matmul.moe_tiles` is the reference)::

    rank[t, i] = #{j : l[t, j] > l[t, i] or (l[t, j] == l[t, i] and j < i)}   lax.top_k order
                 (NaN counted as +inf)
    ids[t, u] = the i with rank[t, i] == u;  weights[t] = softmax(l[t, ids[t]])
    routed row r = t U + u;  sorted position inv[t, u] = starts[e] + #{t' < t : e in ids[t']}
    with e = ids[t, u], counts[e] = #{t : e in ids[t]}, starts = exclusive cumsum of counts
    order[inv[t, u]] = t U + u                         (= a stable argsort of ids.reshape(-1))
    tiles[:, i] = (expert, first sorted row, end sorted row) of tile i: each expert's rows cut
    into tiles of block_m, in expert order; tiles past the last are (E - 1, 0, 0)

Each token picks an expert at most once, so "earlier rows of expert e" are the earlier tokens
that picked e: one column cumsum of the [T, E] selection matrix, no [R, R] comparison.  The
ranks come from one [T, E] comparison per expert column (E unrolled steps), not U rounds of
max-then-argmin.  ``order`` is written by a scatter store (into a buffer of R + Tp slots:
the padding rows' masked lanes get slots of their own past R).

Size: one program holds a few [Tp, Ep] int32 tiles (powers of two >= T, E): :func:`fits` bounds
``Tp * Ep``; larger calls take the XLA reference (:func:`moe_route_ref`), as does the CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import WeightsError
from pallas_kernels.decode_attention import next_pow2
from pallas_kernels.mxfp4_matmul import _iota, _ix, inverse_order, moe_n_tiles, moe_tiles

__all__ = ["Route", "moe_route", "moe_route_ref", "fits", "MAX_ELEMS"]

F32, I32 = jnp.float32, jnp.int32
#: Largest ``Tp * Ep`` one routing program takes (128 tokens of 32 experts, 32 of 128).
MAX_ELEMS = 4096


class Route(NamedTuple):
    """The routing of T tokens: ``weights`` float32 [T, U] (softmax over the U selected
    logits, slot 0 the largest), ``ids`` int32 [T, U] (their experts), ``inv`` int32 [T, U] (the
    sorted position of routed row t U + u), ``order`` int32 [T U] (sorted position -> routed
    row), ``tiles`` int32 [3, n_tiles] (expert, first row, end row; ``moe_n_tiles``)."""

    weights: jax.Array
    ids: jax.Array
    inv: jax.Array
    order: jax.Array
    tiles: jax.Array


def fits(T: int, E: int) -> bool:
    """Whether one routing program takes T tokens of E experts."""
    return next_pow2(T) * next_pow2(E) <= MAX_ELEMS


def _warps(T: int, E: int) -> int:
    """Warps of the routing program: 4, or 8 from 2048 elements per [Tp, Ep] tile (offline SASS
    for 64 tokens x 32 experts: 2,328 instructions with 4 warps, 1,536 with 8, no spills; 512
    tokens spilled with up to 32 warps, hence :data:`MAX_ELEMS`)."""
    return 8 if next_pow2(T) * next_pow2(E) >= 2048 else 4


def _route_kernel(logits_ref, w_ref, ids_ref, inv_ref, order_ref, tiles_ref, *, T, E, U, bm, NT):
    Tp, Ep, NTp = next_pow2(T), next_pow2(E), next_pow2(NT)
    t_ok = _iota(Tp) < T                                                   # [Tp]
    e_idx = lax.broadcasted_iota(I32, (Tp, Ep), 1)                         # [Tp, Ep]
    ok2 = t_ok[:, None] & (e_idx < E)
    lg = pltriton.load(logits_ref.at[pl.ds(0, Tp), pl.ds(0, Ep)], mask=ok2, other=-jnp.inf)

    # rank, one expert column j at a time; unrolled, so that the E column loads (L1/L2 hits)
    # are all issued before the comparisons wait on them (a loop waited E times).  NaN counts
    # as +inf: the order stays strict and total, so the ranks are a permutation and every index
    # below stays in range whatever the logits hold (lax.top_k also puts NaN first, but before
    # +inf; only a row holding both can differ).
    lg = jnp.where(lg != lg, jnp.inf, lg)
    rank = jnp.where(e_idx < E, 0, E).astype(I32)                         # [Tp, Ep]
    for j in range(E):
        col = pltriton.load(logits_ref.at[pl.ds(0, Tp), _ix(j)], mask=t_ok,
                            other=-jnp.inf)[:, None]
        col = jnp.where(col != col, jnp.inf, col)
        rank = rank + ((col > lg) | ((col == lg) & (j < e_idx))).astype(I32)
    sel = ((rank < U) & ok2).astype(I32)
    counts = jnp.sum(sel, axis=0)                                         # [Ep]
    starts = jnp.cumsum(counts) - counts                                  # [Ep]
    pos = starts[None, :] + jnp.cumsum(sel, axis=0) - sel                 # [Tp, Ep]

    top = []
    for u in range(U):
        hit = rank == u
        e_u = jnp.sum(jnp.where(hit, e_idx, 0), axis=1)                    # one hit per row
        top.append(jnp.sum(jnp.where(hit, lg, 0.0), axis=1))
        inv_u = jnp.sum(jnp.where(hit, pos, 0), axis=1)                    # [Tp]
        pltriton.store(ids_ref.at[pl.ds(0, Tp), _ix(u)], e_u, mask=t_ok)
        pltriton.store(inv_ref.at[pl.ds(0, Tp), _ix(u)], inv_u, mask=t_ok)
        r = _iota(Tp) * U + u
        # order[inv] = r; padding rows (t >= T) aim at their own slots past R (masked off on
        # the GPU; interpret mode writes them, and they must not collide with real slots)
        pltriton.store(order_ref.at[jnp.where(t_ok, inv_u, T * U + _iota(Tp))], r, mask=t_ok)
    ex = [jnp.exp(v - top[0]) for v in top]
    total = functools.reduce(lambda a, b: a + b, ex)
    for u in range(U):
        pltriton.store(w_ref.at[pl.ds(0, Tp), _ix(u)], ex[u] / total, mask=t_ok)

    # Tiles: expert e owns tiles [t_end[e] - n_t[e], t_end[e]).
    n_t = (counts + (bm - 1)) // bm                                       # [Ep]
    t_end = jnp.cumsum(n_t)
    t_start = t_end - n_t
    i = _iota(NTp)                                                        # [NTp]
    e_i = jnp.minimum(jnp.sum((t_end[None, :] <= i[:, None]).astype(I32), axis=1), E - 1)
    hit = lax.broadcasted_iota(I32, (NTp, Ep), 1) == e_i[:, None]         # [NTp, Ep] one-hot

    def at_e(v):
        return jnp.sum(jnp.where(hit, v[None, :], 0), axis=1)

    row0 = at_e(starts) + (i - at_e(t_start)) * bm
    row_end = jnp.minimum(row0 + bm, at_e(starts) + at_e(counts))
    valid = i < jnp.sum(n_t)
    i_ok = i < NT
    pltriton.store(tiles_ref.at[_ix(0), pl.ds(0, NTp)], e_i, mask=i_ok)
    pltriton.store(tiles_ref.at[_ix(1), pl.ds(0, NTp)], jnp.where(valid, row0, 0), mask=i_ok)
    pltriton.store(tiles_ref.at[_ix(2), pl.ds(0, NTp)], jnp.where(valid, row_end, 0), mask=i_ok)


def _check(logits, n_used, block_m, fn):
    if logits.ndim != 2:
        raise WeightsError(f"{fn}: logits must be [T, E], got {list(logits.shape)}")
    T, E = logits.shape
    if not 1 <= n_used <= E:
        raise ValueError(f"{fn}: n_used={n_used} must be in [1, E={E}]")
    if block_m < 1:
        raise ValueError(f"{fn}: block_m={block_m} must be >= 1")
    return T, E


@functools.partial(jax.jit, static_argnames=("n_used", "block_m", "num_warps", "interpret"))
def moe_route(logits, *, n_used: int, block_m: int, num_warps: int | None = None,
              interpret: bool = False) -> Route:
    """The :class:`Route` of router logits float ``[T, E]`` (top ``n_used`` experts per token,
    tiles of ``block_m`` sorted rows), in one Pallas program; ``fits(T, E)`` must hold.
    ``num_warps``: the program's warps (default :func:`_warps`)."""
    T, E = _check(logits, n_used, block_m, "moe_route")
    if not fits(T, E):
        raise ValueError(f"moe_route: {T} tokens x {E} experts exceed one program "
                         f"(fits(); use moe_route_ref)")
    U, R = n_used, T * n_used
    NT = moe_n_tiles(R, E, block_m)
    kernel = functools.partial(_route_kernel, T=T, E=E, U=U, bm=block_m, NT=NT)
    out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((T, U), F32), jax.ShapeDtypeStruct((T, U), I32),
                   jax.ShapeDtypeStruct((T, U), I32), jax.ShapeDtypeStruct((R + next_pow2(T),), I32),
                   jax.ShapeDtypeStruct((3, NT), I32)),
        grid=(1,), compiler_params=pltriton.CompilerParams(num_warps=num_warps or _warps(T, E),
                                                          num_stages=1),
        interpret=interpret, name="moe_route")(logits.astype(F32))
    w, ids, inv, order, tiles = out
    return Route(w, ids, inv, order[:R], tiles)


@functools.partial(jax.jit, static_argnames=("n_used", "block_m", "interpret"))
def moe_route_ref(logits, *, n_used: int, block_m: int, interpret: bool = False) -> Route:
    """Plain-jnp twin of :func:`moe_route` (any size): ``lax.top_k``, ``jax.nn.softmax``,
    :func:`~pallas_kernels.mxfp4_matmul.moe_tiles`."""
    del interpret
    T, E = _check(logits, n_used, block_m, "moe_route_ref")
    top, ids = lax.top_k(logits.astype(F32), n_used)
    ids = ids.astype(I32)
    order, tiles = moe_tiles(ids.reshape(-1), E, block_m)
    return Route(jax.nn.softmax(top, axis=-1), ids, inverse_order(order).reshape(T, n_used),
                 order, tiles)
