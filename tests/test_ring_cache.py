"""The KV cache with ring buffers for sliding-window layers (gptjax/cache.py).

Layers:

* literal slot arrays: where a ring stores each position (with padding left out), what
  ``context_slots`` / ``ring_context`` lay out for a chunk, which stack holds each layer;
* ``layers.cache_attention`` on a ring against an independent reference, plain causal-window
  attention over a full cache that keeps every position (``layers.attention``), on the jnp path
  and on the Pallas kernels in interpret mode;
* the tiny gpt-oss (window 8, tests/tiny_models.py) with the ring cache against transformers
  (float32, eager): one full forward, prefill + token-by-token decode across several wraps of
  the ring, chunked prefill (chunks of 5 and of 11 > W, rows at different positions), and a
  right-padded batch with prompts of 5 and 300 tokens, then decode;
* sizes: shapes of the stacks, bytes of the real gpt-oss-20b cache at 131072 positions through
  ``jax.eval_shape`` (= ``ModelConfig.kv_cache_bytes``, about half of S slots everywhere), and
  the generate layer refusing a request the device memory cannot hold.

Errors are relative Frobenius norms ||x - ref|| / ||ref||.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.cache import KVCache, cache_nbytes, context_slots, init_cache
from gptjax.config import ModelConfig
from gptjax.errors import GenerationError
from gptjax.models import gpt_oss
from gptjax.models.layers import attention, cache_attention
from tiny_models import rel_err, save_hf_dir, tiny_gpt_oss, torch_logits

F32_TOL = 1e-4       # model logits vs transformers, float32 (the brief's bound; measured 2e-6..5e-6)
OP_TOL = 1e-5        # one attention call vs its full-cache reference, float32
W = 8                # the tiny gpt-oss window
SEQ = 40             # five wraps of the ring
S = 56               # cache length of the short-sequence tests (one compilation per T)

forward = jax.jit(gpt_oss.forward, static_argnames=("config", "return_hidden"))


# ---- literal slot arrays --------------------------------------------------------------------

def toy_config(pattern=(True, False, True), window=4):
    return SimpleNamespace(n_layers=len(pattern), n_kv_heads=1, head_dim=1,
                           sliding_window=window, sliding_window_pattern=pattern)


def pos_kv(positions):
    """k = v = position + 1 (0 marks an empty slot): float32 [B, T, 1, 1]."""
    p = jnp.asarray(positions, jnp.float32)
    return (p + 1)[:, :, None, None]


def ring(cache, idx):
    return np.asarray(cache.k_swa[idx, :, 0, :, 0])                     # [B, W']


def test_layer_map_and_shapes():
    cache = init_cache(toy_config(), 2, 10)
    assert [cache.locate(layer) for layer in range(3)] == [(True, 0), (False, 0), (True, 1)]
    assert cache.k.shape == (1, 2, 1, 10, 1) and cache.k_swa.shape == (2, 2, 1, 4, 1)
    assert (cache.n_layers, cache.batch, cache.max_len, cache.ring_len) == (3, 2, 10, 4)
    short = init_cache(toy_config(), 2, 3)                              # S < W: W' = S
    assert short.k_swa.shape == (2, 2, 1, 3, 1)
    # no window: today's single stack, no ring leaves in the pytree
    plain = init_cache(toy_config((False, False, False), 0), 2, 10)
    assert plain.k_swa is None and plain.sliding == () and plain.k.shape == (3, 2, 1, 10, 1)
    assert len(jax.tree.leaves(plain)) == 2
    # every layer sliding (a windowed llama): an empty full stack that still carries S
    allswa = init_cache(toy_config((True, True), 4), 1, 10)
    assert allswa.k.shape == (0, 1, 1, 10, 1) and allswa.max_len == 10
    assert allswa.locate(1) == (True, 1)


def test_ring_writes_literal():
    """W' = 4. Position p goes to slot p % 4; padding (t >= lengths) is not written; only the
    last 4 real tokens of a chunk land."""
    cache = init_cache(toy_config(), 2, 10)
    pos = jnp.arange(6)[None, :] + jnp.zeros((2, 1), jnp.int32)         # [B, T] 0..5
    cache = cache.write(2, pos_kv(pos), pos_kv(pos), pos, jnp.array([2, 6]))
    np.testing.assert_array_equal(ring(cache, 1), [[1, 2, 0, 0], [5, 6, 3, 4]])
    assert not np.any(ring(cache, 0))                                   # other ring untouched
    # the full layer gets the same tokens with the padding left out
    full = cache.write(1, pos_kv(pos), pos_kv(pos), pos, jnp.array([2, 6]))
    np.testing.assert_array_equal(np.asarray(full.k[0, :, 0, :, 0]),
                                  [[1, 2, 0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0, 0, 0]])
    # decode: one token per row at its own position
    step = jnp.array([[2], [6]])
    cache = cache.write(2, pos_kv(step), pos_kv(step), step)
    np.testing.assert_array_equal(ring(cache, 1), [[1, 2, 3, 0], [5, 6, 7, 4]])
    # the layout a 3-token chunk at starts (3, 7) attends to, read before it is written:
    # ring entries in position order, then the chunk, then filler (the last chunk token)
    chunk = jnp.array([[3, 4, 5], [7, 8, 9]])
    k_ctx, _, q_start = cache.ring_context(2, pos_kv(chunk), pos_kv(chunk), chunk[:, 0])
    np.testing.assert_array_equal(np.asarray(q_start), [3, 4])
    np.testing.assert_array_equal(np.asarray(k_ctx[:, 0, :, 0]),
                                  [[1, 2, 3, 4, 5, 6, 6], [4, 5, 6, 7, 8, 9, 10]])
    cache = cache.write(2, pos_kv(chunk), pos_kv(chunk), chunk)
    np.testing.assert_array_equal(ring(cache, 1), [[5, 6, 3, 4], [9, 10, 7, 8]])


def test_single_row_full_layer_write_literal():
    """B = 1 without ``lengths`` takes the dynamic-update-slice path; it writes what the
    dropping scatter (the same call with lengths = T) writes, in the right layer, at the right
    positions, with every other slot untouched."""
    cache = init_cache(toy_config((False, True, False)), 1, 10)        # full layers 0 and 2
    cache = cache.replace(k=cache.k + 9, v=cache.v - 9)                 # non-zero background
    want = np.full(10, 9.0)
    for pos in (jnp.array([[4, 5, 6]]), jnp.array([[9]]), jnp.array([[0]])):
        fast = cache.write(2, pos_kv(pos), pos_kv(pos) * 2, pos)
        slow = cache.write(2, pos_kv(pos), pos_kv(pos) * 2, pos, jnp.array([pos.shape[1]]))
        np.testing.assert_array_equal(np.asarray(fast.k), np.asarray(slow.k))
        np.testing.assert_array_equal(np.asarray(fast.v), np.asarray(slow.v))
        want[np.asarray(pos[0])] = np.asarray(pos[0]) + 1
        np.testing.assert_array_equal(np.asarray(fast.k[1, 0, 0, :, 0]), want)
        assert np.all(np.asarray(fast.k[0]) == 9)                      # the other full layer
        cache = fast


def test_single_row_ring_decode_write_literal():
    """B = 1, T = 1 without ``lengths`` takes the dynamic-update-slice path in a ring layer: slot
    p mod W', the same result as the scatter (the call with lengths = 1), other ring untouched."""
    cache = init_cache(toy_config(), 1, 10)                             # W' = 4, rings 0 and 1
    cache = cache.replace(k_swa=cache.k_swa + 9, v_swa=cache.v_swa - 9)
    want = np.full(4, 9.0)
    for p in (0, 3, 4, 9, 2):
        pos = jnp.array([[p]])
        fast = cache.write(2, pos_kv(pos), pos_kv(pos) * 2, pos)
        slow = cache.write(2, pos_kv(pos), pos_kv(pos) * 2, pos, jnp.array([1]))
        np.testing.assert_array_equal(np.asarray(fast.k_swa), np.asarray(slow.k_swa))
        np.testing.assert_array_equal(np.asarray(fast.v_swa), np.asarray(slow.v_swa))
        want[p % 4] = p + 1
        np.testing.assert_array_equal(ring(fast, 1)[0], want)
        assert np.all(np.asarray(fast.k_swa[0]) == 9)                  # the other ring
        cache = fast


