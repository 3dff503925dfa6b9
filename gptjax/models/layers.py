"""Building blocks shared by the model files: norms, activations, RoPE, linear layers, attention.

Axis alphabet (docs/INTERFACES.md): B batch, T query length, S cache length, N query heads,
K kv heads, G = N/K, H head dim, D model dim, E experts, F ffn dim, V vocab, L layers.

Numerics: whatever the weight dtype, norms, softmax and matmul accumulation run in float32
(``preferred_element_type=float32``); results are cast to the caller's compute dtype only where
they feed another matmul. The residual stream of the models is kept in float32, as ggml does
(its activations are f32 whatever the weight type).

Every function here is pure jnp and jit-friendly; the model files call only these. Weights may
be plain arrays or packed quantized leaves (:class:`gptjax.packed.PackedWeight`): :func:`linear`
and :func:`embed` delegate to ``gptjax.quant.linear`` / ``gptjax.quant.embed``, which dequantize
inside the jitted computation, so model code never branches on quantization (and a Pallas kernel
can later be dispatched there without the models changing).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import packed
from gptjax.errors import GptjaxError, UnsupportedModelError

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
    """Row lookup ``table[ids]`` returning float32 (``gptjax.quant.embed``).

    table: [V, D] (or [P, D] for learned positions), a plain array or a PackedWeight (only the
    looked-up rows are decoded); ids: int [B, T] → float32 [B, T, D].
    Out-of-range ids are clipped rather than filled with NaN (jnp's default for gathers), so a
    bad id can never poison the KV cache; callers validate ids before they reach the device.
    """
    return packed.embed(table, ids)


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


def gelu(x, *, approximate=True):
    """GELU (Hendrycks & Gimpel 2016).

    approximate=True (default): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh form
    that ggml_gelu and HF ``gelu_new`` (GPT-2's ``activation_function``) compute.
    approximate=False: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), HF ``gelu``.
    Evaluated in float32; returns x.dtype.
    """
    return jax.nn.gelu(x.astype(F32), approximate=approximate).astype(x.dtype)


def rms_norm(x, weight, eps, *, out_dtype=None):
    """RMSNorm over the last axis (Zhang & Sennrich 2019), in float32.

    y = x / sqrt(mean(x^2) + eps) * weight — HF ``LlamaRMSNorm`` (float32 statistics) and
    ggml_rms_norm followed by ggml_mul (llama.cpp llama graph).
    x: [..., D]; weight: [D] → [..., D] in ``out_dtype`` (default: x.dtype).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x32 = x.astype(F32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + eps) * weight.astype(F32)).astype(out_dtype)


def swiglu(gate, up, *, out_dtype=None):
    """SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up in float32,
    silu(g) = g * sigmoid(g) — HF llama ``down(act_fn(gate(x)) * up(x))`` with ``hidden_act =
    "silu"``; ggml ``ggml_swiglu_split``. gate, up: [..., F] → [..., F] in ``out_dtype``
    (default: gate.dtype)."""
    out_dtype = gate.dtype if out_dtype is None else out_dtype
    return (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(out_dtype)


def linear(x, w, b=None, *, out_dtype=None, partials=False):
    """Dense layer y = x @ w.T + b, accumulated in float32 (``gptjax.quant.linear``).

    x: [..., I]; w: [O, I] (torch Linear / GGUF row layout: one row per output feature), a plain
    array or a PackedWeight (decoded exactly and rounded to x.dtype inside the computation);
    b: [O] or None → [..., O] in ``out_dtype`` (default: x.dtype). The bias is added to the
    float32 accumulator before the cast.

    This is the single entry point for every matmul against a weight, so that packed quantized
    weights and Pallas kernels are dispatched in one place without touching models.
    ``partials=True``: may return a ``packed.SplitK`` (the K splits' partial products) instead.
    """
    return packed.linear(x, w, b, out_dtype=out_dtype, partials=partials)


class Norm(NamedTuple):
    """A norm to apply before a matmul (:func:`norm_linear`): ``kind`` "rms" (:func:`rms_norm`)
    or "layer" (:func:`layer_norm`, needs ``bias``); weight/bias [D]; ``eps`` its epsilon."""

    kind: str
    weight: Any
    bias: Any = None
    eps: float = 1e-5

    def __call__(self, x, *, out_dtype):
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps, out_dtype=out_dtype)
        if self.kind == "layer":
            return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)
        raise ValueError(f"Norm kind {self.kind!r}: expected 'rms' or 'layer'")


