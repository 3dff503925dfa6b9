"""GPT-2 (Radford et al. 2019) over a plain parameter pytree.

Graph (llama.cpp src/models/gpt2.cpp; HF GPT2LMHeadModel; MODEL_FORMATS.md §4)::

    x = token_embd[tokens] + position_embd[positions]            learned absolute positions
    for each block:
        h = LayerNorm(x; attn_norm)
        q, k, v = split(h @ attn_qkv.T + b)                      fused rows: q, then k, then v
        x = x + Attention(q, k, v) @ attn_output.T + b            causal, scale 1/sqrt(H)
        h = LayerNorm(x; ffn_norm)
        x = x + GELU_tanh(h @ ffn_up.T + b) @ ffn_down.T + b
    logits = LayerNorm(x; output_norm) @ output.T                 output = token_embd if tied

Parameter tree (names follow the GGUF tensors; weights are [out, in] rows)::

    token_embd.weight [V, D]          position_embd.weight [P, D]   (P = context_length)
    blocks[l].attn_norm.{weight,bias} [D]
    blocks[l].attn_qkv.weight [(N+2K)H, D], .bias [(N+2K)H]
    blocks[l].attn_output.weight [D, NH], .bias [D]
    blocks[l].ffn_norm.{weight,bias} [D]
    blocks[l].ffn_up.weight [F, D], .bias [F]      blocks[l].ffn_down.weight [D, F], .bias [D]
    output_norm.{weight,bias} [D]     output.weight [V, D]   (only when the head is not tied)

``blocks`` is a list (one dict per layer) rather than stacked [L, ...] arrays: GGUF files
quantize different layers with different types, so packed per-layer weights cannot always be
stacked; the Python loop over layers unrolls at trace time.

The residual stream is float32; the inputs of matmuls use the compute dtype, which is the
cache's dtype (chosen at load: float32 on CPU, bfloat16 on GPU). Norms, softmax and all
accumulations are float32 and the logits are float32.

Positions must stay below ``config.context_length`` (there is no embedding beyond it). Inside
jit this cannot raise, and an out-of-range position would silently reuse the last embedding
row, so the caller (gptjax.generate) checks prompt length + new tokens against the context at
the Python level and raises GenerationError.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gptjax.models.layers import F32, Norm, cache_attention, embed, layer_norm, linear, norm_linear


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter the model reads, as ``{"blocks.3.ffn_up.bias": (F,), ...}``.

    The dotted path indexes the nested tree (an integer component indexes the ``blocks``
    list). ``output.weight`` appears only when ``config.tied_embeddings`` is false.
    """
    V, D, P = config.vocab_size, config.d_model, config.context_length
    N, K, H, F = config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    shapes = {
        "token_embd.weight": (V, D),
        "position_embd.weight": (P, D),
        "output_norm.weight": (D,),
        "output_norm.bias": (D,),
    }
    per_layer = {
        "attn_norm.weight": (D,), "attn_norm.bias": (D,),
        "attn_qkv.weight": ((N + 2 * K) * H, D), "attn_qkv.bias": ((N + 2 * K) * H,),
        "attn_output.weight": (D, N * H), "attn_output.bias": (D,),
        "ffn_norm.weight": (D,), "ffn_norm.bias": (D,),
        "ffn_up.weight": (F, D), "ffn_up.bias": (F,),
        "ffn_down.weight": (D, F), "ffn_down.bias": (D,),
    }
    for layer in range(config.n_layers):
        for name, shape in per_layer.items():
            shapes[f"blocks.{layer}.{name}"] = shape
    if not config.tied_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def _block(p, x, cache, layer, positions, lengths, config, dtype):
    """One transformer block. x: float32 [B, T, D] (residual) → (float32 [B, T, D], cache)."""
    B, T, _ = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    eps = config.norm_eps

    ln_1 = Norm("layer", p["attn_norm"]["weight"], p["attn_norm"]["bias"], eps)
    ln_2 = Norm("layer", p["ffn_norm"]["weight"], p["ffn_norm"]["bias"], eps)
    qkv = norm_linear(x, p["attn_qkv"]["weight"], p["attn_qkv"]["bias"], norm=ln_1, dtype=dtype,
                      out_dtype=dtype)                                     # [B, T, (N+2K)H]
    q = qkv[..., : N * H].reshape(B, T, N, H).astype(dtype)
    k = qkv[..., N * H : (N + K) * H].reshape(B, T, K, H).astype(dtype)
    v = qkv[..., (N + K) * H :].reshape(B, T, K, H).astype(dtype)
    a, cache = cache_attention(q, k, v, cache, layer, positions, lengths=lengths,
                               scale=H ** -0.5)                          # [B, T, N, H]
    x = norm_linear(a.reshape(B, T, N * H), p["attn_output"]["weight"], p["attn_output"]["bias"],
                    dtype=dtype, residual=x)                              # [B, T, D] f32
    u = norm_linear(x, p["ffn_up"]["weight"], p["ffn_up"]["bias"], norm=ln_2, dtype=dtype,
                    out_dtype=dtype, act="gelu_tanh")                     # [B, T, F]
    x = norm_linear(u, p["ffn_down"]["weight"], p["ffn_down"]["bias"], dtype=dtype,
                    residual=x)                                           # [B, T, D] f32
    return x, cache


