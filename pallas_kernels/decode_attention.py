"""Flash-decoding: one new query per row attending over the KV cache, split along the sequence.

Math (one row b, query head n = k*G + g of kv head k, G = N/K; query position p = lengths[b] - 1)::

    visible j:  j <= p,  j < S,  and j > p - window (sliding layers only)
    s_j = scale * q[b, n] . k_cache[b, k, j]                                   (float32)
    out[b, n] = sum_j exp(s_j) v_cache[b, k, j] / (exp(sink_n) + sum_j exp(s_j))

The sink term (gpt-oss: one learned logit per *query* head, no value vector) only with ``sinks``.
This is ``gptjax.models.layers.attention`` for T = 1 with the query at position lengths-1.

Split-K ("flash-decoding": Dao, Haziza, Massa, Sizov 2023,
https://crfm.stanford.edu/2023/10/12/flashdecoding.html):
the visible range [lo, hi) of each row, lo = max(0, lengths - window), hi = min(lengths, S), is cut
into ``num_splits`` spans of whole ``block_k`` blocks; program (b, k, s) runs an online softmax
(Milakov & Gimelshein 2018) over span s for the G query heads of kv head k and writes the partial
unnormalised output o_s [G, H], its running max m_s [G] and sum l_s [G]. The combine in jnp::

    M = max(max_s m_s, sink);  w_s = exp(m_s - M)
    out = sum_s w_s o_s / (sum_s w_s l_s + exp(sink - M))

The spans are cut per row from the *visible* range, so every split does about the same work
whatever the row's length or window (a 128-key window on an 8k cache is not left to one split).
From :data:`COMBINE_KERNEL_MIN_SPLITS` splits on, the merge is one Pallas kernel
(:func:`combine_splits_kernel`, one program per row and query head: XLA made three kernels of it
at 32 splits, 7.3 µs per gpt-oss layer at 4096 tokens on the H100; kernel + merge 11.4 -> 5.9).
With one split (:func:`one_split_in_kernel`; batch 64 of gpt-oss always) each program applies
the same combine to its own partials and writes the normalised output: for G and H powers of
two its [G, H] block of the [B, N, H] result (the padded rows dropped in registers), so no
merge or slice kernel follows (batch 64: one 2.4 µs XLA kernel per layer before).

Batch-1 decode with RoPE (:func:`decode_attention_update_qkv`): the same kernel also rotates q
and the new key (RoPE in float32, as ``gptjax.models.layers.apply_rope``), reads them and the new
value straight from the fused q/k/v projection, and writes the new key/value into the cache
(aliased in place).  Split 0 takes the new token from registers and alone writes its slot; every
program skips that slot when reading the cache, so the write races nothing.  That replaced five
XLA kernels per layer (the q/k/v slices, RoPE, the two cache writes; ~1.2 µs each).

Cache layout: ``k_cache, v_cache: [B, K, S, H]`` — one layer slice of ``gptjax.cache.KVCache``
(``[L, B, K, S, H]``). Each (b, k) owns S contiguous key rows of H elements, so a block of
``block_k`` keys is one contiguous ``block_k * H`` run (coalesced loads, no transpose). Passing
the whole stack with ``layer=l`` (static) reads layer l in place: slicing ``cache.k[l]`` outside
the kernel would make XLA copy the layer before the custom call.

GQA: the G query heads of one kv head are one [Gp, Hp] tile (Gp = max(16, pow2 >= G), Hp = pow2
>= H), so each K/V block is read once for all G heads. Triton's ``tl.dot`` needs every dot
dimension >= 16, hence the padding to 16 rows (the padded rows are zero queries whose output is
dropped). Non-power-of-two H is handled with masked loads over the head dim.

Kernel backend: Pallas-Triton, selected explicitly with ``pltriton.CompilerParams`` (portable
across jax 0.10.2 - 0.12; the project's JAX_PALLAS.md notes, §1.5). ``interpret=True`` runs it
on CPU.
"""
from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from gptjax.errors import GptjaxError

F32 = jnp.float32

# Score of a masked key inside a block. Finite, so that no inf - inf NaN can appear: a row whose
# first visited blocks are all masked (prefill rows inside a sliding window) accumulates them
# with max MASK, and the first visible key rescales that by exp(MASK - m) = 0 exactly.
MASK_VALUE = float(jnp.finfo(F32).min)

MIN_DOT = 16        # Triton tl.dot: every dimension of a dot must be >= 16


def use_kernel() -> bool:
    """Whether the Pallas path should run: a GPU backend and env ``GPTJAX_KERNELS`` != "ref".

    Wiring is then one line: ``(decode_attention if use_kernel() else decode_attention_ref)(...)``.
    """
    return jax.default_backend() == "gpu" and os.environ.get("GPTJAX_KERNELS", "") != "ref"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tile_dims(G: int, H: int) -> tuple[int, int]:
    """(Gp, Hp): the [Gp, Hp] register tile of a kv head's G query heads of size H (powers of
    two, every dot dimension >= :data:`MIN_DOT`)."""
    return max(MIN_DOT, next_pow2(G)), max(MIN_DOT, next_pow2(H))


