"""Llama end to end against transformers, plus RMSNorm / SwiGLU / RoPE, the q/k permutation, the
weight audit and the perplexity function.

Reference: tiny random ``transformers.LlamaForCausalLM`` models (V 101, D 48, N 6, K 2 so G 3,
H 8, F 80, L 3 - every size distinct) run by torch on CPU in float32, loaded here from their HF
directory and from a llama.cpp-layout GGUF of the same weights, whose q/k rows the test helper
permutes as llama.cpp's converter does (tests/tiny_models.py, independent of the loader).
Errors are relative Frobenius norms ||x - ref|| / ||ref||.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from gptjax.cache import init_cache
from gptjax.config import ModelConfig
from gptjax.errors import GenerationError, UnsupportedModelError, WeightsError
from gptjax.formats.gguf import read_gguf
from gptjax.models import llama
from gptjax.models.layers import (apply_rope, rms_norm, rope_cos_sin, rope_frequencies, swiglu,
                                  unembed)
from gptjax.perplexity import perplexity
from gptjax.weights import TABLES, load_params_gguf, load_params_hf, rope_permute_rows
from tiny_models import (llama_cpp_permute, llama_gguf_tensors, rel_err, save_hf_dir,
                         state_dict_numpy, tiny_llama, torch_logits, write_llama_gguf)

F32_TOL = 1e-5     # float32 end to end: accumulated rounding is ~1e-6 on these sizes
OP_TOL = 1e-6      # one float32 op against its float64 / torch reference
BF16_TOL = 3e-2    # bfloat16 matrices and cache vs float32 logits
SEQ = 16           # every end-to-end call uses B = 2 and T in {SEQ, 7, 1}: shared compilations
V = 101

forward = jax.jit(llama.forward, static_argnames=("config", "return_hidden"))


# ---- fixtures and helpers -----------------------------------------------------------------------

def hf_config(dirpath):
    path = dirpath / "config.json"
    return ModelConfig.from_hf(json.loads(path.read_text()), source=str(path))


def load_both(model, tmp_path, name):
    """(config, params) from the HF directory and from the GGUF of ``model``."""
    d = save_hf_dir(model, tmp_path / f"{name}_hf")
    ch = hf_config(d)
    gf = read_gguf(write_llama_gguf(model, tmp_path / f"{name}.gguf"))
    cg = ModelConfig.from_gguf(gf)
    return (ch, load_params_hf(d, ch, jnp.float32)), (cg, load_params_gguf(gf, cg, jnp.float32))


@pytest.fixture(scope="module")
def untied_model():
    return tiny_llama(tied=False, seed=0)


@pytest.fixture(scope="module")
def loaded(untied_model, tmp_path_factory):
    return load_both(untied_model, tmp_path_factory.mktemp("untied"), "untied")


def tokens(batch, length, seed=0, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def run(params, config, toks, start=None, cache=None, dtype=jnp.float32):
    toks = jnp.asarray(toks, jnp.int32)
    B = toks.shape[0]
    cache = init_cache(config, B, config.context_length, dtype) if cache is None else cache
    start = jnp.zeros(B, jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return forward(params, toks, start, cache, config=config)


def assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_structure(a)
    assert ta == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(la, jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ---- layers -------------------------------------------------------------------------------------

def test_rms_norm_and_swiglu_against_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32) * 3 + 1
    w = rng.normal(size=48).astype(np.float32)
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
    xt = torch.from_numpy(x).double()
    want = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.from_numpy(w).double()
    assert got.dtype == jnp.float32 and rel_err(got, want.numpy()) < OP_TOL
    g, u = rng.normal(size=(2, 4, 80)).astype(np.float32) * 4, rng.normal(size=(2, 4, 80))
    got = swiglu(jnp.asarray(g), jnp.asarray(u, jnp.float32))
    want = torch.nn.functional.silu(torch.from_numpy(g).double()) * torch.from_numpy(u)
    assert rel_err(got, want.numpy()) < OP_TOL


def test_apply_rope_literal():
    """H = 4, angles (pi/2, pi): cos = (0, -1), sin = (1, 0). "norm" rotates (x0, x1) and
    (x2, x3); "neox" rotates (x0, x2) and (x1, x3)."""
    x = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
    cos = jnp.array([0.0, -1.0]).reshape(1, 1, 2)
    sin = jnp.array([1.0, 0.0]).reshape(1, 1, 2)
    np.testing.assert_allclose(apply_rope(x, cos, sin, "norm").reshape(4), [0, 1, 0, -1],
                               atol=1e-7)
    np.testing.assert_allclose(apply_rope(x, cos, sin, "neox").reshape(4), [0, 0, 1, -1],
                               atol=1e-7)
    with pytest.raises(ValueError, match="rope_type"):
        apply_rope(x, cos, sin, "gptj")


def _rope_ref(x, angles, adjacent):
    """float64 loops: pair i of each head rotated by angles[b, t, i]."""
    B, T, N, H = x.shape
    out = np.array(x, np.float64)
    for b in range(B):
        for t in range(T):
            for n in range(N):
                for i in range(H // 2):
                    j, k = (2 * i, 2 * i + 1) if adjacent else (i, i + H // 2)
                    c, s = math.cos(angles[b, t, i]), math.sin(angles[b, t, i])
                    out[b, t, n, j] = x[b, t, n, j] * c - x[b, t, n, k] * s
                    out[b, t, n, k] = x[b, t, n, j] * s + x[b, t, n, k] * c
    return out


def test_apply_rope_against_loops_and_the_permutation():
    B, T, N, H = 2, 3, 5, 8
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T, N, H)).astype(np.float32)
    pos = np.array([[0, 1, 2], [7, 8, 9]], np.int32)
    cfg = ModelConfig(arch="llama", vocab_size=V, d_model=40, n_layers=1, n_heads=N,
                      n_kv_heads=N, head_dim=H, d_ff=16, context_length=64, norm_eps=1e-5,
                      rope_theta=10000.0)
    inv_freq, mscale = rope_frequencies(cfg)
    cos, sin = rope_cos_sin(jnp.asarray(pos), inv_freq, mscale)
    angles = pos[..., None].astype(np.float64) * inv_freq.astype(np.float64)
    for rope_type, adjacent in (("norm", True), ("neox", False)):
        got = apply_rope(jnp.asarray(x), cos, sin, rope_type)
        assert rel_err(got, _rope_ref(x, angles, adjacent)) < OP_TOL
    # The converter's row permutation turns half-split pairs into adjacent ones: rotating the
    # permuted head with "norm" = permuting the "neox"-rotated head.
    perm = lambda a: np.stack([llama_cpp_permute(a[b, t].T, 1).T  # noqa: E731 (per head rows)
                               for b in range(B) for t in range(T)]).reshape(a.shape)
    norm = apply_rope(jnp.asarray(perm(x)), cos, sin, "norm")
    neox = apply_rope(jnp.asarray(x), cos, sin, "neox")
    np.testing.assert_allclose(np.asarray(norm), perm(np.asarray(neox)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
])
def test_rope_frequencies_match_transformers(rope):
    """inv_freq and the cos/sin multiplier vs transformers' ROPE_INIT_FUNCTIONS (float32)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = 150000.0 if rope.get("truncate") is False else 500.0
    hd = 64 if rope.get("truncate") is False else 16
    hf = LlamaConfig(hidden_size=4 * hd, num_attention_heads=4, head_dim=hd,
                     max_position_embeddings=128 if hd == 16 else 131072,
                     rope_parameters={"rope_theta": theta, **rope})
    cfg = ModelConfig.from_hf(hf.to_dict(), source="test")
    got, mscale = rope_frequencies(cfg)
    if rope["rope_type"] == "default":
        want = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        factor = 1.0
    else:
        want, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    assert got.dtype == np.float32 and got.shape == (hd // 2,)
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-7, atol=0)
    assert mscale == pytest.approx(factor, rel=1e-12)


