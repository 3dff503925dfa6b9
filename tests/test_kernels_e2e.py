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
    # float32 on a GPU: XLA's default matmul precision is not float32 (TF32 / bf16 passes), so
    # the reference path would be the inexact one; ask for full precision on both paths.
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
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
    """Whatever path cache_attention takes on this backend, it equals layers.attention (full
    stack; the ring stack of sliding layers: tests/test_ring_cache.py)."""
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
        # the new keys/values are those the cache already holds at pos: the write changes nothing
        rows = jnp.arange(B)[:, None]
        k_new, v_new = k[1][rows, :, pos], v[1][rows, :, pos]              # [B, t, K, H]
        for window in (None, 8):
            sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
            got, new = cache_attention(q, k_new, v_new, cache, 1, pos, window=window, sinks=sinks,
                                       scale=0.25)
            ref = attention(q, k[1], v[1], pos, window=window, sinks=sinks, scale=0.25)
            assert rel_err(got, ref) < F32_RTOL
            np.testing.assert_array_equal(np.asarray(new.k), np.asarray(k))


def test_cache_attention_reads_split_k_partials(monkeypatch):
    """The fused decode path of cache_attention (interpret mode) given the q/k/v projection as a
    packed.SplitK: the same output and cache, bit for bit (bf16 projection), as given the array
    ``SplitK.value()`` -- and split_linear hands out the SplitK only with GPTJAX_QKV_PARTIALS=1."""
    from gptjax.cache import KVCache
    from gptjax.fusion import split_linear
    from gptjax.models.layers import cache_attention, rope_cos_sin
    from gptjax.packed import PackedWeight, SplitK
    from test_quant_linear import random_bytes
    from gguf import GGMLQuantizationType as T

    monkeypatch.setenv("GPTJAX_KERNELS", "interpret")
    rng = np.random.default_rng(5)
    L, B, K, S, H, N = 2, 4, 2, 16, 16, 4
    W = (N + 2 * K) * H
    D = 1024                                        # 8 K steps: the Q8_0 dot splits K
    cache = KVCache(k=jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.bfloat16),
                    v=jnp.asarray(rng.standard_normal((L, B, K, S, H)), jnp.bfloat16))
    p = {"attn_qkv": {"weight": PackedWeight.from_bytes(random_bytes(rng, T.Q8_0, (W, D)), T.Q8_0,
                                                        (W, D)).to_kernel_layout(),
                      "bias": jnp.asarray(rng.standard_normal(W), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((B, 1, D)), jnp.bfloat16)
    names, sizes = ("attn_q", "attn_k", "attn_v"), (N * H, K * H, K * H)
    pos = jnp.asarray([[3], [7], [0], [12]], jnp.int32)
    cos, sin = rope_cos_sin(pos, 1.0 / 10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("GPTJAX_QKV_PARTIALS", flag)
        (q, k, v), qkv = split_linear(p, names, x, sizes, dtype=jnp.bfloat16, with_fused=True)
        assert isinstance(qkv, SplitK) == (flag == "1")
        q, k, v = q.reshape(B, 1, N, H), k.reshape(B, 1, K, H), v.reshape(B, 1, K, H)
        outs[flag] = cache_attention(q, k, v, cache, 1, pos, scale=H ** -0.5,
                                     rope=(cos, sin, "neox"), qkv=qkv)
    (a0, c0), (a1, c1) = outs["0"], outs["1"]
    np.testing.assert_array_equal(np.asarray(a1, np.float32), np.asarray(a0, np.float32))
    np.testing.assert_array_equal(np.asarray(c1.k, np.float32), np.asarray(c0.k, np.float32))
    np.testing.assert_array_equal(np.asarray(c1.v, np.float32), np.asarray(c0.v, np.float32))


def test_kernel_wiring_in_interpret_mode(tmp_path, monkeypatch):
    """The model-level wiring of every kernel (flash attention at prefill, flash-decoding, the MXFP4
    MoE "pairs" matmul, the Q8_0 matmul) runs on CPU in Pallas interpret mode and gives the
    reference path's logits: a tiny gpt-oss with packed MXFP4 experts and packed Q8_0 attention."""
    from gptjax.cache import init_cache
    from gptjax.config import ModelConfig
    from gptjax.formats.gguf import read_gguf
    from gptjax.models import gpt_oss
    from gptjax.packed import PackedWeight
    from gptjax.weights import load_params_gguf
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf

    gf = read_gguf(write_gpt_oss_gguf(tiny_gpt_oss(seed=2), tmp_path / "oss.gguf"))
    config = ModelConfig.from_gguf(gf)
    params = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=False, fuse=False)
    assert isinstance(params["blocks"][0]["attn_q"]["weight"], PackedWeight)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, config.vocab_size, (2, 12)), jnp.int32)

    assert params["blocks"][0]["attn_q"]["weight"].layout == "ggml"          # kernels off: file bytes
    monkeypatch.setenv("GPTJAX_KERNELS", "interpret")
    params_k = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=False)
    for name in ("attn_qkv", "ffn_gate_up_exps", "ffn_down_exps"):           # fused, repacked
        assert params_k["blocks"][1][name]["weight"].layout == "kernel", name

    def logits(mode, p):
        monkeypatch.setenv("GPTJAX_KERNELS", mode)
        fwd = jax.jit(lambda p, t, s, c: gpt_oss.forward(p, t, s, c, config))   # fresh trace per mode
        cache = init_cache(config, 2, 32, jnp.float32)
        pre, cache = fwd(p, toks[:, :11], jnp.zeros(2, jnp.int32), cache)        # prefill path
        dec, cache = fwd(p, toks[:, 11:], jnp.full(2, 11, jnp.int32), cache)     # decode path
        return np.asarray(pre), np.asarray(dec), cache

    ref_pre, ref_dec, ref_cache = logits("ref", params)
    for p in (params, params_k):            # file layout unfused, kernel layout fused: kernels
        ker_pre, ker_dec, ker_cache = logits("interpret", p)
        assert rel_err(ker_pre, ref_pre) < F32_RTOL
        assert rel_err(ker_dec, ref_dec) < F32_RTOL
        # the decode kernel wrote the new token's key (after RoPE) and value into both stacks
        for name in ("k", "v", "k_swa", "v_swa"):
            assert rel_err(getattr(ker_cache, name), getattr(ref_cache, name)) < F32_RTOL, name
    # the reference path also accepts the kernel layout (decodes it back to ggml blocks)
    np.testing.assert_allclose(logits("ref", params_k)[1], ref_dec, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_oss"])
def test_fused_decode_gemv_wiring_in_interpret_mode(tmp_path, monkeypatch, arch):
    """Every projection of a decode step goes through the fused GEMV kernel (norm prologue,
    bias / GELU / residual epilogue: ``layers.norm_linear``) when the dims are multiples of 32,
    and gpt-oss's MoE through the two decode MoE kernels (pallas_kernels/moe_decode.py);
    run in Pallas interpret mode on CPU, the decode logits equal the reference path's (float32,
    so no rounding differs; batch 2 and batch 1 rows)."""
    from gptjax.cache import init_cache
    from gptjax.config import ModelConfig
    from gptjax.formats.gguf import read_gguf
    from gptjax.models import gpt2, gpt_oss, llama
    from gptjax.weights import load_params_gguf
    from pallas_kernels import fused_gemv as fg
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf

    if arch == "gpt2":
        path = write_gpt2_gguf(tiny_gpt2(n_embd=64, n_head=4, n_inner=96), tmp_path / "m.gguf")
        fwd_fn = gpt2.forward
    elif arch == "llama":
        path = write_llama_gguf(tiny_llama(hidden_size=64, num_attention_heads=4, head_dim=16,
                                           intermediate_size=96), tmp_path / "m.gguf")
        fwd_fn = llama.forward
    else:
        path = write_gpt_oss_gguf(tiny_gpt_oss(seed=3, head_dim=16), tmp_path / "m.gguf")
        fwd_fn = gpt_oss.forward
    gf = read_gguf(path)
    config = ModelConfig.from_gguf(gf)
    params = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=False)
    from pallas_kernels import moe_decode as md

    calls, moe_calls = [], []
    real = fg.fused_gemv
    monkeypatch.setattr(fg, "fused_gemv", lambda *a, **k: calls.append(k) or real(*a, **k))
    for name in ("moe_gate_up_swiglu", "moe_down_combine"):       # gpt-oss: the MoE kernels
        fn = getattr(md, name)
        monkeypatch.setattr(md, name, lambda *a, fn=fn, **k: moe_calls.append(k) or fn(*a, **k))
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)

    def decode(mode, rows):
        monkeypatch.setenv("GPTJAX_KERNELS", mode)
        fwd = jax.jit(lambda p, t, s, c: fwd_fn(p, t, s, c, config))
        cache = init_cache(config, rows, 16, jnp.float32)
        monkeypatch.setenv("GPTJAX_KERNELS", "ref")                  # same prefill both ways
        _, cache = jax.jit(lambda p, t, s, c: fwd_fn(p, t, s, c, config))(
            params, toks[:rows, :8], jnp.zeros(rows, jnp.int32), cache)
        monkeypatch.setenv("GPTJAX_KERNELS", mode)
        out, _ = fwd(params, toks[:rows, 8:], jnp.full(rows, 8, jnp.int32), cache)
        return np.asarray(out)

    for rows in (2, 1):
        ref = decode("ref", rows)
        n0 = len(calls)
        got = decode("interpret", rows)
        per_layer = {"gpt2": 4, "llama": 4, "gpt_oss": 3}[arch]     # gpt-oss: + the router
        assert len(calls) - n0 == per_layer * config.n_layers
        assert len(moe_calls) == (2 * config.n_layers if arch == "gpt_oss" else 0)
        moe_calls.clear()
        assert rel_err(got, ref) < F32_RTOL


