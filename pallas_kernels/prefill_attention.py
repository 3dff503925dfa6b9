"""Flash attention forward for prefill: T new queries per row over the KV cache, causal by position.

Math (row b, query t at position p = q_start[b] + t, query head n = k*G + g, G = N/K)::

    visible j:  j <= p,  j < S,  and j > p - window (sliding layers only)
    s_j = scale * q[b, t, n] . k[b, k, j]                                        (float32)
    out[b, t, n] = sum_j exp(s_j) v[b, k, j] / (exp(sink_n) + sum_j exp(s_j))

(sink term only with ``sinks``), i.e. ``gptjax.models.layers.attention`` with
q_positions = q_start[:, None] + arange(T).

Algorithm: FlashAttention (Dao et al. 2022, arXiv:2205.14135) forward with an online softmax.
Program (b, k, i) takes ``block_q`` consecutive queries times the G query heads of kv head k
as one tile of ``block_q * Gp`` rows (row r = query r // Gp, head r % Gp; Gp = pow2 >= G), so
every K/V block is read once for all G heads and the dot has at least 16 rows. The key loop
runs only over [lo, hi): hi = one past the block's last query position (causal), lo = the first
query position - window + 1 (sliding window) or 0 — fully masked key blocks are never visited,
so causal prefill from position 0 does about half the work of the full square. Rows whose
keys start later in the block (window) see fully masked blocks first; their finite MASK score
contributes weight exactly 0 once a visible key arrives (every row with p < S has key j = p).
The sink joins the denominator after the loop: M = max(m, sink), l = l e^(m-M) + e^(sink-M).
Programs are launched last query block first, so the longest ones start first.

Layouts: q [B, T, N, H] as the model has it; k, v in the cache layout [B, K, S, H] (one layer
slice of ``gptjax.cache.KVCache``; or the [L, B, K, S, H] stack with static ``layer``, read in
place). q and the output are rearranged in jnp to [B, K, T*Gp, H] (q is small next to the cache).

Kernel backend: Pallas-Triton via explicit ``pltriton.CompilerParams`` (the project's
JAX_PALLAS.md notes, §1.5); ``interpret=True`` runs it on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import GptjaxError
from pallas_kernels.decode_attention import (F32, MASK_VALUE, MIN_DOT, _einsum_f32, check_cache_args,
                                             dot_f32, next_pow2, use_kernel)

__all__ = ["prefill_attention", "prefill_attention_ref", "use_kernel", "default_block_q"]


def _prefill_kernel(qs_ref, q_ref, k_ref, v_ref, *refs, block_q, block_k, Gp, n_q_blocks,
                    window, head_dim, scale, has_sinks):
    # qs_ref: [] int32; q_ref: [R, Hp] with R = block_q * Gp; k_ref, v_ref: [S, H];
    # sink_ref (with sinks): [R] f32; o_ref: [R, Hp]
    sink_ref, o_ref = refs if has_sinks else (None, refs[0])
    qi = n_q_blocks - 1 - pl.program_id(2)                           # heavy blocks first
    S = k_ref.shape[0]
    R, Hp = q_ref.shape
    t0 = qs_ref[()] + qi * block_q                                    # position of the first query
    row_pos = t0 + jnp.arange(R) // Gp                                # [R]
    hi = jnp.minimum(t0 + block_q, S)                                 # keys [lo, hi)
    lo = jnp.zeros_like(hi) if window is None else jnp.maximum(t0 - window + 1, 0)
    n_blocks = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)

    q = q_ref[...]                                                    # [R, Hp]
    h_ok = (jnp.arange(Hp) < head_dim)[None, :]

    def body(i, carry):
        acc, m, l = carry
        start = lo + i * block_k
        pos = start + jnp.arange(block_k)                             # [bk]
        valid = pos < hi
        ld_mask = valid[:, None] & h_ok if Hp != head_dim else valid[:, None]
        idx = (pl.ds(start, block_k), pl.ds(0, Hp))
        k = pltriton.load(k_ref.at[idx], mask=ld_mask, other=0.0)     # [bk, Hp]
        v = pltriton.load(v_ref.at[idx], mask=ld_mask, other=0.0)
        s = dot_f32(q, k, trans_b=True) * scale                       # [R, bk]
        vis = valid[None, :] & (pos[None, :] <= row_pos[:, None])
        if window is not None:
            vis = vis & (pos[None, :] > row_pos[:, None] - window)
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))                    # [R]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v)    # [R, Hp]
        return acc, m_new, l

    init = (jnp.zeros((R, Hp), F32), jnp.full((R,), -jnp.inf, F32), jnp.zeros((R,), F32))
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    if has_sinks:
        sink = sink_ref[...]                                          # [R]
        m_all = jnp.maximum(m, sink)
        alpha = jnp.exp(m - m_all)
        l = l * alpha + jnp.exp(sink - m_all)
        acc = acc * alpha[:, None]
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _check(q, k, v, q_start, layer, window, sinks, name):
    if q.ndim != 4:
        raise GptjaxError(f"{name}: q must be [B, T, N, H], got shape {q.shape}")
    B, T, N, H = q.shape
    K, S = check_cache_args(name, B, N, H, k, v, "q_start", q_start, layer, window, sinks)
    return B, T, N, K, S, H


def default_block_q(T: int, G: int, rows: int = 128) -> int:
    """Queries per program: ``rows`` tile rows (block_q * Gp) at most, no more than T needs,
    and at least 16 rows (Triton's smallest dot)."""
    Gp = next_pow2(G)
    bq = min(max(1, rows // Gp), next_pow2(T))
    return max(bq, -(-MIN_DOT // Gp))


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_q", "block_k",
                                             "num_warps", "num_stages", "layer", "interpret"))
def prefill_attention(q, k, v, q_start, *, window=None, sinks=None, scale, block_q=None,
                      block_k=64, num_warps=4, num_stages=2, layer=None, interpret=False):
    """Causal (optionally sliding-window, sink) attention of T queries per row (Pallas-Triton).

    q: [B, T, N, H]; k, v: [B, K, S, H] (or the [L, B, K, S, H] stack with static ``layer``),
    already holding the new keys/values at their positions; q_start: int32 [B], position of
    q[:, 0]; window: None or static int; sinks: None or float [N]; scale: static float.
    Tiling: block_q queries per program (power of two; None: :func:`default_block_q`; the tile
    has block_q * pow2(G) >= 16 rows), block_k keys per step (power of two >= 16).
    Returns [B, T, N, H] in q.dtype. Every query position must be < S (the cache has a slot
    for it, so the query sees at least its own key); the kernel never reads past S.
    """
    B, T, N, K, S, H = _check(q, k, v, q_start, layer, window, sinks, "prefill_attention")
    G = N // K
    Gp, Hp = next_pow2(G), max(MIN_DOT, next_pow2(H))
    bq = default_block_q(T, G) if block_q is None else int(block_q)
    if bq < 1 or bq != next_pow2(bq) or bq * Gp < MIN_DOT:
        raise GptjaxError(f"prefill_attention: block_q={bq} must be a power of two with "
                          f"block_q * {Gp} (query heads per kv head, padded) >= {MIN_DOT}")
    if block_k < MIN_DOT or block_k != next_pow2(block_k):
        raise GptjaxError(f"prefill_attention: {block_k=} must be a power of two >= {MIN_DOT}")
    nq = -(-T // bq)
    Tp, R = nq * bq, bq * Gp
    dtype = k.dtype
    qr = q.astype(dtype).reshape(B, T, K, G, H)
    qr = jnp.pad(qr, ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, Hp - H)))
    qr = qr.transpose(0, 2, 1, 3, 4).reshape(B, K, Tp * Gp, Hp)      # row t*Gp + g

    rev = lambda i: nq - 1 - i                                        # noqa: E731
    if layer is None:
        kv_spec = pl.BlockSpec((None, None, S, H), lambda b, h, i: (b, h, 0, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, None, S, H), lambda b, h, i: (layer, b, h, 0, 0))
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, i: (b,)),
        pl.BlockSpec((None, None, R, Hp), lambda b, h, i: (b, h, rev(i), 0)),
        kv_spec,
        kv_spec,
    ]
    args = [q_start.astype(jnp.int32), qr, k, v]
    if sinks is not None:
        sink = jnp.pad(sinks.astype(F32).reshape(K, G), ((0, 0), (0, Gp - G)))
        args.append(jnp.tile(sink, (1, bq)))                          # [K, R]: row r → r % Gp
        in_specs.append(pl.BlockSpec((None, R), lambda b, h, i: (h, 0)))
    kernel = functools.partial(_prefill_kernel, block_q=bq, block_k=block_k, Gp=Gp,
                               n_q_blocks=nq, window=window, head_dim=H, scale=float(scale),
                               has_sinks=sinks is not None)
    out = pl.pallas_call(
        kernel,
        grid=(B, K, nq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, R, Hp), lambda b, h, i: (b, h, rev(i), 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Tp * Gp, Hp), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(*args)
    out = out.reshape(B, K, Tp, Gp, Hp)[:, :, :T, :G, :H]
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_q", "block_k",
                                             "num_warps", "num_stages", "layer", "interpret"))