def test_rope_frequencies_yarn_gpt_oss_ramp():
    """gpt-oss numbers (MODEL_FORMATS §1.4): untruncated ramp low 8.09 / high 17.40 - dims
    0..8 keep theta^(-2i/d), dims 18..31 are divided by 32 - and mscale 0.1 ln 32 + 1."""
    from gptjax.config import RopeScaling

    cfg = ModelConfig(arch="gpt-oss", vocab_size=V, d_model=64, n_layers=1, n_heads=2,
                      n_kv_heads=1, head_dim=64, d_ff=8, context_length=131072, norm_eps=1e-5,
                      rope_theta=150000.0, n_experts=2, n_experts_used=1, expert_d_ff=8,
                      rope_scaling=RopeScaling(type="yarn", factor=32.0, original_context=4096,
                                               truncate=False))
    got, mscale = rope_frequencies(cfg)
    plain = 150000.0 ** -(np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(got[:9], plain[:9], rtol=1e-6)
    np.testing.assert_allclose(got[18:], plain[18:] / 32, rtol=1e-6)
    assert np.all((got[9:18] < plain[9:18]) & (got[9:18] > plain[9:18] / 32))
    assert mscale == pytest.approx(1.346574, abs=1e-6)


# ---- the q/k permutation ------------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,head_dim,cols", [(6, 8, 48), (2, 8, None), (3, 10, 7)])
def test_loader_permutation_matches_the_documented_rule(n_heads, head_dim, cols):
    shape = (n_heads * head_dim,) if cols is None else (n_heads * head_dim, cols)
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(rope_permute_rows(w, n_heads), llama_cpp_permute(w, n_heads))


# ---- end to end ---------------------------------------------------------------------------------

def test_gguf_and_hf_match_transformers(untied_model, loaded):
    (ch, ph), (cg, pg) = loaded
    assert ch == cg and cg.rope_type == "norm" and not cg.tied_embeddings
    assert (cg.n_heads, cg.n_kv_heads, cg.head_dim) == (6, 2, 8)
    # the HF loader applies the converter's permutation: both trees are identical
    assert_same_tree(ph, pg)
    toks = tokens(2, SEQ)
    ref = torch_logits(untied_model, toks)
    for config, params in loaded:
        logits, cache = run(params, config, toks)
        assert logits.shape == (2, SEQ, V) and logits.dtype == jnp.float32
        assert rel_err(logits, ref) < F32_TOL
    assert cache.k.shape == (3, 2, 2, 64, 8)                           # [L, B, K, S, H]


def test_hf_without_permutation_is_wrong(untied_model, loaded):
    """The test can fail: un-permuted HF q/k rows under adjacent-pair RoPE give other logits."""
    (config, params), _ = loaded
    sd = state_dict_numpy(untied_model)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    nqk = config.q_dim + config.kv_dim
    for i in range(config.n_layers):            # the loader fused q/k/v (gptjax.fusion): rows q; k; v
        qkv = broken["blocks"][i]["attn_qkv"]["weight"]
        broken["blocks"][i]["attn_qkv"]["weight"] = jnp.concatenate([
            jnp.asarray(sd[f"model.layers.{i}.self_attn.q_proj.weight"]),
            jnp.asarray(sd[f"model.layers.{i}.self_attn.k_proj.weight"]), qkv[nqk:]])
    toks = tokens(2, SEQ)
    assert rel_err(run(broken, config, toks)[0], torch_logits(untied_model, toks)) > 1e-2


def test_tied_head_and_other_theta(tmp_path):
    model = tiny_llama(tied=True, seed=1, rope_theta=500.0)
    (ch, ph), (cg, pg) = load_both(model, tmp_path, "tied")
    assert ch == cg and cg.tied_embeddings and cg.rope_theta == 500.0
    assert "output" not in ph and "output" not in pg
    toks = tokens(2, SEQ, seed=1)
    ref = torch_logits(model, toks)
    for config, params in ((ch, ph), (cg, pg)):
        assert rel_err(run(params, config, toks)[0], ref) < F32_TOL


def test_biases_head_dim_and_linear_rope_scaling(tmp_path):
    """attention_bias + mlp_bias, head_dim 10 != D/N (GGUF attention.key_length), linear RoPE
    scaling (GGUF rope.scaling.type/factor)."""
    model = tiny_llama(seed=2, head_dim=10, attention_bias=True, mlp_bias=True,
                       rope_scaling={"rope_type": "linear", "factor": 2.5})
    (ch, ph), (cg, pg) = load_both(model, tmp_path, "bias")
    assert ch == cg and cg.head_dim == 10 and cg.attention_bias and cg.mlp_bias
    assert cg.rope_scaling.type == "linear" and cg.rope_scaling.factor == 2.5
    assert_same_tree(ph, pg)
    toks = tokens(2, SEQ, seed=2)
    ref = torch_logits(model, toks)
    assert rel_err(run(pg, cg, toks)[0], ref) < F32_TOL


def test_yarn_rope_from_hf(tmp_path):
    model = tiny_llama(seed=3, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 16})
    d = save_hf_dir(model, tmp_path / "yarn")
    config = hf_config(d)
    assert config.rope_scaling.type == "yarn" and config.rope_scaling.mscale > 1
    toks = tokens(2, SEQ, seed=3)
    logits, _ = run(load_params_hf(d, config, jnp.float32), config, toks)
    assert rel_err(logits, torch_logits(model, toks)) < F32_TOL