def norm_linear(x, w, b=None, *, norm: Norm | None = None, dtype, out_dtype=F32, act=None,
                residual=None, return_normed=False, row_groups=False, partials=False):
    """A projection with its neighbours: ``act(norm(x) @ w.T + b)`` in ``out_dtype``, plus
    ``residual``.

    x: [..., I] -- the float32 residual stream when ``norm`` is given (normalised, then cast to
    the compute dtype ``dtype``), else the matmul input itself; w: [O, I] plain or packed; b: [O]
    or None; act: None, "gelu_tanh" or "gelu_erf" (:func:`gelu`, in float32); out_dtype: the
    rounding of the result; residual: None or float32 [..., O], added last (float32).

    Decode-sized calls (at most ``fused_gemv.MAX_ROWS`` rows) with the kernels on run as one
    Pallas kernel (pallas_kernels/fused_gemv.py: the norm, bias, activation and residual add
    ride in the GEMV instead of 3-5 small XLA kernels); they return float32 arrays holding
    ``out_dtype`` values (the next kernel reads them without a conversion).  Everything else is
    the composition of :func:`layer_norm` / :func:`rms_norm`, :func:`linear`, :func:`gelu`, and
    returns ``out_dtype`` (float32 with a residual).  ``return_normed=True`` (with a norm):
    returns ``(y, h)``, h = the normalised input in ``dtype``.  ``row_groups=True``: more rows
    go to the kernel where the weight is small (``fused_gemv.supports``: gpt-oss's router at
    batch decode).  ``partials=True`` (no act, no residual): the matmul may return a
    ``packed.SplitK`` (:func:`linear`), handed on as is.
    """
    from pallas_kernels import kernel_mode
    from pallas_kernels import fused_gemv as fg

    mode = kernel_mode()
    if mode != "ref" and act in fg.ACTS and fg.supports(x.shape, w, row_groups=row_groups):
        round_to = None if jnp.dtype(out_dtype) == F32 else out_dtype
        return fg.fused_gemv(
            x, w, b,
            None if norm is None else norm.weight, None if norm is None else norm.bias,
            residual, norm=None if norm is None else norm.kind,
            eps=1e-5 if norm is None else float(norm.eps), act=act, round_to=round_to, cdt=dtype,
            norm_out=return_normed, interpret=mode == "interpret")
    h = x if norm is None else norm(x, out_dtype=dtype)
    if partials and act is None and residual is None:
        y = linear(h, w, b, out_dtype=out_dtype, partials=True)
        return (y, h) if return_normed else y
    y = linear(h, w, b, out_dtype=F32 if act else out_dtype)
    if act:
        y = gelu(y, approximate=act == "gelu_tanh").astype(out_dtype)
    y = y if residual is None else residual + y.astype(F32)
    return (y, h) if return_normed else y


def unembed(params, hidden):
    """Logits from final (normalised) hidden states: float32 [B, T, D] → float32 [B, T, V].

    Uses ``output.weight`` [V, D] when present, else the token embedding (tied head: llama.cpp's
    TENSOR_DUPLICATED fallback, HF ``tie_word_embeddings``). The hidden state is cast to the
    weight's compute dtype so that the big matmul runs in it, accumulated in float32.
    """
    w = params["output"]["weight"] if "output" in params else params["token_embd"]["weight"]
    return linear(hidden.astype(w.dtype), w, out_dtype=F32)


# ---- rotary position embedding (Su et al. 2021, "RoFormer") ------------------------------------

