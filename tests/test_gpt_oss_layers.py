"""gpt-oss building blocks, each against an independent reference.

* attention with sinks: a float64 numpy transcription of MODEL_FORMATS.md §1.3
  (``p_j = exp(s_j) / (exp(sink_n) + sum_i exp(s_i))``, head n uses kv head n // G);
* sliding-window mask: literal expected arrays;
* YaRN frequencies and concentration: transformers' ``_compute_yarn_parameters`` and
  ``GptOssRotaryEmbedding``, plus the ramp bounds low = 8.0928 / high = 17.3980 documented for
  the real config (and llama.cpp's truncated 8 / 18), recovered from our frequencies;
* router: torch ``topk`` + ``softmax`` and transformers' ``GptOssTopKRouter``;
* clamped SwiGLU and whole expert FFNs: transformers' ``GptOssExperts`` (eager), with dense and
  packed MXFP4 weights, on both the gather (decode) and the sorted (prefill) path.

Errors are relative: max |x - ref| / max |ref| for single ops, Frobenius for blocks.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gptjax.config import ModelConfig
from gptjax.models import moe as moe_mod
from gptjax.models.layers import (apply_rope, attention, attention_mask, rope_cos_sin,
                                  rope_frequencies)
from gptjax.packed import PackedWeight
from tiny_models import (GPT_OSS_TINY, GPT_OSS_TINY_ROPE, mxfp4_ggml_bytes, mxfp4_quantize,
                         mxfp4_value)

OP_TOL = 1e-6       # one float32 op against float64 / torch float32
BLOCK_TOL = 1e-5    # a chain of float32 matmuls (expert FFN) against torch float32
TRIG_TOL = 4e-6     # cos / sin of float32 angles up to ~64 rad: XLA and torch differ by a few ulp


def max_rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def hf_config(**overrides):
    from transformers import GptOssConfig

    dims = {**GPT_OSS_TINY, **overrides}
    cfg = GptOssConfig(**dims, rope_parameters=dict(GPT_OSS_TINY_ROPE),
                       attn_implementation="eager")
    cfg._experts_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def tiny_config():
    return ModelConfig.from_hf(hf_config().to_dict(), source="tiny gpt-oss config.json")


# ---- attention sinks ----------------------------------------------------------------------------

def sink_attention_f64(q, k, v, q_pos, sinks, scale, window):
    """Literal float64 transcription: q [B,T,N,H], k/v [B,K,S,H] (slot j = position j)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            p = q_pos[b, t]
            vis = [j for j in range(S) if j <= p and (window is None or j > p - window)]
            for n in range(N):
                kv = n // (N // K)
                s = np.array([scale * q[b, t, n] @ k[b, kv, j] for j in vis])
                m = max(s.max(), sinks[n])
                e = np.exp(s - m)
                probs = e / (np.exp(sinks[n] - m) + e.sum())
                out[b, t, n] = probs @ v[b, kv, vis]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_attention_sinks_match_float64_formula(window):
    rng = np.random.default_rng(1)
    B, T, N, K, H, S = 2, 3, 6, 2, 8, 7
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    q_pos = np.array([[2, 3, 4], [4, 5, 6]], np.int32)
    # one sink per QUERY head: a dominant one, a negligible one, ordinary ones
    sinks = np.array([5.0, -30.0, 0.3, -0.7, 1.1, 0.0], np.float32)
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos),
                    window=window, sinks=jnp.asarray(sinks), scale=H ** -0.5)
    ref = sink_attention_f64(q, k, v, q_pos, sinks.astype(np.float64), H ** -0.5, window)
    assert max_rel(got, ref) < OP_TOL
    # the sinks matter: without them the result is far off
    plain = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos),
                      window=window, scale=H ** -0.5)
    assert max_rel(plain, ref) > 1e-2


# ---- sliding window -----------------------------------------------------------------------------

def test_window_mask_literal():
    q_pos = jnp.array([[0, 3, 5]], jnp.int32)
    got = np.asarray(attention_mask(q_pos, jnp.arange(7, dtype=jnp.int32), window=3))[0]
    expected = np.array([[1, 0, 0, 0, 0, 0, 0],      # p=0: itself only
                         [0, 1, 1, 1, 0, 0, 0],      # p=3: 1, 2, 3 (window counts the query)
                         [0, 0, 0, 1, 1, 1, 0]],     # p=5: 3, 4, 5
                        bool)
    np.testing.assert_array_equal(got, expected)
    full = np.asarray(attention_mask(q_pos, jnp.arange(7, dtype=jnp.int32)))[0]
    np.testing.assert_array_equal(full, np.tril(np.ones((7, 7), bool))[[0, 3, 5]])