def _lower_decode_chunk(gen, batch, monkeypatch):
    """Prefill ``batch`` copies of a 4-token prompt (kernel mode as the caller set it), then lower
    a 4-step decode chunk of ``gen`` for CUDA with the Pallas kernels on (on any machine)."""
    req = gen._prepare([[1, 2, 3, 4]] * batch, 8, None, 0, (), (), 4, False)
    eos, max_new = jnp.asarray(req.eos), jnp.asarray(req.max_new, jnp.int32)
    st, cache, _ = gen._prefill(gen.params, req.tokens, req.lengths, req.live, jax.random.key(0),
                                req.params, eos, max_new, plan=req.plan, max_len=req.cache_len)
    monkeypatch.setenv("GPTJAX_KERNELS", "pallas")
    jax.clear_caches()
    return gen._decode.trace(gen.params, cache, st, req.params, eos, max_new, np.int32(4),
                             plan=req.plan, chunk=4).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_chunk_has_no_inner_while_loop(tmp_path, monkeypatch, batch):
    """The GPU decode step (kernels on, lowered for CUDA on any machine) holds no while loop of
    its own: a fixed-length chunk lowers to exactly one, the chunk's.  On the GPU every
    iteration of an inner while loop waits on a device-to-host copy of its predicate, which
    also makes the chunk's dispatch synchronous (H100: ``jnp.searchsorted`` in the batch-64
    MoE routing cost 12 host round trips per layer, 9 % of the step, and made the first token
    wait for a whole decode chunk).  Batch 1 takes the decode MoE kernels, batch 64 the grouped
    kernel and its routing."""
    import gptjax
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf

    m = gptjax.load(write_gpt_oss_gguf(tiny_gpt_oss(seed=2), tmp_path / "m.gguf"))
    text = _lower_decode_chunk(m._generator, batch, monkeypatch).as_text()
    assert "tpu_custom_call" not in text and "__gpu$xla.gpu.triton" in text    # kernels taken
    assert text.count("stablehlo.while") == 1


