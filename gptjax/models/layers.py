"""Building blocks shared by the model files: norms, activations, linear layers, attention.

Axis alphabet (docs/INTERFACES.md): B batch, T query length, S cache length, N query heads,
K kv heads, G = N/K, H head dim, D model dim, E experts, F ffn dim, V vocab, L layers.

Numerics: whatever the weight dtype, norms, softmax and matmul accumulation run in float32
(``preferred_element_type=float32``); results are cast to the caller's compute dtype only where
they feed another matmul. The residual stream of the models is kept in float32, as ggml does
(its activations are f32 whatever the weight type).

Every function here is pure jnp and jit-friendly; the model files call only these, so a Pallas
kernel or a packed quantized weight type can later replace the body of :func:`linear` or
:func:`attention` without the model code changing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32

# Score given to masked cache slots.  A finite value (not -inf) so that a row with no visible
# slot (never produced by a valid call, but possible for garbage padding rows) yields a finite
# uniform average instead of NaN; exp(MASK_VALUE - max) underflows to exactly 0 for any row
# that has a visible slot.
MASK_VALUE = float(jnp.finfo(F32).min)


def einsum_f32(eq, a, b):
    """``jnp.einsum(eq, a, b)`` accumulated in float32 (``preferred_element_type``).

    XLA:CPU (checked with jax 0.10.2) cannot run some batched bf16 x bf16 -> f32 dots
    ("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"), so on
    the CPU backend 16-bit operands are upcast first. That changes nothing numerically: the
    upcast is exact and the product of two bf16/f16 values is exact in float32, which is what a
    GPU's 16-bit dot with float32 accumulation computes too.
    """
    if jax.default_backend() == "cpu":
        a = a.astype(F32) if a.dtype in (jnp.bfloat16, jnp.float16) else a
        b = b.astype(F32) if b.dtype in (jnp.bfloat16, jnp.float16) else b
    return jnp.einsum(eq, a, b, preferred_element_type=F32)


def embed(table, ids):
    """Row lookup ``table[ids]`` returning float32.

    table: [V, D] (or [P, D] for learned positions); ids: int [B, T] → float32 [B, T, D].
    Out-of-range ids are clipped rather than filled with NaN (jnp's default for gathers), so a
    bad id can never poison the KV cache; callers validate ids before they reach the device.
    """
    return jnp.take(table, ids, axis=0, mode="clip").astype(F32)


def layer_norm(x, weight, bias, eps, *, out_dtype=None):
    """LayerNorm over the last axis (Ba, Kiros & Hinton 2016), statistics in float32.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var the biased variance — the same
    as torch.nn.LayerNorm and ggml_norm followed by ggml_mul/ggml_add (llama.cpp gpt2 graph).
    x: [..., D]; weight, bias: [D] → [..., D] in ``out_dtype`` (default: x.dtype).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + eps)
    y = y * weight.astype(F32) + bias.astype(F32)
    return y.astype(out_dtype)


def add_layer_norm(residual, delta, weight, bias, eps, *, out_dtype):
    """Residual add fused with the next LayerNorm: ``r = residual + delta; return r, LN(r)``.

    residual: float32 [..., D] (the residual stream); delta: [..., D] any dtype.
    Returns (float32 [..., D] new residual, [..., D] normalised in ``out_dtype``). XLA fuses the
    add into the norm's reductions; the separate function keeps the model code one line per
    step of the diagram.
    """
    r = residual + delta.astype(F32)
    return r, layer_norm(r, weight, bias, eps, out_dtype=out_dtype)


def gelu(x, *, approximate=True):
    """GELU (Hendrycks & Gimpel 2016).

    approximate=True (default): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh form
    that ggml_gelu and HF ``gelu_new`` (GPT-2's ``activation_function``) compute.
    approximate=False: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), HF ``gelu``.
    Evaluated in float32; returns x.dtype.
    """
    return jax.nn.gelu(x.astype(F32), approximate=approximate).astype(x.dtype)


def linear(x, w, b=None, *, out_dtype=None):
    """Dense layer y = x @ w.T + b, accumulated in float32.

    x: [..., I]; w: [O, I] (torch Linear / GGUF row layout: one row per output feature);
    b: [O] or None → [..., O] in ``out_dtype`` (default: x.dtype). The bias is added to the
    float32 accumulator before the cast.

    This is the single entry point for every matmul against a weight, so that packed quantized
    weights (gptjax.quant) and Pallas kernels can be dispatched here without touching models.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y = einsum_f32("...i,oi->...o", x, w)
    if b is not None:
        y = y + b.astype(F32)
    return y.astype(out_dtype)


def attention_mask(q_positions, kv_positions, window=None):
    """Causal (optionally sliding-window) visibility by absolute position.

    q_positions: int [B, T]; kv_positions: int [S] (the position held by each cache slot).
    Slot j is visible to the query at position p iff kv_j <= p, and for a sliding window
    additionally kv_j > p - window (the window counts the query itself: ``window`` keys
    p-window+1..p; OAI-torch / llama.cpp ``is_masked_swa``). Returns bool [B, T, S].
    ``window`` may be None (full causal), a Python int or a traced int scalar.
    """
    p = q_positions[:, :, None]
    j = kv_positions[None, None, :]
    visible = j <= p
    if window is not None:
        visible = visible & (j > p - window)
    return visible


def attention(q, k_cache, v_cache, q_positions, *, window=None, sinks=None, scale):
    """Multi-head / grouped-query attention of T new queries over the whole KV cache.

    q: [B, T, N, H]; k_cache, v_cache: [B, K, S, H] (already holding the new keys/values at
    their positions); q_positions: int [B, T]; sinks: None or float [N] (one logit per *query*
    head); scale: float, usually 1/sqrt(H). Returns [B, T, N, H] in q.dtype.

    Query head n uses kv head n // G with G = N / K (HF ``repeat_kv``, OAI-torch, ggml
    broadcast). Cache slot j holds position j; the mask is :func:`attention_mask`.

        s_j = scale * q . k_j           (float32)
        p_j = exp(s_j) / (exp(sink_n) + sum_i exp(s_i))      (the sink term only with sinks)
        out = sum_j p_j v_j

    The sink is a per-head logit with no value vector (gpt-oss; OAI-torch ``sdpa`` appends it
    as an extra score column and drops that column after the softmax). Softmax in float32;
    the probabilities are cast to the value dtype for the second matmul, accumulated in f32.

    A ring-buffer cache for sliding-window layers would pass the position held by each slot
    instead of ``arange(S)``; the mask is already written in terms of slot positions.
    """
    B, T, N, H = q.shape
    _, K, S, _ = k_cache.shape
    G = N // K
    qg = q.reshape(B, T, K, G, H)
    scores = einsum_f32("btkgh,bksh->bkgts", qg, k_cache)
    scores = scores * scale                                           # [B, K, G, T, S]
    visible = attention_mask(q_positions, jnp.arange(S, dtype=q_positions.dtype), window)
    scores = jnp.where(visible[:, None, None, :, :], scores, MASK_VALUE)
    m = jnp.max(scores, axis=-1, keepdims=True)                      # [B, K, G, T, 1]
    if sinks is not None:
        sink = sinks.astype(F32).reshape(1, K, G, 1, 1)               # head n = k*G + g
        m = jnp.maximum(m, sink)
    e = jnp.exp(scores - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    probs = e / denom
    out = einsum_f32("bkgts,bksh->btkgh", probs.astype(v_cache.dtype), v_cache)  # [B,T,K,G,H]
    return out.reshape(B, T, N, H).astype(q.dtype)