def rope_frequencies(config) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies and the cos/sin multiplier of ``config``: (float32 [R/2], float).

    R = ``config.rope_dim`` (= head_dim), theta = ``config.rope_theta``, i = 0..R/2-1::

        inv_freq_i = 1 / theta^(2i/R)                      plain RoPE (multiplier 1)
        inv_freq_i / factor                                rope_scaling.type == "linear"
        YaRN ramp between inv_freq_i and inv_freq_i / factor, multiplier mscale   "yarn"

    The YaRN ramp (Peng et al. 2023; transformers ``_compute_yarn_parameters``, OpenAI gpt-oss
    ``_compute_concentration_and_inv_freq``; formulas in :class:`gptjax.config.RopeScaling`)::

        low  = R ln(L0 / (beta_fast 2 pi)) / (2 ln theta),  high = same with beta_slow
        (floor(low), ceil(high) when truncate), clamped to [0, R-1] as transformers does
        extrap_i = clamp((i - low) / (high - low), 0, 1) → mask_i = 1 - extrap_i
        inv_freq_i = inv_freq_i / factor * (1 - mask_i) + inv_freq_i * mask_i

    Computed in float32 like the references (transformers: ``1.0 / (base ** (arange(0, R, 2)
    .float() / R))``; ggml keeps its theta in float32 too). Done in numpy at trace time: the
    result is a constant of the compiled program, identical on every backend.
    """
    R = int(config.rope_dim)
    theta = np.float32(config.rope_theta)
    pos_freqs = theta ** (np.arange(0, R, 2, dtype=np.float32) / np.float32(R))   # [R/2] f32
    inv_freq = np.float32(1.0) / pos_freqs
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32), 1.0
    factor = np.float32(rs.factor)
    if rs.type == "linear":
        return (inv_freq / factor).astype(np.float32), 1.0
    if rs.type == "yarn":
        def correction_dim(n_rot):
            return R * math.log(rs.original_context / (n_rot * 2 * math.pi)) / (2 * math.log(
                float(config.rope_theta)))
        low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        if low == high:
            high += 0.001                                   # transformers: no zero division
        ramp = (np.arange(R // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
        mask = np.float32(1) - np.clip(ramp, 0, 1).astype(np.float32)   # 1: keep (extrapolate)
        interp = np.float32(1.0) / (factor * pos_freqs)
        inv = interp * (np.float32(1) - mask) + inv_freq * mask
        return inv.astype(np.float32), float(rs.mscale)
    raise UnsupportedModelError(f"{config.source or '<config>'}: RoPE scaling {rs.type!r} is not "
                                f"implemented; supported: none, linear, yarn")


def rope_cos_sin(positions, inv_freq, mscale=1.0):
    """cos and sin of the rotation angles: float32 [B, T, R/2] each.

    angle[b, t, i] = positions[b, t] * inv_freq[i] in float32 (transformers: float positions
    times float32 inv_freq); both are multiplied by ``mscale`` (YaRN's attention factor, 1
    otherwise), which scales q.k by mscale^2.
    positions: int [B, T]; inv_freq: float32 [R/2] (:func:`rope_frequencies`).
    """
    angles = positions.astype(F32)[..., None] * jnp.asarray(inv_freq, F32)   # [B, T, R/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if mscale != 1.0:
        cos, sin = cos * F32(mscale), sin * F32(mscale)
    return cos, sin


def apply_rope(x, cos, sin, rope_type):
    """Rotate pairs of the head dim of x by the angles of (cos, sin), in float32.

    x: [B, T, N, H]; cos, sin: float32 [B, T, H/2] → [B, T, N, H] in x.dtype. Pair i is
    rotated by angle i: (a, b) → (a cos - b sin, a sin + b cos).

    rope_type "norm" (ggml GGML_ROPE_TYPE_NORMAL, llama GGUFs): pairs are adjacent,
    (x[2i], x[2i+1]) — llama.cpp's converter permuted the q/k rows so that HF's pairs land here.
    rope_type "neox" (GGML_ROPE_TYPE_NEOX, HF ``rotate_half``, gpt-oss): pairs are the two
    halves, (x[i], x[i + H/2]). (ggml-cpu ops.cpp ``rotate_pairs`` with offset 1 vs n_dims/2;
    MODEL_FORMATS.md §5.)
    """
    B, T, N, H = x.shape
    c = cos[:, :, None, :]                                              # [B, T, 1, H/2]
    s = sin[:, :, None, :]
    x32 = x.astype(F32)
    if rope_type == "norm":
        pairs = x32.reshape(B, T, N, H // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]                             # [B, T, N, H/2]
        out = jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(B, T, N, H)
    elif rope_type == "neox":
        a, b = x32[..., : H // 2], x32[..., H // 2 :]
        out = jnp.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    else:
        raise ValueError(f"rope_type {rope_type!r}: expected 'norm' or 'neox'")
    return out.astype(x.dtype)


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

    Sliding layers kept in a ring buffer use it too: :func:`cache_attention` hands it the
    ring's keys laid out in position order (``KVCache.ring_context``) or, at decode, only the
    slots that are all visible, so that slot index order is position order here.
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


def cache_attention(q, k, v, cache, layer: int, q_positions, *, lengths=None, window=None,
                    sinks=None, scale, rope=None, qkv=None):
    """Store the T new tokens' keys/values in ``cache`` (gptjax.cache.KVCache) and attend the T
    new queries over layer ``layer``; the one call site the models use. Returns
    (out [B, T, N, H] in q.dtype, updated cache).

    q: [B, T, N, H]; k, v: [B, T, K, H] (the new keys/values); q_positions: int [B, T],
    contiguous per row (start + arange(T)); lengths: None or int [B], real tokens per row
    (tokens t >= lengths[b] are padding, not stored: :meth:`KVCache.write`); window: None or
    the sliding window W (a Python int on the kernel path); sinks: None or float [N].

    Where the layer lives (:meth:`KVCache.locate`) decides the keys:

    * full stack (slot j = position j): write, then causal (windowed when ``window``)
      attention over the S slots — :func:`attention`;
    * ring (sliding layers, W' = cache.ring_len slots), T = 1: write, then attention over the
      first min(p + 1, W') slots, no window (they hold exactly the visible positions; softmax
      is permutation invariant): :func:`attention` with query "position" min(p, W' - 1);
    * ring, T > 1: attention over :meth:`KVCache.ring_context` (the ring's keys before the
      chunk, in position order, then the chunk's), causal with window W by index, then write.

    rope: None, or ``(cos, sin, rope_type)`` (:func:`rope_cos_sin` tables [B, T, H/2]): q and k
    arrive before RoPE and are rotated here (:func:`apply_rope`) -- on the kernel path of a
    one-token decode without ``lengths`` inside the attention kernel, which also writes the new
    key/value into the cache (``decode_attention_update``: three XLA kernels fewer per layer).
    qkv: None, or the fused projection [B, T, (N + 2K) H] whose slices q, k, v are (given, that
    kernel reads it instead of the slices, which XLA would materialise in kernels of their own),
    or a ``packed.SplitK`` of it (its K splits' partials: the kernel sums them as it reads).

    Implementation by ``pallas_kernels.kernel_mode()``: on a GPU (unless env
    ``GPTJAX_KERNELS=ref``; ``interpret`` runs them on CPU) the Pallas kernels, flash-decoding
    for T = 1 (pallas_kernels.decode_attention, per-row ``lengths`` = visible slots) and flash
    attention for T > 1 (pallas_kernels.prefill_attention), which read a layer of the full or
    ring stack in place; elsewhere (CPU, or forced) the plain-jnp :func:`attention`, their
    reference. Same math, same shapes.
    """
    from pallas_kernels import kernel_mode

    T = q.shape[1]
    in_ring, idx = cache.locate(layer)
    mode = kernel_mode()
    interpret = mode == "interpret"
    if in_ring and window is None:
        raise GptjaxError(f"layer {layer} is stored in the sliding-window ring but no window "
                          f"was given")
    if rope is not None:
        cos, sin, rope_type = rope
        if mode != "ref" and T == 1 and lengths is None:
            return _fused_decode_attention(q, k, v, qkv, cache, in_ring, idx, q_positions, cos,
                                           sin, rope_type, window, sinks, scale, interpret)
        q, k = apply_rope(q, cos, sin, rope_type), apply_rope(k, cos, sin, rope_type)
    if in_ring and T > 1:
        # Keys of the ring before this chunk overwrites them, then the chunk's own.
        k_ctx, v_ctx, q_start = cache.ring_context(layer, k, v, q_positions[:, 0])  # [B,K,W'+T,H]
        cache = cache.write(layer, k, v, q_positions, lengths)
        if mode != "ref":
            from pallas_kernels.prefill_attention import prefill_attention

            out = prefill_attention(q, k_ctx, v_ctx, q_start, window=window, sinks=sinks,
                                    scale=float(scale), interpret=interpret)
        else:
            pos = q_start[:, None] + jnp.arange(T, dtype=q_start.dtype)            # [B, T]
            out = attention(q, k_ctx, v_ctx, pos, window=window, sinks=sinks, scale=scale)
        return out.astype(q.dtype), cache

    cache = cache.write(layer, k, v, q_positions, lengths)
    if in_ring:                                   # decode: every written slot is visible
        ks, vs, W = cache.k_swa, cache.v_swa, cache.ring_len
        n_visible = jnp.minimum(q_positions[:, 0] + 1, W)                           # [B]
        window = None
    else:
        ks, vs = cache.k, cache.v
        n_visible = q_positions[:, 0] + 1
    if mode != "ref":
        if T == 1:
            from pallas_kernels.decode_attention import decode_attention

            out = decode_attention(q[:, 0], ks, vs, n_visible, layer=idx, window=window,
                                   sinks=sinks, scale=float(scale), interpret=interpret)
            return out[:, None].astype(q.dtype), cache
        from pallas_kernels.prefill_attention import prefill_attention

        out = prefill_attention(q, ks, vs, q_positions[:, 0], layer=idx, window=window,
                                sinks=sinks, scale=float(scale), interpret=interpret)
        return out.astype(q.dtype), cache
    pos = (n_visible - 1)[:, None] if in_ring else q_positions
    return attention(q, ks[idx], vs[idx], pos, window=window, sinks=sinks, scale=scale), cache


def _fused_decode_attention(q, k, v, qkv, cache, in_ring, idx, q_positions, cos, sin, rope_type,
                            window, sinks, scale, interpret):
    """:func:`cache_attention` for one new token per row, every row real: RoPE, the cache write
    and the attention in ``pallas_kernels.decode_attention.decode_attention_update_qkv``."""
    from pallas_kernels.decode_attention import (decode_attention_update,
                                                 decode_attention_update_qkv)

    p = q_positions[:, 0].astype(jnp.int32)                                         # [B]
    if in_ring:               # every ring slot written so far is visible: no window by index
        W = cache.ring_len
        ks, vs, window = cache.k_swa, cache.v_swa, None
        n_visible, slots = jnp.minimum(p + 1, W), p % W
    else:
        ks, vs, n_visible, slots = cache.k, cache.v, p + 1, p
    kw = dict(rope_type=rope_type, window=window, sinks=sinks, scale=float(scale), layer=idx,
              interpret=interpret)
    tables = (n_visible, slots, cos[:, 0], sin[:, 0])
    if qkv is None:                                       # the projections ran one by one
        out, ks, vs = decode_attention_update(q[:, 0], k[:, 0], v[:, 0], ks, vs, *tables, **kw)
    elif isinstance(qkv, packed.SplitK):                  # partials [P, B, (N + 2K) H]
        out, ks, vs = decode_attention_update_qkv(qkv.parts[:, :, 0], ks, vs, *tables,
                                                  n_heads=q.shape[2], out_dtype=q.dtype,
                                                  qkv_bias=qkv.bias, qkv_dtype=qkv.dtype, **kw)
    else:                                                 # [B, (N + 2K) H], as the GEMV wrote it
        out, ks, vs = decode_attention_update_qkv(qkv[:, 0], ks, vs, *tables,
                                                  n_heads=q.shape[2], out_dtype=q.dtype, **kw)
    cache = cache.replace(k_swa=ks, v_swa=vs) if in_ring else cache.replace(k=ks, v=vs)
    return out[:, None], cache


def rope_decoder_forward(params, tokens, start, cache, config, block_fn, *, return_hidden=False,
                         lengths=None):
    """The shared skeleton of the RoPE decoders (llama, gpt-oss): embed, RoPE tables, the blocks,
    final RMSNorm, head.  ``block_fn(p, x, cache, layer, positions, lengths, cos, sin, config,
    dtype) -> (x, cache)`` is the architecture's layer; everything else is the contract of
    docs/INTERFACES.md "Models" (tokens int32 [B, T], start int32 [B]; returns float32 logits
    [B, T, V], or the final-normalised hidden state [B, T, D] with ``return_hidden``)."""
    B, T = tokens.shape
    dtype = cache.k.dtype
    positions = start.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    inv_freq, mscale = rope_frequencies(config)
    cos, sin = rope_cos_sin(positions, inv_freq, mscale)                   # [B, T, H/2]
    x = embed(params["token_embd"]["weight"], tokens)                       # [B, T, D] f32
    for layer, p in enumerate(params["blocks"]):
        with jax.named_scope(f"block_{layer}"):
            x, cache = block_fn(p, x, cache, layer, positions, lengths, cos, sin, config, dtype)
    h = rms_norm(x, params["output_norm"]["weight"], config.norm_eps, out_dtype=F32)
    if return_hidden:
        return h, cache
    return unembed(params, h), cache