def dot_f32(a, b, *, trans_b=False):
    """2-D a @ b (or a @ b.T) accumulated in float32, usable inside a Triton kernel.

    Precision HIGHEST: the Pallas-Triton lowering turns the default precision into TF32 for
    float32 operands (jax 0.10.2 - 0.11.2 ``_dot_general_lowering``: DEFAULT is in
    ``_TF32_PRECISIONS``); HIGHEST gives IEEE float32, and is a no-op for bf16/f16 operands.
    """
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=F32)


def _split_span(length, S, window, num_splits, block_k, split):
    """(begin, end, number of blocks) of this program's span: the visible keys [lo, hi) of the
    row, lo = max(0, length - window), hi = min(length, S), cut into ``num_splits`` spans of
    whole ``block_k`` blocks."""
    hi = jnp.minimum(length, S)
    lo = jnp.zeros_like(hi) if window is None else jnp.maximum(length - window, 0)
    n_vis = jnp.maximum(hi - lo, 0)
    span = pl.cdiv(pl.cdiv(n_vis, num_splits), block_k) * block_k     # whole blocks per split
    begin = lo + split * span
    end = jnp.minimum(begin + span, hi)
    return begin, end, pl.cdiv(jnp.maximum(end - begin, 0), block_k)


def _attend_span(q, k_ref, v_ref, span, carry, *, block_k, head_dim, scale, skip=None):
    """Online softmax of q [Gp, Hp] over the keys of ``span`` (:func:`_split_span`), from the
    running (acc [Gp, Hp], m [Gp], l [Gp]) ``carry``; key index ``skip`` (if given) is left out."""
    begin, end, n_blocks = span
    Hp = q.shape[1]
    h_ok = (jnp.arange(Hp) < head_dim)[None, :]                       # [1, Hp]

    def body(i, carry):
        acc, m, l = carry
        start = begin + i * block_k
        pos = start + jnp.arange(block_k)                             # [bk]
        valid = pos < end if skip is None else (pos < end) & (pos != skip)
        ld_mask = valid[:, None] & h_ok if Hp != head_dim else valid[:, None]
        idx = (pl.ds(start, block_k), pl.ds(0, Hp))
        k = pltriton.load(k_ref.at[idx], mask=ld_mask, other=0.0)     # [bk, Hp]
        v = pltriton.load(v_ref.at[idx], mask=ld_mask, other=0.0)
        s = dot_f32(q, k, trans_b=True) * scale                       # [Gp, bk]
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))                    # [Gp]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v)    # [Gp, Hp]
        return acc, m_new, l

    return lax.fori_loop(0, n_blocks, body, carry)


def _merge(m, l, o, sink, axis=None):
    """The split merge, shared by :func:`combine_splits` (XLA), :func:`_combine_kernel` and a
    one-split program's finish (:func:`_emit`)::

        M = max(max_s m_s, sink)  (0 where not finite: nothing visible and no sink)
        out = sum_s e^(m_s - M) o_s / (sum_s e^(m_s - M) l_s + e^(sink - M))   (0 / 0 -> 0)

    m, l: f32 with the splits along ``axis`` (None: one split, no such axis); o: m's shape +
    [Hp]; sink: None or broadcastable against m without ``axis``.  Empty splits (m = -inf) weigh
    exactly 0."""
    M = m if axis is None else jnp.max(m, axis=axis)
    if sink is not None:
        M = jnp.maximum(M, sink)
    M = jnp.where(jnp.isfinite(M), M, 0.0)
    w = jnp.exp(m - (M if axis is None else jnp.expand_dims(M, axis)))
    denom = w * l if axis is None else jnp.sum(w * l, axis=axis)
    if sink is not None:
        denom = denom + jnp.exp(sink - M)
    num = w[..., None] * o
    if axis is not None:
        num = jnp.sum(num, axis=axis)
    return num / jnp.where(denom == 0, 1.0, denom)[..., None]