def unembed(params, hidden):
    """Logits from final (normalised) hidden states: float32 [B, T, D] → float32 [B, T, V].

    Uses ``output.weight`` when present, else the token embedding (tied head, as llama.cpp's
    TENSOR_DUPLICATED fallback and HF ``tie_word_embeddings``).
    """
    w = params["output"]["weight"] if "output" in params else params["token_embd"]["weight"]
    return linear(hidden.astype(w.dtype), w, out_dtype=F32)


def forward(params, tokens, start, cache, config, *, return_hidden=False, lengths=None):
    """Run T tokens of every row through the model, reading and extending the KV cache.

    tokens: int32 [B, T]; start: int32 [B], the position of tokens[:, 0] in each row;
    cache: KVCache (gptjax.cache; k, v [L, B, K, S, H], sliding layers in rings when the
    config has a window); config: ModelConfig (static under jit); lengths: None or int32
    [B], real tokens per row of a right-padded batch (padding is not written to the cache).
    Returns (logits float32 [B, T, V], updated cache). With ``return_hidden=True`` the first
    element is instead the final-normalised hidden state float32 [B, T, D]; apply
    :func:`unembed` to the rows you need (e.g. only the last prompt position at prefill).
    """
    B, T = tokens.shape
    dtype = cache.k.dtype
    positions = start.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    x = (embed(params["token_embd"]["weight"], tokens)
         + embed(params["position_embd"]["weight"], positions))               # [B, T, D] f32
    for layer, p in enumerate(params["blocks"]):
        with jax.named_scope(f"block_{layer}"):
            x, cache = _block(p, x, cache, layer, positions, lengths, config, dtype)
    h = layer_norm(x, params["output_norm"]["weight"], params["output_norm"]["bias"],
                   config.norm_eps, out_dtype=F32)                           # [B, T, D]
    if return_hidden:
        return h, cache
    return unembed(params, h), cache


class GPT2(nn.Module):
    """Flax linen face of :func:`forward`: ``GPT2(config).apply({"params": tree}, tokens,
    start, cache)``.

    The math lives in pure functions over the pytree so that the jitted generate loop, the
    Pallas kernels and packed quantized leaves (whose shapes are not the logical ones, which
    linen's ``self.param`` shape check would reject) all see the same code.
    """

    config: object

    @nn.compact
    def __call__(self, tokens, start, cache, *, return_hidden=False, lengths=None):
        return forward(self.variables["params"], tokens, start, cache, self.config,
                       return_hidden=return_hidden, lengths=lengths)