def test_context_slots_literal():
    slots, n = context_slots(jnp.array([0, 2, 6]), 3, 4)
    np.testing.assert_array_equal(np.asarray(n), [0, 2, 4])
    np.testing.assert_array_equal(np.asarray(slots), [[4, 5, 6, 6, 6, 6, 6],
                                                      [0, 1, 4, 5, 6, 6, 6],
                                                      [2, 3, 0, 1, 4, 5, 6]])


# ---- one attention call against a full cache ------------------------------------------------

@pytest.mark.parametrize("mode", ["ref", "interpret"])
def test_cache_attention_on_ring_equals_full_cache(monkeypatch, mode):
    """Feed random keys through a ring of 8 (chunks of 3, 5 and 11 > W, decode steps, rows at
    different positions) and compare every output with plain windowed attention (sinks too)
    over a cache holding all positions. ``interpret`` runs the Pallas kernels (flash attention
    on the ring context, flash-decoding on the ring) on CPU."""
    monkeypatch.setenv("GPTJAX_KERNELS", mode)
    rng = np.random.default_rng(1)
    B, N, K, H = 2, 6, 2, 16
    # (T, real tokens per row): row 0 has none in the first call, so row 1 runs 3 ahead
    calls = ((3, (0, 3)), (5, None), (11, None), (1, None), (1, None), (9, None), (1, None))
    total = sum(T for T, _ in calls)
    kv_all = rng.standard_normal((2, B, K, total, H)).astype(np.float32)  # k, v at every position
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    cache = init_cache(SimpleNamespace(n_layers=1, n_kv_heads=K, head_dim=H, sliding_window=W,
                                       sliding_window_pattern=(True,)), B, total)
    assert cache.k_swa.shape == (1, B, K, W, H) and cache.k.shape == (0, B, K, total, H)
    step = jax.jit(lambda q, k, v, c, pos, n: cache_attention(   # traced with this test's mode
        q, k, v, c, 0, pos, lengths=n, window=W, sinks=sinks, scale=0.3))
    start = np.zeros(2, np.int64)
    for T, n in calls:
        pos = start[:, None] + np.arange(T)[None, :]                      # [B, T]
        new = [np.stack([a[b][:, np.minimum(p, total - 1)].transpose(1, 0, 2)
                         for b, p in enumerate(pos)]) for a in kv_all]    # [B, T, K, H] each
        q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
        pos = jnp.asarray(pos, jnp.int32)
        got, cache = step(q, jnp.asarray(new[0]), jnp.asarray(new[1]), cache, pos,
                          None if n is None else jnp.asarray(n, jnp.int32))
        want = attention(q, jnp.asarray(kv_all[0]), jnp.asarray(kv_all[1]), pos, window=W,
                         sinks=sinks, scale=0.3)
        rows = [b for b in range(B) if n is None or n[b] == T]
        assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < OP_TOL, (T, start)
        start = start + (T if n is None else np.asarray(n))
    assert start.tolist() == [total - 3, total]


