"""gpt-oss (OpenAI 2025, gpt-oss-20b / -120b) over a plain parameter pytree.

Graph (MODEL_FORMATS.md §1, §2.5; OpenAI gpt_oss/torch/model.py; transformers
``GptOssForCausalLM``; llama.cpp src/models/openai-moe.cpp)::

    x = token_embd[tokens]                                         no position table: RoPE
    for each block l:
        h = RMSNorm(x; attn_norm)
        q, k, v = h @ attn_{q,k,v}.T + b                           GQA: head n uses kv n // G
        q, k = RoPE_neox_yarn(q), RoPE_neox_yarn(k)                half-split pairs, YaRN
        x = x + Attention(q, k, v; sinks, window if l sliding) @ attn_output.T + b
        x = x + MoE(RMSNorm(x; post_attention_norm))               models/moe.py moe_block
    logits = RMSNorm(x; output_norm) @ output.T                    untied, no bias

Attention (gptjax.models.layers.cache_attention: Pallas flash kernels on GPU, the plain-jnp
``attention`` elsewhere): scale 1/sqrt(H); one learned sink logit per *query*
head joins the softmax denominator, ``p_j = exp(s_j) / (exp(sink_n) + sum_i exp(s_i))``;
layers with ``config.layer_is_sliding(l)`` (even layers for gpt-oss) see only the last
``config.sliding_window`` positions (the query's own included), odd layers are full causal.

RoPE (gptjax.models.layers.rope_frequencies / rope_cos_sin / apply_rope): NeoX half-split pairs
(x_i, x_{i+H/2}) on q/k rows as both GGUF and HF store them (no permutation), YaRN
frequencies with OpenAI/HF's unrounded ramp (``rope_scaling.truncate`` False; True gives
llama.cpp's floor/ceil), cos and sin both multiplied by the concentration 0.1 ln(factor) + 1.

Parameter tree (GGUF names; weights are [out, in] rows; expert stacks may be
:class:`gptjax.packed.PackedWeight`)::

    token_embd.weight [V, D]        output_norm.weight [D]        output.weight [V, D]
    blocks[l].attn_norm.weight [D]
    blocks[l].attn_q.weight [NH, D], .bias [NH]     blocks[l].attn_k / attn_v .weight [KH, D], .bias
    blocks[l].attn_output.weight [D, NH], .bias [D]
    blocks[l].attn_sinks.weight [N]
    blocks[l].post_attention_norm.weight [D]
    blocks[l].ffn_gate_inp.weight [E, D], .bias [E]                       router
    blocks[l].ffn_gate_exps / ffn_up_exps .weight [E, F, D], .bias [E, F]   F = expert_d_ff
    blocks[l].ffn_down_exps.weight [E, D, F], .bias [E, D]

KV cache (gptjax.cache.KVCache): full layers keep ``S`` slots, sliding layers a ring buffer of
``min(sliding_window, S)`` slots (128 for gpt-oss), about half the memory of S slots everywhere
at long contexts; cache.py explains why decode and chunked prefill stay exact with it.

Numerics as gpt2.py / llama.py: residual stream, norms, softmax, router and accumulations in
float32; matmul inputs in the compute dtype (the cache's dtype); logits float32.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from gptjax.fusion import split_linear
from gptjax.models.layers import (Norm, cache_attention, norm_linear,
                                  rope_decoder_forward, unembed)
from gptjax.models.moe import moe_block

__all__ = ["param_shapes", "forward", "unembed", "GptOss"]


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter the model reads, as ``{"blocks.3.attn_sinks.weight": (N,), ...}``
    (dotted paths; an integer component indexes the ``blocks`` list). Logical shapes: a packed
    expert stack [E, O, I] counts as its logical shape."""
    V, D, N = config.vocab_size, config.d_model, config.n_heads
    NH, KH = config.q_dim, config.kv_dim
    E, F = config.n_experts, config.expert_d_ff
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    per_layer = {
        "attn_norm.weight": (D,),
        "attn_q.weight": (NH, D), "attn_q.bias": (NH,),
        "attn_k.weight": (KH, D), "attn_k.bias": (KH,),
        "attn_v.weight": (KH, D), "attn_v.bias": (KH,),
        "attn_output.weight": (D, NH), "attn_output.bias": (D,),
        "attn_sinks.weight": (N,),
        "post_attention_norm.weight": (D,),
        "ffn_gate_inp.weight": (E, D), "ffn_gate_inp.bias": (E,),
        "ffn_gate_exps.weight": (E, F, D), "ffn_gate_exps.bias": (E, F),
        "ffn_up_exps.weight": (E, F, D), "ffn_up_exps.bias": (E, F),
        "ffn_down_exps.weight": (E, D, F), "ffn_down_exps.bias": (E, D),
    }
    for layer in range(config.n_layers):
        for name, shape in per_layer.items():
            shapes[f"blocks.{layer}.{name}"] = shape
    if not config.tied_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def _block(p, x, cache, layer, positions, lengths, cos, sin, config, dtype):
    """One transformer block. x: float32 [B, T, D] (residual) → (float32 [B, T, D], cache)."""
    B, T, D = x.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim

    with jax.named_scope("attention"):
        (q, k, v), qkv = split_linear(p, ("attn_q", "attn_k", "attn_v"), x,
                                      (N * H, K * H, K * H), with_fused=True, dtype=dtype,
                                      norm=Norm("rms", p["attn_norm"]["weight"],
                                                eps=config.norm_eps))      # RMSNorm fused in
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        window = config.sliding_window if config.layer_is_sliding(layer) else None
        a, cache = cache_attention(q, k, v, cache, layer, positions, lengths=lengths,
                                   window=window, sinks=p["attn_sinks"]["weight"],
                                   scale=H ** -0.5, rope=(cos, sin, config.rope_type),
                                   qkv=qkv)                                # [B, T, N, H]
        x = norm_linear(a.reshape(B, T, N * H), p["attn_output"]["weight"],
                        p["attn_output"]["bias"], dtype=dtype, residual=x)  # [B, T, D] f32

    with jax.named_scope("moe"):
        norm = Norm("rms", p["post_attention_norm"]["weight"], eps=config.norm_eps)
        x = moe_block(x.reshape(B * T, D), p, config, norm, dtype)        # [BT, D] f32, + x
    return x.reshape(B, T, D), cache


def forward(params, tokens, start, cache, config, *, return_hidden=False, lengths=None):
    """Run T tokens of every row through the model, reading and extending the KV cache.

    tokens: int32 [B, T]; start: int32 [B], the position of tokens[:, 0] in each row;
    cache: KVCache (gptjax.cache: full layers [Lf, B, K, S, H], sliding layers a ring of
    min(W, S) slots); config: ModelConfig (static under jit); lengths: None or int32 [B],
    real tokens per row of a right-padded batch (padding is not written to the cache, so it
    cannot evict keys from the rings; None: every token is real).
    Returns (logits float32 [B, T, V], updated cache). With ``return_hidden=True`` the first
    element is instead the final-normalised hidden state float32 [B, T, D]; apply
    :func:`unembed` to the rows you need.
    """
    return rope_decoder_forward(params, tokens, start, cache, config, _block,
                                return_hidden=return_hidden, lengths=lengths)


class GptOss(nn.Module):
    """Flax linen face of :func:`forward` (see gpt2.GPT2 for why the math lives outside)."""

    config: object

    @nn.compact
    def __call__(self, tokens, start, cache, *, return_hidden=False, lengths=None):
        return forward(self.variables["params"], tokens, start, cache, self.config,
                       return_hidden=return_hidden, lengths=lengths)