def prefill_attention_ref(q, k, v, q_start, *, window=None, sinks=None, scale, block_q=None,
                          block_k=64, num_warps=4, num_stages=2, layer=None, interpret=False):
    """Plain-jnp twin of :func:`prefill_attention` (same signature; tiling arguments ignored).

    Scores and softmax in float32; probabilities cast to the value dtype for the second matmul,
    accumulated in float32 (as ``gptjax.models.layers.attention``). A query with no visible key
    returns zeros.
    """
    del block_q, block_k, num_warps, num_stages, interpret
    B, T, N, K, S, H = _check(q, k, v, q_start, layer, window, sinks, "prefill_attention_ref")
    if layer is not None:
        k, v = k[layer], v[layer]
    G = N // K
    qg = q.astype(k.dtype).reshape(B, T, K, G, H)
    s = _einsum_f32("btkgh,bksh->bkgts", qg, k) * scale               # [B, K, G, T, S]
    p = q_start.astype(jnp.int32)[:, None, None] + jnp.arange(T)[None, :, None]   # [B, T, 1]
    j = jnp.arange(S)[None, None, :]                                  # [1, 1, S]
    visible = j <= p
    if window is not None:
        visible = visible & (j > p - window)
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)                            # [B, K, G, T, 1]
    if sinks is not None:
        sink = sinks.astype(F32).reshape(1, K, G, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    probs = e / jnp.where(denom == 0, 1.0, denom)
    out = _einsum_f32("bkgts,bksh->btkgh", probs.astype(v.dtype), v)  # [B, T, K, G, H]
    return out.reshape(B, T, N, H).astype(q.dtype)