# ---- the tiny gpt-oss against transformers --------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt_oss(seed=3, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model(tiny, tmp_path_factory):
    import json

    from gptjax.weights import load_params_hf

    path = save_hf_dir(tiny.model, tmp_path_factory.mktemp("oss") / "hf")
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()),
                                 source=str(path / "config.json"))
    assert config.sliding_window == W and config.context_length == 512
    return config, load_params_hf(path, config, jnp.float32)


@pytest.fixture(scope="module")
def toks():
    return np.random.default_rng(0).integers(0, 103, (2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def ref(tiny, toks):
    return torch_logits(tiny.model, toks)                               # [2, SEQ, V]


def run(model, tokens, start, cache, lengths=None):
    config, params = model
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    logits, cache = forward(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(start, jnp.int32),
                            cache, config, lengths=lengths)
    return np.asarray(logits), cache


def test_cache_layout_of_the_model(model):
    config, _ = model
    cache = init_cache(config, 2, S)
    assert cache.sliding == (True, False, True, False)
    assert cache.k.shape == (2, 2, 2, S, 24)                             # [Lf, B, K, S, H]
    assert cache.k_swa.shape == (2, 2, 2, W, 24)                         # [Ls, B, K, W, H]
    assert cache_nbytes(init_cache, config, 2, S, jnp.float32) == config.kv_cache_bytes(
        S, 2, "float32")


def test_full_forward(model, ref, toks):
    got, cache = run(model, toks, [0, 0], init_cache(model[0], 2, S))
    assert cache.k_swa.shape[3] == W
    assert rel_err(got, ref) < F32_TOL


def test_prefill_then_decode_across_wraps(model, ref, toks):
    """Prefill 3 tokens, then 37 decode steps: the ring wraps 4 more times."""
    logits, cache = run(model, toks[:, :3], [0, 0], init_cache(model[0], 2, S))
    out = [logits]
    for p in range(3, SEQ):
        logits, cache = run(model, toks[:, p:p + 1], [p, p], cache)
        out.append(logits)
    assert rel_err(np.concatenate(out, axis=1), ref) < F32_TOL


@pytest.mark.parametrize("chunk", [5, 11])
def test_chunked_prefill(model, ref, toks, chunk):
    """Chunks of ``chunk`` tokens; row 1 starts with only 3 real tokens (the rest of its first
    chunk is padding, left out through ``lengths``), so the rows then sit at different
    positions and row 1 needs one call more, in which row 0 has no real token."""
    cache = init_cache(model[0], 2, S)
    start, got = np.zeros(2, np.int32), [[], []]
    first = True
    while (start < SEQ).any():
        n = np.minimum(chunk, SEQ - start)
        if first:
            n[1], first = 3, False
        tok = np.zeros((2, chunk), np.int32)
        for b in range(2):
            tok[b, :n[b]] = toks[b, start[b]:start[b] + n[b]]
        logits, cache = run(model, tok, start, cache, lengths=n)
        for b in range(2):
            got[b].append(logits[b, :n[b]])
        start = start + n
    for b in range(2):
        assert rel_err(np.concatenate(got[b]), ref[b]) < F32_TOL, b


def test_right_padded_batch_then_decode(model, tiny):
    """Prompts of 5 and 300 tokens in one prefill of T = 300 (W = 8): the short row's 295
    padding tokens would wrap its ring 37 times; with ``lengths`` they are not written, so its
    ring holds exactly its 5 real tokens (slots 5..7 still zero), and decoding 12 more tokens
    per row (rows at positions 5.. and 300..) matches transformers on each row's sequence."""
    config, _ = model
    rng = np.random.default_rng(4)
    n_dec, lens = 12, np.array([5, 300])
    seqs = [rng.integers(0, 103, n + n_dec).astype(np.int32) for n in lens]
    tokens = np.zeros((2, 300), np.int32)
    for b, n in enumerate(lens):
        tokens[b, :n] = seqs[b][:n]
    logits, cache = run(model, tokens, [0, 0], init_cache(config, 2, 320), lengths=lens)
    assert not np.any(np.asarray(cache.k_swa[:, 0, :, 5:]))             # short row: no padding
    assert np.all(np.any(np.asarray(cache.k_swa[:, 0, :, :5]) != 0, axis=-1))
    got = [[logits[0, :5]], [logits[1, :300]]]
    for i in range(n_dec):
        step = np.array([[seqs[0][5 + i]], [seqs[1][300 + i]]], np.int32)
        logits, cache = run(model, step, lens + i, cache)
        for b in range(2):
            got[b].append(logits[b])
    for b in range(2):
        want = torch_logits(tiny.model, seqs[b][None])[0]
        assert rel_err(np.concatenate(got[b]), want) < F32_TOL, b


def test_llama_with_every_layer_sliding():
    """A windowed llama (Mistral-style: every layer slides, W = 4): the cache has no full
    layers, only rings, and prefill + decode across wraps equal one forward over a full-stack
    cache masked to the window (the layout without rings, independent of the ring code)."""
    import dataclasses
    import json

    from gptjax.models import llama
    from gptjax.weights import load_params_hf
    from tiny_models import tiny_llama

    path = save_hf_dir(tiny_llama(seed=1), Path(tempfile.mkdtemp()) / "hf")
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    params = load_params_hf(path, config, jnp.float32)
    config = dataclasses.replace(config, sliding_window=4, sliding_window_pattern=())
    assert config.sliding_window_pattern == (True,) * config.n_layers
    fwd = jax.jit(llama.forward, static_argnames=("config",))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 20)), jnp.int32)
    cache = init_cache(config, 2, 24)
    assert cache.k.shape[0] == 0 and cache.k_swa.shape[:4] == (config.n_layers, 2, 2, 4)
    logits, cache = fwd(params, toks[:, :7], jnp.zeros(2, jnp.int32), cache, config=config)
    got = [logits]
    for p in range(7, 20):
        logits, cache = fwd(params, toks[:, p:p + 1], jnp.full(2, p, jnp.int32), cache,
                            config=config)
        got.append(logits)
    shape = (config.n_layers, 2, config.n_kv_heads, 24, config.head_dim)
    full = KVCache(k=jnp.zeros(shape), v=jnp.zeros(shape))               # no rings: masked
    want, _ = fwd(params, toks, jnp.zeros(2, jnp.int32), full, config=config)
    assert rel_err(np.concatenate(got, axis=1), want) < F32_TOL


