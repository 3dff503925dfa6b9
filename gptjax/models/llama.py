"""Llama (Touvron et al. 2023) over a plain parameter pytree: SmolLM2 and friends.

Graph (llama.cpp src/models/llama.cpp; HF LlamaForCausalLM; MODEL_FORMATS.md §5)::

    x = token_embd[tokens]                                        no position table: RoPE
    for each block:
        h = RMSNorm(x; attn_norm)
        q, k, v = h @ attn_q.T (+b), h @ attn_k.T (+b), h @ attn_v.T (+b)
        q, k = RoPE(q), RoPE(k)                                   adjacent pairs ("norm")
        x = x + GQA-Attention(q, k, v) @ attn_output.T (+b)       causal, scale 1/sqrt(H)
        h = RMSNorm(x; ffn_norm)
        x = x + (silu(h @ ffn_gate.T) * (h @ ffn_up.T)) @ ffn_down.T     SwiGLU (+b optional)
    logits = RMSNorm(x; output_norm) @ output.T                   output = token_embd if tied

Parameter tree (names follow the GGUF tensors; weights are [out, in] rows)::

    token_embd.weight [V, D]
    blocks[l].attn_norm.weight [D]            blocks[l].ffn_norm.weight [D]
    blocks[l].attn_q.weight [NH, D]           blocks[l].attn_k.weight, attn_v.weight [KH, D]
    blocks[l].attn_output.weight [D, NH]      (.bias of each when config.attention_bias)
    blocks[l].ffn_gate.weight, ffn_up.weight [F, D]   blocks[l].ffn_down.weight [D, F]
                                              (.bias of each when config.mlp_bias)
    output_norm.weight [D]                    output.weight [V, D]   (only when not tied)

Query/key layout: the q and k rows are in **GGUF order** — llama.cpp's converter permuted them
so that each head's rotation pairs are adjacent rows (x[2i], x[2i+1]) — and RoPE rotates
adjacent pairs (``config.rope_type == "norm"``, ggml GGML_ROPE_TYPE_NORMAL). GGUF files load
as they are (packed quantized rows need no touching); HF checkpoints, whose pairs are the two
halves of each head, get the converter's permutation applied at load (gptjax.weights). q.k is
the same either way, so both sources give identical logits.

Numerics as gpt2.py: residual stream, norms, softmax and accumulations in float32; matmul
inputs in the compute dtype (the cache's dtype); logits float32.
"""
from __future__ import annotations

from flax import linen as nn

from gptjax.fusion import split_linear
from gptjax.models.layers import (F32, Norm, cache_attention, norm_linear,
                                  rope_decoder_forward, swiglu, unembed)

__all__ = ["param_shapes", "forward", "unembed", "Llama"]


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter the model reads, as ``{"blocks.3.ffn_up.weight": (F, D), ...}``
    (dotted paths; an integer component indexes the ``blocks`` list). Biases appear only when
    ``config.attention_bias`` / ``config.mlp_bias`` say so, ``output.weight`` only when the
    head is not tied."""
    V, D, F = config.vocab_size, config.d_model, config.d_ff
    NH, KH = config.q_dim, config.kv_dim
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    per_layer = {
        "attn_norm.weight": (D,),
        "attn_q.weight": (NH, D), "attn_k.weight": (KH, D), "attn_v.weight": (KH, D),
        "attn_output.weight": (D, NH),
        "ffn_norm.weight": (D,),
        "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F),
    }
    if config.attention_bias:
        per_layer.update({"attn_q.bias": (NH,), "attn_k.bias": (KH,), "attn_v.bias": (KH,),
                          "attn_output.bias": (D,)})
    if config.mlp_bias:
        per_layer.update({"ffn_gate.bias": (F,), "ffn_up.bias": (F,), "ffn_down.bias": (D,)})
    for layer in range(config.n_layers):
        for name, shape in per_layer.items():
            shapes[f"blocks.{layer}.{name}"] = shape
    if not config.tied_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def _block(p, x, cache, layer, positions, lengths, cos, sin, config, dtype):
    """One transformer block. x: float32 [B, T, D] (residual) → (float32 [B, T, D], cache)."""
    B, T, _ = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim

    eps = config.norm_eps
    (q, k, v), qkv = split_linear(p, ("attn_q", "attn_k", "attn_v"), x, (N * H, K * H, K * H),
                                  norm=Norm("rms", p["attn_norm"]["weight"], eps=eps),
                                  dtype=dtype, with_fused=True)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
    window = config.sliding_window if config.sliding_window_pattern[layer] else None
    a, cache = cache_attention(q, k, v, cache, layer, positions, lengths=lengths, window=window,
                               scale=H ** -0.5, rope=(cos, sin, config.rope_type),
                               qkv=qkv)                                    # RoPE inside
    x = norm_linear(a.reshape(B, T, N * H), p["attn_output"]["weight"],
                    p["attn_output"].get("bias"), dtype=dtype, residual=x)  # [B, T, D] f32

    g, u = split_linear(p, ("ffn_gate", "ffn_up"), x, (config.d_ff, config.d_ff), out_dtype=F32,
                        norm=Norm("rms", p["ffn_norm"]["weight"], eps=eps),
                        dtype=dtype)                                       # [B, T, F] x 2
    x = norm_linear(swiglu(g, u, out_dtype=dtype), p["ffn_down"]["weight"],
                    p["ffn_down"].get("bias"), dtype=dtype, residual=x)    # [B, T, D] f32
    return x, cache


def forward(params, tokens, start, cache, config, *, return_hidden=False, lengths=None):
    """Run T tokens of every row through the model, reading and extending the KV cache.

    tokens: int32 [B, T]; start: int32 [B], the position of tokens[:, 0] in each row;
    cache: KVCache (gptjax.cache; k, v [L, B, K, S, H], sliding layers in rings when the
    config has a window); config: ModelConfig (static under jit); lengths: None or int32
    [B], real tokens per row of a right-padded batch (padding is not written to the cache).
    Returns (logits float32 [B, T, V], updated cache). With ``return_hidden=True`` the first
    element is instead the final-normalised hidden state float32 [B, T, D]; apply
    :func:`unembed` to the rows you need.
    """
    return rope_decoder_forward(params, tokens, start, cache, config, _block,
                                return_hidden=return_hidden, lengths=lengths)


class Llama(nn.Module):
    """Flax linen face of :func:`forward` (see gpt2.GPT2 for why the math lives outside)."""

    config: object

    @nn.compact
    def __call__(self, tokens, start, cache, *, return_hidden=False, lengths=None):
        return forward(self.variables["params"], tokens, start, cache, self.config,
                       return_hidden=return_hidden, lengths=lengths)
