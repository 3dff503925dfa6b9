"""End to end on the GPU: the tiny GPT-2 and llama references give the same logits with the Pallas
kernels as with the plain-jnp reference path (GPTJAX_KERNELS=ref), within bf16 tolerance, and the
same greedy tokens.  Skipped without a GPU; on CPU the kernel path is never taken.

Also on CPU: ``layers.cache_attention`` equals the reference whichever path it takes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import rel_err, tiny_gpt2, tiny_llama, write_gpt2_gguf, write_llama_gguf

BF16_RTOL = 2e-2          # bf16 weights/activations: kernel and reference round differently
F32_RTOL = 1e-5

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _run(path, monkeypatch, kernels: str, dtype):
    import gptjax

    monkeypatch.setenv("GPTJAX_KERNELS", kernels)
    m = gptjax.load(path, dtype=dtype)
    ids = list(range(3, 40))
    logits = m.logits(ids)
    gen = m.complete(ids[:7], max_new_tokens=16, eos_ids=()).completions[0].token_ids
    return logits, gen


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_match_reference_end_to_end(tmp_path, monkeypatch, arch, dtype):
    if arch == "gpt2":
        model = tiny_gpt2(seed=1)
        path = write_gpt2_gguf(model, tmp_path / "m.gguf")
    else:
        model = tiny_llama(seed=1)
        path = write_llama_gguf(model, tmp_path / "m.gguf")
    ref_logits, ref_ids = _run(str(path), monkeypatch, "ref", dtype)
    ker_logits, ker_ids = _run(str(path), monkeypatch, "pallas", dtype)
    tol = F32_RTOL if dtype == "float32" else BF16_RTOL
    assert rel_err(ker_logits, ref_logits) < tol
    if dtype == "float32":
        assert list(ker_ids) == list(ref_ids)


def test_cache_attention_dispatch_matches_reference():
    """Whatever path cache_attention takes on this backend, it equals layers.attention."""
    from gptjax.cache import KVCache
    from gptjax.models.layers import attention, cache_attention

    rng = np.random.default_rng(0)
    L, B, K, S, H, N, T = 2, 2, 2, 32, 16, 6, 5
    k = jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.float32)
    cache = KVCache(k=k, v=v)
    for t, start in ((T, np.array([0, 9])), (1, np.array([4, 20]))):
        q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
        pos = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
        for window in (None, 8):
            sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
            got = cache_attention(q, cache, 1, pos, window=window, sinks=sinks, scale=0.25)
            ref = attention(q, k[1], v[1], pos, window=window, sinks=sinks, scale=0.25)
            assert rel_err(got, ref) < F32_RTOL