def _emit(outs, acc, m, l, *, kh, G):
    """The end of a decode program: the split partials into ``outs`` = (o_ref [Gp, Hp], m_ref,
    l_ref [Gp]), or -- one split, ``outs`` = (out_ref in the output dtype, sink_ref [N] or
    None) -- :func:`combine_splits` of that one split, done here (same float32 operations as
    the merge).  out_ref is the [G, H] block of heads kh G .. kh G + G - 1 of the [B, N, H]
    output where G and H are powers of two (:func:`_one_out`), else a padded [Gp, Hp] tile."""
    if len(outs) == 3:
        o_ref, m_ref, l_ref = outs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l
        return
    out_ref, sink_ref = outs
    g = jnp.arange(acc.shape[0])
    sink = None
    if sink_ref is not None:
        sink = pltriton.load(sink_ref.at[kh * G + jnp.minimum(g, G - 1)], mask=g < G,
                             other=-jnp.inf)                                        # [Gp]
    out = _merge(m, l, acc, sink)                                                   # [Gp, Hp]
    Gp, Hp = out.shape
    if out_ref.shape[0] < Gp:       # [G, H] block of [B, N, H]: the first G of the Gp rows
        f = Gp // out_ref.shape[0]
        out = out.reshape(f, Gp // f, Hp)
        out = jnp.sum(jnp.where(jnp.arange(f)[:, None, None] == 0, out, 0.0), axis=0)
    out_ref[...] = out.astype(out_ref.dtype)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *refs, block_k, num_splits, window, head_dim,
                   scale, has_sinks, finish):
    # len_ref: [] int32; q_ref: the whole [B, K, G, H] (read padded to [Gp, Hp] with a mask:
    # no pad kernel before the call); k_ref, v_ref: [S, H]; refs: o_ref [Gp, Hp], m_ref, l_ref
    # [Gp] f32 blocks; or, finishing one split, (sink_ref [N] if has_sinks, out_ref) (_emit)
    outs = (refs[-1], refs[0] if has_sinks else None) if finish else refs
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    S = k_ref.shape[0]
    G = q_ref.shape[2]
    Gp, Hp = tile_dims(G, head_dim)
    span = _split_span(len_ref[()], S, window, num_splits, block_k, split)
    h_ok = (jnp.arange(Hp) < head_dim)[None, :]                       # [1, Hp]
    q_ok = (jnp.arange(Gp) < G)[:, None] & h_ok
    q = pltriton.load(q_ref.at[b, kh, pl.ds(0, Gp), pl.ds(0, Hp)], mask=q_ok,
                      other=0).astype(k_ref.dtype)                      # [Gp, Hp]
    init = (jnp.zeros((Gp, Hp), F32), jnp.full((Gp,), -jnp.inf, F32), jnp.zeros((Gp,), F32))
    acc, m, l = _attend_span(q, k_ref, v_ref, span, init, block_k=block_k, head_dim=head_dim,
                             scale=scale)
    _emit(outs, acc, m, l, kh=kh, G=G)


class _Qkv(NamedTuple):
    """Where the decode kernel reads the new token's q/k/v: ``ref`` [B, W] (the fused
    projection), or its K splits' partials [P, B, W] with ``bias_ref`` [W] (or None) and the
    projection's rounding ``rnd`` (``packed.SplitK``: the value is ``rnd(sum_s ref[s] + bias)``,
    summed in split order)."""

    ref: Any
    bias_ref: Any = None
    rnd: Any = None

    def load(self, b, cols, ok):
        """float32 values at columns ``cols`` (int array) of row b, 0 where not ``ok``."""
        if len(self.ref.shape) == 2:
            return pltriton.load(self.ref.at[b, cols], mask=ok, other=0).astype(F32)
        y = None
        for s in range(self.ref.shape[0]):
            p = pltriton.load(self.ref.at[s, b, cols], mask=ok, other=0.0)
            y = p if y is None else y + p
        if self.bias_ref is not None:
            y = y + pltriton.load(self.bias_ref.at[cols], mask=ok, other=0.0)
        return y.astype(self.rnd).astype(F32)


def _rope_rows(src: _Qkv, b, base, rows_ok, Hp, H, cos_ref, sin_ref, rope_type):
    """Rows ``r`` of width H at columns ``base + r H`` of row b of the flat q/k/v source (see
    :class:`_Qkv`), loaded and rotated by RoPE in float32 -> [R, Hp]: ``out[i] = x[i] cos[pair
    i] -+ x[partner i] sin[pair i]``, the partner of i being i +- H/2 for "neox" (minus in the
    first half) and i ^ 1 for "norm" (minus at even i): the products and sums of
    ``gptjax.models.layers.apply_rope``.  rows_ok: [R] bool."""
    R = rows_ok.shape[0]
    i = jnp.arange(Hp)
    if rope_type == "neox":
        half = H // 2
        partner, pair, first = jnp.where(i < half, i + half, i - half), i % half, i < half
    else:
        partner, pair, first = i ^ 1, i // 2, (i % 2) == 0
    h_ok = i < H
    ok = rows_ok[:, None] & h_ok[None, :]
    col = base + jnp.arange(R)[:, None] * H                            # [R, 1]
    x = src.load(b, col + i[None, :], ok)
    xp = src.load(b, col + partner[None, :], ok)
    c = pltriton.load(cos_ref.at[b, pair], mask=h_ok, other=0.0)[None, :]
    sn = pltriton.load(sin_ref.at[b, pair], mask=h_ok, other=0.0)[None, :]
    return jnp.where(first[None, :], x * c - xp * sn, x * c + xp * sn)