# ---- sizes and the memory check ------------------------------------------------------------

def test_gpt_oss_20b_cache_bytes_at_full_context():
    """The real gpt-oss-20b layout at S = 131072 (abstractly): 12 full layers of S slots and 12
    rings of 128, exactly config.kv_cache_bytes, 50.05 % of keeping S slots in all 24 layers."""
    from transformers import GptOssConfig

    config = ModelConfig.from_hf(GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict())
    Sx = config.context_length
    assert (Sx, config.sliding_window) == (131072, 128)
    shapes = jax.eval_shape(lambda: init_cache(config, 1, Sx, jnp.bfloat16))
    assert shapes.k.shape == (12, 1, 8, Sx, 64) and shapes.k_swa.shape == (12, 1, 8, 128, 64)
    assert shapes.k.dtype == shapes.k_swa.dtype == jnp.bfloat16
    got = cache_nbytes(init_cache, config, 1, Sx, jnp.bfloat16)
    assert got == config.kv_cache_bytes(Sx, 1, "bfloat16")
    everywhere = 24 * 2 * Sx * 8 * 64 * 2
    assert got == 12 * 2 * (Sx + 128) * 8 * 64 * 2 and abs(got / everywhere - 0.5005) < 1e-4


def test_generate_refuses_what_memory_cannot_hold(model):
    """A fake free-memory probe: one byte less than the cache + last-position logits of the
    request is refused before anything runs, with both numbers in the message; exactly enough
    runs; an unknown amount (None, the CPU case) skips the check."""
    from gptjax.generate import Generator

    config, params = model
    kv = config.kv_cache_bytes(128, 1, "float32")            # prompt 16 + 100 new → S = 128
    need = kv + 4 * config.vocab_size                        # + last-position logits
    free, asked = [need - 1], []
    g = Generator(gpt_oss.forward, params, config, eos_ids=[], unembed_fn=gpt_oss.unembed,
                  memory_probe=lambda: asked.append(free[0]) or free[0])
    with pytest.raises(GenerationError) as e:
        g.generate([[1, 2, 3]], max_new_tokens=100)
    msg = str(e.value)
    assert f"needs at least {need / 2**30:.2f} GiB ({need:,} bytes)" in msg
    assert f"({need - 1:,} bytes) free" in msg
    assert "128 positions" in msg and "float32" in msg
    assert asked == [need - 1] and g.trace_counts == {"prefill": 0, "decode": 0}
    for free[0] in (need, None):                             # 2 new tokens: S = 128 still
        out = g.generate([[1, 2, 3]], max_new_tokens=2)
        assert len(out.completions[0].token_ids) == 2 and out.stats.cache_length == 128
    assert asked == [need - 1, need, None]