def test_prefill_then_decode_equals_full_forward(loaded):
    _, (config, params) = loaded
    toks = tokens(2, SEQ, seed=4)
    full, _ = run(params, config, toks)
    logits, cache = run(params, config, toks[:, :7])
    assert rel_err(logits, full[:, :7]) < F32_TOL
    for t in range(7, SEQ):
        step, cache = run(params, config, toks[:, t : t + 1], start=[t, t], cache=cache)
        assert rel_err(step[:, 0], full[:, t]) < F32_TOL, t


def test_right_padded_batch_rows_are_independent(untied_model, loaded):
    _, (config, params) = loaded
    short, long_ = tokens(1, 7, seed=5)[0], tokens(1, SEQ, seed=6)[0]
    batch = np.stack([np.concatenate([short, tokens(1, SEQ - 7, seed=7)[0]]), long_])
    logits, cache = run(params, config, batch)
    alone, _ = run(params, config, np.stack([short, short]))
    assert rel_err(logits[0, :7], alone[0]) < F32_TOL
    nxt = np.array([[11], [29]], np.int32)
    step, _ = run(params, config, nxt, start=[7, SEQ], cache=cache)   # row 0 overwrites slot 7
    ref0 = torch_logits(untied_model, np.concatenate([short, nxt[0]])[None])[0, -1]
    ref1 = torch_logits(untied_model, np.concatenate([long_, nxt[1]])[None])[0, -1]
    assert rel_err(step[0, 0], ref0) < F32_TOL and rel_err(step[1, 0], ref1) < F32_TOL


