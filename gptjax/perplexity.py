"""Perplexity of a token sequence, with llama.cpp's conventions (``llama-perplexity``).

The text's token ids are cut into non-overlapping chunks of ``ctx`` tokens (a remainder shorter
than ``ctx`` is dropped); every chunk is evaluated from an empty KV cache, and only its second
half is scored: tokens ``ctx/2 .. ctx-1``, each predicted from the logits of the previous
position, so that every scored token has at least ``ctx/2`` tokens of context::

    nll_j = logsumexp(logits[j-1]) - logits[j-1][token_j]        j = ctx/2 .. ctx-1
    ppl   = exp(mean over all chunks of nll_j)

(llama.cpp ``tools/perplexity/perplexity.cpp``: ``first = n_ctx/2``; the test data's README
states the same convention for the SmolLM2 goldens.) When the vocabulary adds a BOS token,
llama.cpp overwrites the first token of every chunk with it; pass ``bos_id`` for that.

The chunk forward is jitted once (every chunk has the same shape) and the log-softmax runs in
float32 on the device; only the ctx/2 scores per chunk come back to the host.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import GenerationError

__all__ = ["perplexity"]


def _chunk_nll(params, tokens, *, forward_fn, unembed_fn, init_cache_fn, config, dtype):
    """NLL of tokens[:, ctx/2:] of one batch of chunks. tokens: int32 [B, T] → float32
    [B, T - T/2]."""
    B, T = tokens.shape
    first = T // 2
    cache = init_cache_fn(config, B, T, dtype)
    start = jnp.zeros((B,), jnp.int32)
    if unembed_fn is None:
        logits, _ = forward_fn(params, tokens, start, cache, config)
        logits = logits[:, first - 1 : T - 1]                             # [B, T/2, V]
    else:
        hidden, _ = forward_fn(params, tokens, start, cache, config, return_hidden=True)
        logits = unembed_fn(params, hidden[:, first - 1 : T - 1])         # [B, T/2, V]
    logits = logits.astype(jnp.float32)
    targets = tokens[:, first:]                                           # [B, T/2]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def perplexity(forward_fn: Callable, params, config, token_ids: Sequence[int], ctx: int = 512,
               progress: Callable | None = None, *, unembed_fn: Callable | None = None,
               init_cache_fn: Callable | None = None, cache_dtype=None,
               bos_id: int | None = None) -> tuple[float, list[float]]:
    """Perplexity of ``token_ids`` under the model, llama.cpp style (module docstring).

    forward_fn: a model's ``forward(params, tokens, start, cache, config, *, return_hidden)``
        (docs/INTERFACES.md), e.g. ``gptjax.models.llama.forward``.
    params, config: the parameter pytree and its ModelConfig.
    token_ids: the whole text's ids (no BOS added; see ``bos_id``).
    ctx: chunk length, even, 2 <= ctx <= config.context_length.
    progress: optional ``progress(done_chunks, n_chunks, ppl_so_far)`` called after each chunk.
    unembed_fn: optional ``unembed(params, hidden [B, T, D]) -> logits``; when given only the
        ctx/2 - scored rows go through the output matrix (saves ~half of the head's matmul).
    init_cache_fn: ``init_cache(config, batch, max_len, dtype)``, default gptjax.cache's.
    cache_dtype: cache (= compute) dtype, default float32.
    bos_id: when not None, the first token of every chunk is replaced by it (llama.cpp does
        this when the vocabulary's add_bos is true).

    Returns (ppl, nll) where nll lists the negative log-likelihood (nats) of every scored
    token, chunk after chunk (n_chunks * (ctx - ctx/2) values).
    Raises GenerationError for a bad ``ctx``, out-of-range ids or fewer than ``ctx`` tokens.
    """
    if init_cache_fn is None:
        from gptjax.cache import init_cache as init_cache_fn
    dtype = jnp.float32 if cache_dtype is None else cache_dtype
    ctx = int(ctx)
    if ctx < 2 or ctx % 2 or ctx > config.context_length:
        raise GenerationError(f"perplexity: ctx = {ctx}: expected an even chunk length in "
                              f"[2, context_length = {config.context_length}]")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = int(ids[(ids < 0) | (ids >= config.vocab_size)][0])
        raise GenerationError(f"perplexity: token id {bad} is outside the vocabulary "
                              f"[0, {config.vocab_size})")
    n_chunks = ids.size // ctx
    if n_chunks == 0:
        raise GenerationError(f"perplexity: {ids.size} tokens is fewer than one chunk of "
                              f"ctx = {ctx} tokens")
    chunks = ids[: n_chunks * ctx].reshape(n_chunks, ctx).astype(np.int32)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    fn = jax.jit(partial(_chunk_nll, forward_fn=forward_fn, unembed_fn=unembed_fn,
                         init_cache_fn=init_cache_fn, config=config, dtype=dtype))
    nll: list[float] = []
    for i in range(n_chunks):
        out = np.asarray(fn(params, jnp.asarray(chunks[i : i + 1])), dtype=np.float64)
        nll.extend(out.reshape(-1).tolist())
        if progress is not None:
            progress(i + 1, n_chunks, math.exp(sum(nll) / len(nll)))
    return math.exp(sum(nll) / len(nll)), nll