def test_batch_decode_moe_takes_the_one_factor_byte_decode(tmp_path, monkeypatch):
    """The scale_max hint reaches the grouped MoE kernel through the model: loading with the
    kernels on records each MXFP4 expert stack's largest scale byte (the tiny model's are <= 128),
    and the batch-64 bf16 decode step, lowered for CUDA, traces the PTX byte decode with one scale
    factor for gate/up and for down (``mx._byte_pair_bf16_asm``; the GPU identity tests check the
    decode itself).  Guards the plumbing: a model passing ``.data`` instead of the PackedWeight
    silently drops the hint (two multiplies per weight pair, H100 b64 decode ~2 % slower)."""
    import gptjax
    from pallas_kernels import mxfp4_matmul as mx
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf

    monkeypatch.setenv("GPTJAX_KERNELS", "pallas")
    m = gptjax.load(write_gpt_oss_gguf(tiny_gpt_oss(seed=2), tmp_path / "m.gguf"),
                    dtype=jnp.bfloat16)
    gen = m._generator
    for name in ("ffn_gate_up_exps", "ffn_down_exps"):
        w = gen.params["blocks"][0][name]["weight"]
        assert w.layout == "kernel" and w.scale_max == int(np.asarray(w.data.scales).max()) <= 128
    seen = []
    real = mx._byte_pair_bf16_asm
    monkeypatch.setattr(mx, "_byte_pair_bf16_asm", lambda qs, e, one=False: (seen.append(one),
                                                                              real(qs, e, one))[1])
    monkeypatch.setenv("GPTJAX_KERNELS", "ref")                # prefill on the CPU, plain XLA
    _lower_decode_chunk(gen, 64, monkeypatch)
    assert seen and all(seen) and len(seen) % 2 == 0            # gate/up and down, one factor


def test_batch_decode_attention_reads_qkv_partials(tmp_path, monkeypatch):
    """GPTJAX_QKV_PARTIALS=1 reaches the model: the batch-64 decode step of a gpt-oss whose q/k/v
    Q8_0 dot splits K (hidden 512: 4 K steps, 2 splits), lowered for CUDA on any machine, hands
    every attention kernel the float32 partials [2, 64, W] and the bias [W] instead of the
    summed bf16 projection [64, W] (layer-level numbers: test_cache_attention_reads_split_k_
    partials; the kernel: test_attention_kernels)."""
    import gptjax
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf

    monkeypatch.setenv("GPTJAX_KERNELS", "pallas")
    m = gptjax.load(write_gpt_oss_gguf(tiny_gpt_oss(seed=2, hidden_size=512), tmp_path / "m.gguf"),
                    dtype=jnp.bfloat16, dequantize_at_load=False)
    W = (6 + 2 * 2) * 24
    calls = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("GPTJAX_QKV_PARTIALS", flag)
        monkeypatch.setenv("GPTJAX_KERNELS", "ref")            # prefill on the CPU, plain XLA
        text = _lower_decode_chunk(m._generator, 64, monkeypatch).as_text()
        calls[flag] = [ln for ln in text.splitlines() if "call @decode_attention_update_qkv" in ln]
    assert len(calls["0"]) == len(calls["1"]) == 4                      # one call per layer
    assert all(f"(tensor<64x{W}xbf16>," in ln for ln in calls["0"])
    assert all(f"(tensor<2x64x{W}xf32>," in ln and f"tensor<{W}xf32>" in ln for ln in calls["1"])