def _update_kernel(len_ref, slot_ref, qkv_ref, cos_ref, sin_ref, k_in, v_in, *refs, block_k,
                   num_splits, window, head_dim, n_heads, n_kv_heads, scale, rope_type,
                   has_sinks, finish, has_bias=False, qkv_round=None):
    # _decode_kernel with RoPE and the cache write folded in.  qkv_ref [B, (N + 2K) H]: the
    # fused projection (q heads, then k, then v), before RoPE -- or [P, B, (N + 2K) H], its K
    # splits' partials, summed here with the bias ref (first of refs when has_bias) and rounded
    # to qkv_round (_Qkv); k_ref / v_ref [S, H] are the
    # output aliases of k_in / v_in (one buffer).  Split 0 takes the new token from registers
    # and writes it to slot slot_ref; no program reads that slot from memory, so the write
    # races nothing.  refs: finishing one split: (sink_ref if has_sinks, out_ref, k_ref, v_ref);
    # else (o_ref, m_ref, l_ref, k_ref, v_ref) (see _emit).
    del k_in, v_in
    src = _Qkv(qkv_ref, refs[0] if has_bias else None, qkv_round)
    refs = refs[int(has_bias):]
    if finish:
        sink_ref = refs[0] if has_sinks else None
        out_ref, k_ref, v_ref = refs[int(has_sinks):]
        outs = (out_ref, sink_ref)
    else:
        *outs, k_ref, v_ref = refs
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    S = k_ref.shape[0]
    H, N, K = head_dim, n_heads, n_kv_heads
    G = N // K
    Gp, Hp = tile_dims(G, H)
    length, new_slot = len_ref[()], slot_ref[()]
    span = _split_span(length, S, window, num_splits, block_k, split)

    dt = k_ref.dtype
    i = jnp.arange(Hp)
    h_ok = (i < H)[None, :]                                            # [1, Hp]
    rope = dict(Hp=Hp, H=H, cos_ref=cos_ref, sin_ref=sin_ref, rope_type=rope_type)
    q = _rope_rows(src, b, kh * (G * H), jnp.arange(Gp) < G, **rope).astype(dt)   # [Gp, Hp]
    kn = _rope_rows(src, b, N * H + kh * H, jnp.arange(1) < 1, **rope).astype(dt)  # [1, Hp]
    vn = src.load(b, (N * H + K * H + kh * H + i)[None, :], h_ok).astype(dt)       # [1, Hp]
    # score of the new key: products of dt values are exact in float32, summed in float32
    s_new = jnp.sum(q.astype(F32) * kn.astype(F32), axis=1) * scale   # [Gp]
    first = split == 0
    # (lax.select on full arrays: jnp.where of a scalar predicate and literals mis-lowers in
    # Pallas-Triton)
    on = jnp.full((Gp,), first)
    m = lax.select(on, s_new, jnp.full((Gp,), -jnp.inf, F32))
    l = on.astype(F32)
    acc = jnp.broadcast_to(vn.astype(F32), (Gp, Hp)) * first.astype(F32)

    acc, m, l = _attend_span(q, k_ref, v_ref, span, (acc, m, l), block_k=block_k, head_dim=H,
                             scale=scale, skip=new_slot)               # the new slot: registers
    _emit(outs, acc, m, l, kh=kh, G=G)

    @pl.when(first)
    def _():
        pltriton.store(k_ref.at[pl.ds(new_slot, 1), pl.ds(0, Hp)], kn, mask=h_ok)
        pltriton.store(v_ref.at[pl.ds(new_slot, 1), pl.ds(0, Hp)], vn, mask=h_ok)


_UPDATE_STATIC = ("n_heads", "window", "scale", "rope_type", "block_k", "num_splits", "num_warps",
                  "num_stages", "layer", "combine", "out_dtype", "qkv_dtype", "interpret")