def test_return_hidden_and_unembed(loaded):
    _, (config, params) = loaded
    toks = jnp.asarray(tokens(2, SEQ, seed=8))
    cache = init_cache(config, 2, config.context_length)
    hidden, _ = forward(params, toks, jnp.zeros(2, jnp.int32), cache, config=config,
                        return_hidden=True)
    assert hidden.shape == (2, SEQ, 48)
    logits, _ = run(params, config, toks)
    assert rel_err(unembed(params, hidden), logits) < OP_TOL


def test_bfloat16_compute(untied_model, tmp_path):
    gf = read_gguf(write_llama_gguf(untied_model, tmp_path / "bf16.gguf"))
    config = ModelConfig.from_gguf(gf)
    params = load_params_gguf(gf, config, jnp.bfloat16)
    assert params["blocks"][0]["attn_qkv"]["weight"].dtype == jnp.bfloat16
    assert params["blocks"][0]["attn_norm"]["weight"].dtype == jnp.float32
    toks = tokens(2, SEQ, seed=9)
    logits, cache = run(params, config, toks, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
    assert rel_err(logits, torch_logits(untied_model, toks)) < BF16_TOL


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny llama (dims multiples of 32: D 64, N 4, K 2, H 16, F 96, L 2, tied) whose GGUF
    stores the token embedding as Q8_0 and every other matrix as Q4_1 (SmolLM2's layout),
    quantized by gguf.quants; and the torch reference carrying gguf.quants' dequantization of
    the same blocks. Quantization is row-wise (blocks along the input dim), so quantizing the
    permuted q/k rows equals permuting the quantized rows."""
    import gguf.quants
    from gguf import GGMLQuantizationType as Q

    model = tiny_llama(tied=True, seed=5, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96,
                       num_hidden_layers=2)
    t = {}
    for name, arr in llama_gguf_tensors(model).items():
        if arr.ndim == 2:
            kind = Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
            t[name] = (gguf.quants.quantize(arr, kind), kind, arr.shape)
        else:
            t[name] = arr
    path = write_llama_gguf(model, tmp_path_factory.mktemp("quant") / "q.gguf", tensors=t)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                kind = Q.Q8_0 if name == "model.embed_tokens.weight" else Q.Q4_1
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind),
                                                                kind)))
    model.tie_weights()
    return model, read_gguf(path)


@pytest.mark.parametrize("dequantize_at_load", [False, True])
def test_quantized_gguf_packed_and_dequantized(quantized, dequantize_at_load):
    from gptjax.packed import PackedWeight

    model, gf = quantized
    assert gf.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"
    config = ModelConfig.from_gguf(gf)
    params = load_params_gguf(gf, config, jnp.float32, dequantize_at_load=dequantize_at_load)
    q = params["blocks"][0]["attn_qkv"]["weight"]                     # fused q/k/v at load
    assert isinstance(q, PackedWeight) != dequantize_at_load
    assert isinstance(params["token_embd"]["weight"], PackedWeight) != dequantize_at_load
    assert not isinstance(params["blocks"][0]["attn_norm"]["weight"], PackedWeight)
    toks = tokens(2, SEQ, seed=12)
    ref = torch_logits(model, toks)
    full, _ = run(params, config, toks)
    assert rel_err(full, ref) < F32_TOL
    logits, cache = run(params, config, toks[:, :7])                     # prefill + decode
    step, _ = run(params, config, toks[:, 7:8], start=[7, 7], cache=cache)
    assert rel_err(step[:, 0], ref[:, 7]) < F32_TOL


# ---- weight mapping and audit -------------------------------------------------------------------

def test_gguf_table_agrees_with_config_tensor_table(loaded):
    (config, _), _ = loaded
    rules = TABLES[("llama", "gguf")].rules
    for cfg in (config, dataclasses.replace(config, tied_embeddings=True),
                dataclasses.replace(config, attention_bias=True, mlp_bias=True)):
        expected = llama.param_shapes(cfg)
        mine = {}
        for r in rules:
            for i in (range(cfg.n_layers) if "{i}" in r.source else [None]):
                if r.param.format(i=i) in expected:
                    mine[r.source.format(i=i)] = expected[r.param.format(i=i)]
        assert mine == cfg.expected_tensors()


def test_gguf_audit_reports_every_problem_by_name(untied_model, tmp_path, loaded):
    _, (config, _) = loaded
    t = llama_gguf_tensors(untied_model)
    del t["blk.1.ffn_gate.weight"]                                        # missing
    t["blk.2.attn_k.weight"] = np.zeros((48, 16), np.float32)             # transposed
    t["blk.0.attn_qkv.weight"] = np.zeros((80, 48), np.float32)           # a gpt2 name
    t["blk.0.attn_q.bias"] = np.zeros(48, np.float32)                     # no bias in config
    gf = read_gguf(write_llama_gguf(untied_model, tmp_path / "bad.gguf", tensors=t))
    with pytest.raises(WeightsError) as err:
        load_params_gguf(gf, config, jnp.float32)
    msg = str(err.value)
    assert "4 problems" in msg and str(gf.path) in msg
    assert "missing tensor 'blk.1.ffn_gate.weight'" in msg
    assert "'blk.2.attn_k.weight' has shape (48, 16), expected (16, 48)" in msg
    assert "unexpected tensor 'blk.0.attn_qkv.weight'" in msg
    assert "'blk.0.attn_q.bias': parameter blocks.0.attn_q.bias is not used" in msg


def test_gguf_rope_freqs_is_unsupported(untied_model, tmp_path, loaded):
    _, (config, _) = loaded
    t = llama_gguf_tensors(untied_model)
    t["rope_freqs.weight"] = np.ones(4, np.float32)
    gf = read_gguf(write_llama_gguf(untied_model, tmp_path / "llama3.gguf", tensors=t))
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight.*llama3"):
        load_params_gguf(gf, config, jnp.float32)


def test_hf_names_ignored_buffer_and_audit(untied_model, tmp_path, loaded):
    (config, _), _ = loaded
    src = tmp_path / "src"
    save_hf_dir(untied_model, src)
    sd = state_dict_numpy(untied_model)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)   # ignored
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, str(good / "model.safetensors"))
    toks = tokens(2, SEQ, seed=10)
    logits, _ = run(load_params_hf(good, config, jnp.float32), config, toks)
    assert rel_err(logits, torch_logits(untied_model, toks)) < F32_TOL

    del sd["model.layers.2.mlp.up_proj.weight"]
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"][:40]
    sd["model.layers.0.self_attn.qkv_proj.weight"] = np.zeros((80, 48), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_params_hf(bad, config, jnp.float32)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "missing tensor 'model.layers.2.mlp.up_proj.weight'" in msg
    assert "'model.layers.1.self_attn.q_proj.weight' has shape (40, 48), expected (48, 48)" in msg
    assert "unexpected tensor 'model.layers.0.self_attn.qkv_proj.weight'" in msg


# ---- perplexity ---------------------------------------------------------------------------------

def _ppl_ref(model, ids, ctx, bos=None):
    """The llama.cpp convention spelled out with torch logits, in float64."""
    nll = []
    for c in range(len(ids) // ctx):
        chunk = np.array(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        logp = torch.log_softmax(torch.from_numpy(torch_logits(model, chunk[None])[0]).double(), -1)
        nll += [-float(logp[j - 1, chunk[j]]) for j in range(ctx // 2, ctx)]
    return math.exp(sum(nll) / len(nll)), nll


def test_perplexity_against_torch(untied_model, loaded):
    _, (config, params) = loaded
    ids = tokens(1, 3 * SEQ + 5, seed=11)[0].tolist()        # 3 chunks, remainder dropped
    seen = []
    ppl, nll = perplexity(llama.forward, params, config, ids, ctx=SEQ,
                          progress=lambda i, n, p: seen.append((i, n)))
    ppl_ref, nll_ref = _ppl_ref(untied_model, ids, SEQ)
    assert len(nll) == 3 * SEQ // 2 and seen == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5, atol=1e-5)
    assert ppl == pytest.approx(ppl_ref, rel=1e-5)
    # hidden + unembed path and the BOS overwrite
    ppl2, _ = perplexity(llama.forward, params, config, ids, ctx=SEQ, unembed_fn=llama.unembed,
                         bos_id=0)
    assert ppl2 == pytest.approx(_ppl_ref(untied_model, ids, SEQ, bos=0)[0], rel=1e-5)


@pytest.mark.parametrize("ids,ctx,match", [
    (list(range(10)), 16, "fewer than one chunk"),
    (list(range(20)), 15, "even chunk length"),
    (list(range(20)), 128, "context_length = 64"),
    ([1, 2, V] * 8, 16, f"token id {V} is outside"),
])
def test_perplexity_bad_input(loaded, ids, ctx, match):
    _, (config, params) = loaded
    with pytest.raises(GenerationError, match=match):
        perplexity(llama.forward, params, config, ids, ctx=ctx)