def test_even_layers_slide(tiny_config):
    # HF layer_types default and llama.cpp's period-2 rule: even layers sliding, odd full.
    assert tiny_config.sliding_window_pattern == (True, False, True, False)
    assert [tiny_config.layer_is_sliding(i) for i in range(4)] == [True, False, True, False]


# ---- YaRN ---------------------------------------------------------------------------------------

def hf_yarn(hf_cfg):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    return inv.numpy(), factor


def ramp_bounds(config, inv_freq):
    """(low, high) of the YaRN ramp recovered from inv_freq: ramp_i = (extrap_i - inv_i) /
    (extrap_i - interp_i) is (i - low) / (high - low) between the bounds."""
    R, th, f = config.rope_dim, config.rope_theta, config.rope_scaling.factor
    i = np.arange(R // 2)
    extrap = th ** (-2.0 * i / R)
    ramp = (extrap - np.asarray(inv_freq, np.float64)) / (extrap - extrap / f)
    inner = np.nonzero((ramp > 1e-3) & (ramp < 1 - 1e-3))[0]
    a, b = inner[0], inner[-1]
    slope = (ramp[b] - ramp[a]) / (b - a)
    low = a - ramp[a] / slope
    return low, low + 1 / slope, ramp


def test_yarn_tiny_matches_transformers(tiny_config):
    inv, mscale = rope_frequencies(tiny_config)
    ref_inv, ref_factor = hf_yarn(hf_config())
    assert max_rel(inv, ref_inv) < OP_TOL
    assert mscale == pytest.approx(ref_factor, rel=1e-12)
    assert mscale == pytest.approx(0.1 * math.log(4.0) + 1, rel=1e-12)


def test_yarn_real_config_bounds_and_concentration():
    from transformers import GptOssConfig

    hf = GptOssConfig()                                  # gpt-oss defaults: theta 150000, x32
    config = ModelConfig.from_hf(hf.to_dict(), source="gpt-oss default config")
    inv, mscale = rope_frequencies(config)
    ref_inv, ref_factor = hf_yarn(hf)
    assert max_rel(inv, ref_inv) < OP_TOL
    low, high, ramp = ramp_bounds(config, inv)
    assert low == pytest.approx(8.0928, abs=1e-3) and high == pytest.approx(17.3980, abs=1e-3)
    assert np.all(ramp[:9] < 1e-6) and np.all(ramp[18:] > 1 - 1e-6)
    # concentration 0.1 ln 32 + 1 = 1.346574 (MODEL_FORMATS.md §1.4)
    assert mscale == pytest.approx(1.346574, abs=1e-6) and mscale == pytest.approx(ref_factor)
    # llama.cpp rounds the bounds outward (ggml_rope_yarn_corr_dims: floor / ceil)
    trunc = dataclasses.replace(config, rope_scaling=dataclasses.replace(
        config.rope_scaling, truncate=True))
    t_low, t_high, _ = ramp_bounds(trunc, rope_frequencies(trunc)[0])
    assert t_low == pytest.approx(8, abs=1e-3) and t_high == pytest.approx(18, abs=1e-3)


def test_rope_cos_sin_and_neox_rotation_match_transformers(tiny_config):
    from transformers.models.gpt_oss.modeling_gpt_oss import (GptOssRotaryEmbedding,
                                                              apply_rotary_pos_emb)

    B, T, N, K, H = 2, 5, 6, 2, 24
    pos = np.array([[0, 1, 2, 3, 4], [40, 41, 50, 60, 63]], np.int32)
    inv, mscale = rope_frequencies(tiny_config)
    cos, sin = rope_cos_sin(jnp.asarray(pos), inv, mscale)               # [B, T, H/2]
    rot = GptOssRotaryEmbedding(hf_config())
    rng = np.random.default_rng(2)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    with torch.no_grad():
        hc, hs = rot(torch.zeros(1, dtype=torch.float32), torch.as_tensor(pos, dtype=torch.long))
        hq, hk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2),
                                      torch.from_numpy(k).transpose(1, 2), hc, hs)
    assert max_rel(cos, hc.numpy()) < TRIG_TOL and max_rel(sin, hs.numpy()) < TRIG_TOL
    assert max_rel(apply_rope(jnp.asarray(q), cos, sin, tiny_config.rope_type),
                   hq.transpose(1, 2).numpy()) < TRIG_TOL
    assert max_rel(apply_rope(jnp.asarray(k), cos, sin, tiny_config.rope_type),
                   hk.transpose(1, 2).numpy()) < TRIG_TOL