@functools.partial(jax.jit, static_argnames=_UPDATE_STATIC)
def decode_attention_update_qkv(qkv, k_cache, v_cache, lengths, slots, cos, sin, *, n_heads,
                                rope_type, window=None, sinks=None, scale, block_k=64,
                                num_splits=None, num_warps=4, num_stages=2, layer, combine=None,
                                out_dtype=None, qkv_bias=None, qkv_dtype=None, interpret=False):
    """RoPE, the cache write and :func:`decode_attention` in one kernel, reading the fused q/k/v
    projection directly (batch-1 decode on the H100: RoPE, the two cache writes and the slices
    of the fused projection were five XLA kernels of ~1.2 µs per layer).

    qkv: [B, (N + 2K) H], the N query heads, then the K key heads, then the K value heads of the
    new token, before RoPE (any float dtype; read as the cache dtype); k_cache, v_cache: the
    [L, B, K, S, H] stack (``layer`` static), updated in place (aliased to the outputs: inside a
    jitted decode loop XLA writes the one buffer); lengths: int32 [B], visible slots counting
    the new one; slots: int32 [B], where the new key/value go (full layers: the position; rings:
    position mod W'); cos, sin: float32 [B, H/2] of the new position; rope_type "neox" or "norm"
    (``gptjax.models.layers.apply_rope``).  Returns (out [B, N, H] in ``out_dtype`` (default the
    cache's), k_cache, v_cache): ``apply_rope`` + the cache write + :func:`decode_attention`
    (:func:`decode_attention_update_ref`).

    qkv may also be the projection's K-split partials float32 [P, B, (N + 2K) H]
    (``packed.SplitK``), with ``qkv_bias`` float [(N + 2K) H] or None and ``qkv_dtype`` its
    rounding: the kernel then reads ``qkv_dtype(sum_s qkv[s] + qkv_bias)`` -- the array
    ``SplitK.value()`` would have materialised in an XLA kernel of its own."""
    name = "decode_attention_update"
    parts = qkv.ndim == 3
    if qkv.ndim not in (2, 3):
        raise GptjaxError(f"{name}: qkv must be [B, (N + 2K) H] or its partials [P, B, (N + 2K) "
                          f"H], got shape {qkv.shape}")
    if not parts and (qkv_bias is not None or qkv_dtype is not None):
        raise GptjaxError(f"{name}: qkv_bias / qkv_dtype go with partials [P, B, (N + 2K) H]")
    if parts and qkv_dtype is None:
        raise GptjaxError(f"{name}: partials need qkv_dtype, the projection's rounding")
    B, N = qkv.shape[-2], int(n_heads)
    H = k_cache.shape[-1]
    K, S = check_cache_args(name, B, N, H, k_cache, v_cache, "lengths", lengths, layer, window,
                            sinks)
    W = (N + 2 * K) * H
    if qkv.shape[-1] != W or slots.shape != (B,) or cos.shape != (B, H // 2) or \
            sin.shape != (B, H // 2) or H % 2:
        raise GptjaxError(f"{name}: need qkv [B, (N + 2K) H] = {[B, W]}, slots [B], "
                          f"cos/sin [B, H/2] (H even); got {qkv.shape}, {slots.shape}, "
                          f"{cos.shape}, {sin.shape}")
    if qkv_bias is not None and qkv_bias.shape != (W,):
        raise GptjaxError(f"{name}: qkv_bias must be [(N + 2K) H] = [{W}], got "
                          f"{list(qkv_bias.shape)}")
    if rope_type not in ("neox", "norm"):
        raise GptjaxError(f"{name}: rope_type {rope_type!r}: expected 'neox' or 'norm'")
    P = default_num_splits(B, K, S, block_k) if num_splits is None else int(num_splits)
    G = N // K
    Gp, Hp = tile_dims(G, H)
    kv_spec = pl.BlockSpec((None, None, None, S, H), lambda b, k, s: (layer, b, k, 0, 0))
    out_dtype = k_cache.dtype if out_dtype is None else out_dtype
    finish = one_split_in_kernel(P, combine)
    one_spec, one_shape, unpad = _one_out(B, N, K, H, out_dtype)
    # inputs after the caches, in the kernel's order: the q/k/v bias, then the sinks (one split)
    extra_args = [qkv_bias.astype(F32)] if qkv_bias is not None else []
    extra_args += [sinks.astype(F32)] if finish and sinks is not None else []
    kernel = functools.partial(_update_kernel, block_k=block_k, num_splits=P, window=window,
                               head_dim=H, n_heads=N, n_kv_heads=K, scale=float(scale),
                               rope_type=rope_type, has_sinks=sinks is not None, finish=finish,
                               has_bias=qkv_bias is not None,
                               qkv_round=None if qkv_dtype is None else jnp.dtype(qkv_dtype))
    n_out = 1 if finish else 3                       # then the two caches
    *outs, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(B, K, P),
        in_specs=[pl.BlockSpec((None,), lambda b, k, s: (b,)),
                  pl.BlockSpec((None,), lambda b, k, s: (b,)),
                  pl.no_block_spec, pl.no_block_spec, pl.no_block_spec, kv_spec, kv_spec]
                 + [pl.no_block_spec] * len(extra_args),
        out_specs=([one_spec] if finish else _split_out_specs(Gp, Hp)) + [kv_spec, kv_spec],
        out_shape=([one_shape] if finish else _split_out_shapes(B, K, P, Gp, Hp))
        + [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
           jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={5: n_out, 6: n_out + 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(lengths.astype(jnp.int32), slots.astype(jnp.int32), qkv, cos.astype(F32), sin.astype(F32),
      k_cache, v_cache, *extra_args)
    if finish:
        return unpad(outs[0]), k_cache, v_cache
    return merge_splits(*outs, sinks, G, H, out_dtype, combine, interpret), k_cache, v_cache


@functools.partial(jax.jit, static_argnames=tuple(a for a in _UPDATE_STATIC
                                                  if a not in ("n_heads", "out_dtype", "qkv_dtype")))
def decode_attention_update(q, k_new, v_new, k_cache, v_cache, lengths, slots, cos, sin, *,
                            rope_type, window=None, sinks=None, scale, block_k=64,
                            num_splits=None, num_warps=4, num_stages=2, layer, combine=None,
                            interpret=False):
    """:func:`decode_attention_update_qkv` for separate q [B, N, H] and k_new, v_new [B, K, H]
    (concatenated first: one XLA kernel more).  Returns (out [B, N, H] in q.dtype, k_cache,
    v_cache)."""
    B, N, H = q.shape
    qkv = jnp.concatenate([q.reshape(B, -1), k_new.astype(q.dtype).reshape(B, -1),
                           v_new.astype(q.dtype).reshape(B, -1)], axis=1)
    return decode_attention_update_qkv(
        qkv, k_cache, v_cache, lengths, slots, cos, sin, n_heads=N, rope_type=rope_type,
        window=window, sinks=sinks, scale=scale, block_k=block_k, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, layer=layer, combine=combine,
        out_dtype=q.dtype, interpret=interpret)


def check_cache_args(name, B, N, H, k_cache, v_cache, rows_name, rows, layer, window, sinks):
    """The argument checks both attention kernels share (decode and prefill): the cache layout
    ([B, K, S, H], or [L, B, K, S, H] with a static ``layer``), q's B/N/H against it, the per-row
    array ``rows`` ([B]: lengths or q_start), window and sinks.  Returns (K, S)."""
    want = 5 if layer is not None else 4
    if k_cache.ndim != want or v_cache.shape != k_cache.shape:
        layout = "[L, B, K, S, H] (layer given)" if want == 5 else "[B, K, S, H]"
        raise GptjaxError(f"{name}: k_cache/v_cache must both be {layout}, got "
                          f"{k_cache.shape} and {v_cache.shape}")
    Bc, K, S, Hc = k_cache.shape[-4:]
    if Bc != B or Hc != H or N % K:
        raise GptjaxError(f"{name}: q (B={B}, N={N}, H={H}) does not fit cache {k_cache.shape}: "
                          f"need the same B and H and N divisible by K")
    if rows.shape != (B,):
        raise GptjaxError(f"{name}: {rows_name} must be [B]={B}, got shape {rows.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise GptjaxError(f"{name}: window must be None or a static int >= 1, got {window!r}")
    if sinks is not None and sinks.shape != (N,):
        raise GptjaxError(f"{name}: sinks must be [N]={N} (one logit per query head), got "
                          f"{sinks.shape}")
    if layer is not None and not 0 <= layer < k_cache.shape[0]:
        raise GptjaxError(f"{name}: layer {layer} out of range for a cache of "
                          f"{k_cache.shape[0]} layers")
    return K, S


def _check(q, k_cache, v_cache, lengths, layer, window, sinks, name):
    if q.ndim != 3:
        raise GptjaxError(f"{name}: q must be [B, N, H], got shape {q.shape}")
    B, N, H = q.shape
    K, S = check_cache_args(name, B, N, H, k_cache, v_cache, "lengths", lengths, layer, window, sinks)
    return B, N, K, S, H


def default_num_splits(B: int, K: int, S: int, block_k: int, target_programs: int = 256) -> int:
    """Splits so that B * K * splits is about ``target_programs`` (2 waves of an H100's 132 SMs),
    a power of two, at most one split per ``block_k`` keys of the cache."""
    want = next_pow2(max(1, -(-target_programs // (B * K))))
    return max(1, min(want, next_pow2(-(-S // block_k))))


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_k", "num_splits",
                                             "num_warps", "num_stages", "layer", "combine",
                                             "interpret"))
def decode_attention(q, k_cache, v_cache, lengths, *, window=None, sinks=None, scale,
                     block_k=64, num_splits=None, num_warps=4, num_stages=2, layer=None,
                     combine=None, interpret=False):
    """Attention of one new query per row over the KV cache (flash-decoding, Pallas-Triton).

    q: [B, N, H]; k_cache, v_cache: [B, K, S, H] (or the [L, B, K, S, H] stack with static
    ``layer``), already holding the new token's key/value at position lengths-1;
    lengths: int32 [B], the number of cache positions of each row (query position lengths-1;
    values above S are clamped to S); window: None or static int (keys j > p - window only);
    sinks: None or float [N]; scale: static float (usually 1/sqrt(H)).
    Tiling: block_k keys per step (power of two >= 16); num_splits spans per row (None:
    :func:`default_num_splits`); num_warps / num_stages: Triton launch parameters; combine:
    how the splits are merged, "xla" (:func:`combine_splits`), "kernel"
    (:func:`combine_splits_kernel`) or None (the kernel from
    :data:`COMBINE_KERNEL_MIN_SPLITS` splits on).
    Returns [B, N, H] in q.dtype. A row with no visible key (lengths 0) returns zeros.
    """
    B, N, K, S, H = _check(q, k_cache, v_cache, lengths, layer, window, sinks, "decode_attention")
    if block_k < MIN_DOT or block_k != next_pow2(block_k):
        raise GptjaxError(f"decode_attention: {block_k=} must be a power of two >= {MIN_DOT}")
    P = default_num_splits(B, K, S, block_k) if num_splits is None else int(num_splits)
    if P < 1:
        raise GptjaxError(f"decode_attention: {num_splits=} must be >= 1")
    G = N // K
    Gp, Hp = tile_dims(G, H)
    qp = q.reshape(B, K, G, H)                       # cast and padded inside the kernel

    if layer is None:
        kv_spec = pl.BlockSpec((None, None, S, H), lambda b, k, s: (b, k, 0, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, None, S, H), lambda b, k, s: (layer, b, k, 0, 0))
    finish = one_split_in_kernel(P, combine)
    one_spec, one_shape, unpad = _one_out(B, N, K, H, q.dtype)
    kernel = functools.partial(_decode_kernel, block_k=block_k, num_splits=P, window=window,
                               head_dim=H, scale=float(scale), has_sinks=sinks is not None,
                               finish=finish)
    sink_args = [sinks.astype(F32)] if finish and sinks is not None else []
    outs = pl.pallas_call(
        kernel,
        grid=(B, K, P),
        in_specs=[
            pl.BlockSpec((None,), lambda b, k, s: (b,)),
            pl.no_block_spec,
            kv_spec,
            kv_spec,
        ] + [pl.no_block_spec] * len(sink_args),
        out_specs=[one_spec] if finish else _split_out_specs(Gp, Hp),
        out_shape=[one_shape] if finish else _split_out_shapes(B, K, P, Gp, Hp),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32), qp, k_cache, v_cache, *sink_args)
    if finish:
        return unpad(outs[0])
    return merge_splits(*outs, sinks, G, H, q.dtype, combine, interpret)


def one_split_in_kernel(P: int, combine) -> bool:
    """Whether a decode kernel of ``P`` splits normalises its output itself (one split, and the
    merge not forced to XLA by ``combine="xla"``): no merge kernel after it, and no [B, K, 1,
    Gp, Hp] partials to write and slice (batch 64 on the H100: one 2.4 µs kernel per layer)."""
    return P == 1 and combine != "xla"


def _one_out(B, N, K, H, dtype):
    """(out_spec, out_shape, unpad) of a decode kernel that normalises its one split itself:
    [B, N, H] directly, a [G, H] block per program, where G = N / K and H are powers of two
    (gpt-oss: 8 x 64); otherwise [B, K, Gp, Hp] padded tiles, ``unpad`` slicing them (an XLA
    kernel)."""
    G = N // K
    Gp, Hp = tile_dims(G, H)
    if G == next_pow2(G) and H == Hp:
        return (pl.BlockSpec((None, G, H), lambda b, k, s: (b, k, 0)),
                jax.ShapeDtypeStruct((B, N, H), dtype), lambda out: out)
    return (pl.BlockSpec((None, None, Gp, Hp), lambda b, k, s: (b, k, 0, 0)),
            jax.ShapeDtypeStruct((B, K, Gp, Hp), dtype),
            lambda out: out[:, :, :G, :H].reshape(B, N, H))


def _split_out_specs(Gp, Hp):
    return [pl.BlockSpec((None, None, None, Gp, Hp), lambda b, k, s: (b, k, s, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, s: (b, k, s, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, s: (b, k, s, 0))]


def _split_out_shapes(B, K, P, Gp, Hp):
    return [jax.ShapeDtypeStruct((B, K, P, Gp, Hp), F32),
            jax.ShapeDtypeStruct((B, K, P, Gp), F32),
            jax.ShapeDtypeStruct((B, K, P, Gp), F32)]


def combine_splits(o, m, l, sinks, G, H):
    """Merge split partials o f32 [B, K, P, Gp, Hp], m, l f32 [B, K, P, Gp] → f32 [B, K, G, H].

    M = max(max_s m_s, sink); out = sum_s e^(m_s - M) o_s / (sum_s e^(m_s - M) l_s + e^(sink - M)).
    Empty splits have m = -inf and weigh exactly 0; a row with nothing visible and no sink has
    M = -inf, which is replaced by 0 so that it yields 0 / 0 → 0 rather than NaN.
    """
    K, Gp = o.shape[1], o.shape[3]
    sink = None
    if sinks is not None:
        sink = jnp.pad(sinks.astype(F32).reshape(K, G), ((0, 0), (0, Gp - G)))[None]  # [1, K, Gp]
    return _merge(m, l, o, sink, axis=2)[:, :, :G, :H]                # [B, K, G, H]


#: Splits from which :func:`decode_attention` merges them with :func:`combine_splits_kernel`
#: (one Pallas kernel) instead of :func:`combine_splits` (XLA).  H100, gpt-oss-20b at 4096
#: tokens (32 splits): XLA makes three kernels of it, ~7.3 µs per full layer (kernel + merge
#: 11.4 -> 5.9 µs); with 2-4 splits XLA makes one fusion of 1.37-1.44 µs and the kernel took
#: 1.53-1.57 µs (in-model profile, batch-1 decode).
COMBINE_KERNEL_MIN_SPLITS = 8


def _combine_kernel(*refs, G, H, has_sinks):
    # o_ref [B, K, P, Gp, Hp], m_ref / l_ref [B, K, P, Gp] f32, sink_ref [N] (with sinks);
    # out_ref [B, N, H].  Program (b, n): query head n = kh * G + g of row b, all P splits in
    # one load round.
    o_ref, m_ref, l_ref = refs[:3]
    sink_ref = refs[3] if has_sinks else None
    out_ref = refs[-1]
    b, n = pl.program_id(0), pl.program_id(1)
    kh, g = lax.div(n, np.int32(G)), lax.rem(n, np.int32(G))
    P, Hp = m_ref.shape[2], o_ref.shape[-1]
    Pp = next_pow2(P)
    p_ok = jnp.arange(Pp) < P
    h_ok = jnp.arange(Hp) < H
    m = pltriton.load(m_ref.at[b, kh, pl.ds(0, Pp), g], mask=p_ok, other=-jnp.inf)   # [Pp]
    l = pltriton.load(l_ref.at[b, kh, pl.ds(0, Pp), g], mask=p_ok, other=0.0)
    o = pltriton.load(o_ref.at[b, kh, pl.ds(0, Pp), g, pl.ds(0, Hp)], mask=p_ok[:, None],
                      other=0.0)                                                      # [Pp, Hp]
    sink = sink_ref[n].astype(F32) if has_sinks else None
    out = _merge(m, l, o, sink, axis=0)                               # [Hp]
    pltriton.store(out_ref.at[b, n, pl.ds(0, Hp)], out.astype(out_ref.dtype), mask=h_ok)


def combine_splits_kernel(o, m, l, sinks, G, H, dtype, interpret=False):
    """:func:`combine_splits` as one Pallas kernel, one program per (row, query head) that
    loads all P splits of its head at once, writing [B, N, H] in ``dtype`` directly (no slice /
    cast kernels after it).  Same math and same float32 operations per element."""
    B, K, P, Gp, Hp = o.shape
    N = K * G
    args = [o, m, l] + ([sinks.astype(F32)] if sinks is not None else [])
    return pl.pallas_call(
        functools.partial(_combine_kernel, G=G, H=H, has_sinks=sinks is not None),
        grid=(B, N), out_shape=jax.ShapeDtypeStruct((B, N, H), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret, name="decode_attention_combine")(*args)


def merge_splits(o, m, l, sinks, G, H, dtype, combine=None, interpret=False):
    """The split partials of the decode kernels merged into [B, N, H] in ``dtype``: ``combine``
    "kernel" (:func:`combine_splits_kernel`), "xla" (:func:`combine_splits`) or None (the
    kernel from :data:`COMBINE_KERNEL_MIN_SPLITS` splits on)."""
    B, K, P = o.shape[:3]
    if combine is None:
        combine = "kernel" if P >= COMBINE_KERNEL_MIN_SPLITS else "xla"
    if combine == "kernel":
        return combine_splits_kernel(o, m, l, sinks, G, H, dtype, interpret)
    return combine_splits(o, m, l, sinks, G, H).reshape(B, K * G, H).astype(dtype)


def _einsum_f32(eq, a, b):
    """einsum accumulated in float32 for the references.

    On CPU 16-bit operands are upcast first (exact; XLA:CPU lacks some bf16 x bf16 -> f32 dots,
    see ``gptjax.models.layers.einsum_f32``). float32 operands get precision HIGHEST, else XLA
    on a GPU may round them to TF32 and the reference would be the less exact side.
    """
    if jax.default_backend() == "cpu":
        a = a.astype(F32) if a.dtype in (jnp.bfloat16, jnp.float16) else a
        b = b.astype(F32) if b.dtype in (jnp.bfloat16, jnp.float16) else b
    precision = lax.Precision.HIGHEST if F32 in (a.dtype, b.dtype) else None
    return jnp.einsum(eq, a, b, preferred_element_type=F32, precision=precision)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_k", "num_splits",
                                             "num_warps", "num_stages", "layer", "combine",
                                             "interpret"))
def decode_attention_ref(q, k_cache, v_cache, lengths, *, window=None, sinks=None, scale,
                         block_k=64, num_splits=None, num_warps=4, num_stages=2, layer=None,
                         combine=None, interpret=False):
    """Plain-jnp twin of :func:`decode_attention` (same signature; tiling arguments ignored).

    Scores and softmax in float32; the probabilities are cast to the value dtype for the second
    matmul, accumulated in float32 (as ``gptjax.models.layers.attention``). Rows with no
    visible key return zeros.
    """
    del block_k, num_splits, num_warps, num_stages, combine, interpret
    B, N, K, S, H = _check(q, k_cache, v_cache, lengths, layer, window, sinks,
                           "decode_attention_ref")
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    G = N // K
    qg = q.astype(k_cache.dtype).reshape(B, K, G, H)
    s = _einsum_f32("bkgh,bksh->bkgs", qg, k_cache) * scale          # [B, K, G, S]
    j = jnp.arange(S)[None, :]                                        # [1, S]
    p = lengths.astype(jnp.int32)[:, None] - 1                        # [B, 1]
    visible = j <= p
    if window is not None:
        visible = visible & (j > p - window)
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)                            # [B, K, G, 1]
    if sinks is not None:
        sink = sinks.astype(F32).reshape(1, K, G, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    probs = e / jnp.where(denom == 0, 1.0, denom)
    out = _einsum_f32("bkgs,bksh->bkgh", probs.astype(v_cache.dtype), v_cache)
    return out.reshape(B, N, H).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("window", "scale", "rope_type", "block_k",
                                             "num_splits", "num_warps", "num_stages", "layer",
                                             "combine", "interpret"))
def decode_attention_update_ref(q, k_new, v_new, k_cache, v_cache, lengths, slots, cos, sin, *,
                                rope_type, window=None, sinks=None, scale, block_k=64,
                                num_splits=None, num_warps=4, num_stages=2, layer,
                                combine=None, interpret=False):
    """Plain-jnp twin of :func:`decode_attention_update`: ``apply_rope``, a scatter into slot
    ``slots[b]`` of layer ``layer``, :func:`decode_attention_ref`."""
    from gptjax.models.layers import apply_rope

    del block_k, num_splits, num_warps, num_stages, combine, interpret
    B = q.shape[0]
    qr = apply_rope(q[:, None], cos[:, None], sin[:, None], rope_type)[:, 0]
    kr = apply_rope(k_new[:, None], cos[:, None], sin[:, None], rope_type)[:, 0]   # [B, K, H]
    rows = jnp.arange(B)
    k_cache = k_cache.at[layer, rows, :, slots].set(kr.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, :, slots].set(v_new.astype(v_cache.dtype))
    out = decode_attention_ref(qr, k_cache, v_cache, lengths, window=window, sinks=sinks,
                               scale=scale, layer=layer)
    return out, k_cache, v_cache