# ---- router -------------------------------------------------------------------------------------

def test_router_matches_torch_topk_softmax():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    rng = np.random.default_rng(3)
    M, D, E, U = 11, 96, 5, 2
    x = rng.normal(size=(M, D)).astype(np.float32)
    w = rng.normal(size=(E, D)).astype(np.float32) * 0.2
    b = rng.normal(size=(E,)).astype(np.float32)
    weights, ids = moe_mod.route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), U)
    logits = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w),
                                        torch.from_numpy(b))
    top, ref_ids = torch.topk(logits, U, dim=-1)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids.numpy())
    assert max_rel(weights, torch.softmax(top, dim=-1).numpy()) < OP_TOL
    router = GptOssTopKRouter(hf_config())
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        router.bias.copy_(torch.from_numpy(b))
        _, scores, idx = router(torch.from_numpy(x))
    np.testing.assert_array_equal(np.asarray(ids), idx.numpy())
    assert max_rel(weights, scores.numpy()) < OP_TOL


# ---- clamped SwiGLU and the experts -------------------------------------------------------------

def hf_experts(gate_up, gate_up_bias, down, down_bias):
    """transformers GptOssExperts (eager) holding [E, 2F, D] interleaved gate_up rows and
    [E, D, F] down rows (our / OpenAI [out, in] layout; HF stores them transposed)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    ex = GptOssExperts(hf_config())
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.from_numpy(gate_up.transpose(0, 2, 1).copy()))
        ex.gate_up_proj_bias.copy_(torch.from_numpy(gate_up_bias))
        ex.down_proj.copy_(torch.from_numpy(down.transpose(0, 2, 1).copy()))
        ex.down_proj_bias.copy_(torch.from_numpy(down_bias))
    return ex


def test_swiglu_oai_matches_transformers():
    rng = np.random.default_rng(4)
    gate_up = (rng.normal(size=(9, 2 * 40)) * 6).astype(np.float32)     # beyond +-7 often
    ex = hf_experts(np.zeros((5, 128, 96), np.float32), np.zeros((5, 128), np.float32),
                    np.zeros((5, 96, 64), np.float32), np.zeros((5, 96), np.float32))
    with torch.no_grad():
        ref = ex._apply_gate(torch.from_numpy(gate_up)).numpy()
    got = moe_mod.swiglu_oai(jnp.asarray(gate_up[:, 0::2]), jnp.asarray(gate_up[:, 1::2]),
                             alpha=1.702, limit=7.0)
    assert max_rel(got, ref) < OP_TOL
    # the clamps are exercised: gate above 7, up on both sides
    assert (gate_up[:, 0::2] > 7).any() and (gate_up[:, 1::2] < -7).any()
    assert (gate_up[:, 1::2] > 7).any() and (gate_up[:, 0::2] < -7).any()


@pytest.fixture(scope="module")
def expert_case():
    """MXFP4-exact random experts (E 5, F 64, D 96) with biases, 13 tokens routed top-2."""
    rng = np.random.default_rng(5)
    E, F, D, M, U = 5, 64, 96, 13, 2
    gu_q = mxfp4_quantize(rng.normal(0, 0.4, (E, 2 * F, D)))            # rows interleaved g/u
    dn_q = mxfp4_quantize(rng.normal(0, 0.4, (E, D, F)))
    gate_up, down = mxfp4_value(*gu_q), mxfp4_value(*dn_q)
    gu_b = rng.normal(0, 0.5, (E, 2 * F)).astype(np.float32)
    dn_b = rng.normal(0, 0.5, (E, D)).astype(np.float32)
    x = rng.normal(0, 1.0, (M, D)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:U] for _ in range(M)]).astype(np.int32)
    ids[:9, 0] = 3                                           # one expert gets > 8 rows: 2 chunks
    ids[:9, 1] = np.where(ids[:9, 1] == 3, 1, ids[:9, 1])
    weights = rng.dirichlet(np.ones(U), M).astype(np.float32)
    ex = hf_experts(gate_up, gu_b, down, dn_b)
    with torch.no_grad():
        ref = ex(torch.from_numpy(x), torch.from_numpy(ids).long(),
                 torch.from_numpy(weights)).numpy()

    dense = {
        "ffn_gate_exps": {"weight": gate_up[:, 0::2], "bias": gu_b[:, 0::2]},
        "ffn_up_exps": {"weight": gate_up[:, 1::2], "bias": gu_b[:, 1::2]},
        "ffn_down_exps": {"weight": down, "bias": dn_b},
    }
    pk = {
        "ffn_gate_exps": {"weight": PackedWeight.from_bytes(
            mxfp4_ggml_bytes(gu_q[0][:, 0::2], gu_q[1][:, 0::2]), Q.MXFP4, (E, F, D)),
            "bias": gu_b[:, 0::2]},
        "ffn_up_exps": {"weight": PackedWeight.from_bytes(
            mxfp4_ggml_bytes(gu_q[0][:, 1::2], gu_q[1][:, 1::2]), Q.MXFP4, (E, F, D)),
            "bias": gu_b[:, 1::2]},
        "ffn_down_exps": {"weight": PackedWeight.from_bytes(
            mxfp4_ggml_bytes(*dn_q), Q.MXFP4, (E, D, F)), "bias": dn_b},
    }
    to_jnp = lambda t: jax.tree.map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a,
                                    t, is_leaf=lambda a: isinstance(a, PackedWeight))
    return dict(x=x, ids=ids, weights=weights, ref=ref, dense=to_jnp(dense), packed=to_jnp(pk),
                E=E, F=F, D=D)


@pytest.mark.parametrize("path", ["gather", "sorted"])
@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_experts_match_transformers(expert_case, tiny_config, path, kind):
    c = expert_case
    fn = moe_mod.experts_gather if path == "gather" else moe_mod.experts_sorted
    got = jax.jit(fn, static_argnums=4)(jnp.asarray(c["x"]), jnp.asarray(c["ids"]),
                                        jnp.asarray(c["weights"]), c[kind], tiny_config)
    err = np.linalg.norm(np.asarray(got) - c["ref"]) / np.linalg.norm(c["ref"])
    assert err < BLOCK_TOL, err


@pytest.mark.parametrize("rows", [8, 13])
def test_kernel_experts_match_transformers(expert_case, tiny_config, monkeypatch, rows):
    """The Pallas MoE path in interpret mode (packed MXFP4 experts): 8 tokens x top-2 = 16
    routed rows take the "pairs" kernel, 13 tokens (26 rows) the grouped kernel."""
    c = expert_case
    monkeypatch.setenv("GPTJAX_KERNELS", "interpret")
    got = moe_mod.experts_gather(jnp.asarray(c["x"][:rows]), jnp.asarray(c["ids"][:rows]),
                                 jnp.asarray(c["weights"][:rows]), c["packed"], tiny_config)
    ref = c["ref"][:rows]
    err = np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref)
    assert err < BLOCK_TOL, err


def test_sorted_path_any_chunk(expert_case, tiny_config):
    """Chunks of 1 and 3 rows (many inner steps, ragged last chunks) give the same result."""
    c = expert_case
    for chunk in (1, 3):
        got = moe_mod.experts_sorted(jnp.asarray(c["x"]), jnp.asarray(c["ids"]),
                                     jnp.asarray(c["weights"]), c["dense"], tiny_config,
                                     chunk=chunk)
        err = np.linalg.norm(np.asarray(got) - c["ref"]) / np.linalg.norm(c["ref"])
        assert err < BLOCK_TOL, (chunk, err)


def _float_shapes(jaxpr):
    """Shapes of every float value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars
                if hasattr(v.aval, "dtype") and jnp.issubdtype(v.aval.dtype, jnp.floating)]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    out += _float_shapes(inner)
                elif hasattr(sub, "eqns"):
                    out += _float_shapes(sub)
    return out


@pytest.mark.parametrize("path", ["gather", "sorted"])
def test_packed_experts_never_all_dequantized(expert_case, tiny_config, path):
    """No float [E, F, D] / [E, D, F] array exists: only the routed experts are decoded."""
    c = expert_case
    fn = moe_mod.experts_gather if path == "gather" else moe_mod.experts_sorted
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a, tiny_config))(
        jnp.asarray(c["x"][:2]), jnp.asarray(c["ids"][:2]), jnp.asarray(c["weights"][:2]),
        c["packed"])
    E, F, D = c["E"], c["F"], c["D"]
    shapes = _float_shapes(jaxpr.jaxpr)
    assert shapes, "no float values found: the jaxpr walk is broken"
    assert not [s for s in shapes if s[:1] == (E,) and s[-2:] in ((F, D), (D, F))]
    # and decoding did happen on the selected experts' rows
    expect = (2, 2, F, D) if path == "gather" else (F, D)
    assert expect in shapes
