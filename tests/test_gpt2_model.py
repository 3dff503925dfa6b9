"""GPT-2 end to end against transformers, plus the layers, the KV cache and the weight audit.

Reference: a tiny random ``transformers.GPT2LMHeadModel`` (V 97, P 64, D 48, N 4, H 12, L 3,
F 80 - every size distinct) run by torch on CPU in float32, loaded here from its HF directory
and from a llama.cpp-layout GGUF of the same weights (tests/tiny_models.py).
Errors are relative Frobenius norms ||x - ref|| / ||ref||.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from gptjax.cache import KVCache, init_cache
from gptjax.config import ModelConfig
from gptjax.errors import GenerationError, WeightsError
from gptjax.formats.gguf import read_gguf
from gptjax.models import gpt2
from gptjax.models.layers import attention, attention_mask, gelu, layer_norm, linear
from gptjax.weights import TABLES, load_params_gguf, load_params_hf
from tiny_models import (gpt2_gguf_tensors, rel_err, save_hf_dir, state_dict_numpy, tiny_gpt2,
                         torch_logits, write_gpt2_gguf)

F32_TOL = 1e-5     # float32 end to end: accumulated rounding is ~1e-6 on these sizes
BF16_TOL = 3e-2    # bfloat16 matrices (8-bit mantissa, ~4e-3 per rounding) vs float32 logits
OP_TOL = 1e-6      # one float32 op against its float64 / torch reference
# Every end-to-end test uses B = 2 and T in {SEQ, 7, 12, 1}: the jit cache is shared between
# tests (HF and GGUF configs compare equal), which keeps the compile time of the file low.
SEQ = 16

forward = jax.jit(gpt2.forward, static_argnames=("config", "return_hidden"))


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_model():
    return tiny_gpt2(tied=True, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tied_model, tmp_path_factory):
    return save_hf_dir(tied_model, tmp_path_factory.mktemp("hf_tied"))


@pytest.fixture(scope="module")
def gguf_path(tied_model, tmp_path_factory):
    return write_gpt2_gguf(tied_model, tmp_path_factory.mktemp("gguf") / "tiny-gpt2.gguf")


def hf_config(dirpath):
    path = dirpath / "config.json"
    return ModelConfig.from_hf(json.loads(path.read_text()), source=str(path))


@pytest.fixture(scope="module")
def hf_loaded(hf_dir):
    config = hf_config(hf_dir)
    return config, load_params_hf(hf_dir, config, jnp.float32)


@pytest.fixture(scope="module")
def gguf_loaded(gguf_path):
    gf = read_gguf(gguf_path)
    config = ModelConfig.from_gguf(gf)
    return config, load_params_gguf(gf, config, jnp.float32)


def tokens(batch, length, seed=0, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def run(params, config, toks, start=None, cache=None, dtype=jnp.float32):
    """forward over int tokens [B, T] from positions ``start`` (default 0) with a fresh cache of
    the full context unless one is given."""
    toks = jnp.asarray(toks, jnp.int32)
    B = toks.shape[0]
    cache = init_cache(config, B, config.context_length, dtype) if cache is None else cache
    start = jnp.zeros(B, jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return forward(params, toks, start, cache, config=config)


# ---- layers -------------------------------------------------------------------------------------

def test_attention_mask_literal():
    q = jnp.array([[2, 3]])                               # one row, queries at positions 2 and 3
    got = attention_mask(q, jnp.arange(5))
    want = [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]]
    np.testing.assert_array_equal(np.asarray(got, int), want)
    got = attention_mask(q, jnp.arange(5), window=2)      # keys p-1..p
    want = [[[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]]
    np.testing.assert_array_equal(np.asarray(got, int), want)


def _attention_ref(q, k, v, pos, window, sinks, scale):
    """Loops over rows, heads and queries in float64 (the definition, no broadcasting tricks)."""
    B, T, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // G
            for t in range(T):
                p = pos[b, t]
                js = [j for j in range(S) if j <= p and (window is None or j > p - window)]
                s = np.array([scale * np.dot(q[b, t, n], k[b, kv, j]) for j in js])
                m = max(s.max(), sinks[n]) if sinks is not None else s.max()
                e = np.exp(s - m)
                den = e.sum() + (np.exp(sinks[n] - m) if sinks is not None else 0.0)
                out[b, t, n] = (e[:, None] * v[b, kv, js]).sum(0) / den
    return out


@pytest.mark.parametrize("window,with_sinks", [(None, False), (3, True)])
def test_attention_gqa_window_sinks_against_loops(window, with_sinks):
    B, T, N, K, S, H = 2, 3, 6, 2, 7, 5                    # G = 3; all sizes distinct
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    sinks = rng.normal(size=(N,)).astype(np.float32) if with_sinks else None
    pos = np.array([[2, 3, 4], [4, 5, 6]], np.int32)
    got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos),
                    window=window, sinks=None if sinks is None else jnp.asarray(sinks),
                    scale=H ** -0.5)
    want = _attention_ref(q.astype(np.float64), k, v, pos, window, sinks, H ** -0.5)
    assert got.shape == (B, T, N, H)
    assert rel_err(got, want) < OP_TOL


def test_layer_norm_gelu_linear_against_references():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32) * 3 + 1
    w, b = rng.normal(size=48).astype(np.float32), rng.normal(size=48).astype(np.float32)
    got = layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), 1e-5)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (48,),
                                          torch.from_numpy(w).double(),
                                          torch.from_numpy(b).double(), 1e-5).numpy()
    assert rel_err(got, want) < OP_TOL
    for approximate, torch_mode in ((True, "tanh"), (False, "none")):
        got = gelu(jnp.asarray(x), approximate=approximate)
        want = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate=torch_mode)
        assert rel_err(got, want.numpy()) < OP_TOL
    W = rng.normal(size=(80, 48)).astype(np.float32)        # [O, I]
    bias = rng.normal(size=80).astype(np.float32)
    got = linear(jnp.asarray(x), jnp.asarray(W), jnp.asarray(bias))
    want = x.astype(np.float64) @ W.T.astype(np.float64) + bias
    assert got.shape == (3, 5, 80) and rel_err(got, want) < OP_TOL


# ---- the KV cache -------------------------------------------------------------------------------

def test_init_cache_zeros_and_shape(hf_loaded):
    config, _ = hf_loaded
    cache = init_cache(config, 2, 10, jnp.bfloat16)
    assert cache.k.shape == cache.v.shape == (3, 2, 4, 10, 12)      # [L, B, K, S, H]
    assert cache.k.dtype == jnp.bfloat16 and not np.any(np.asarray(cache.k, np.float32))
    assert (cache.n_layers, cache.batch, cache.max_len) == (3, 2, 10)
    with pytest.raises(GenerationError, match="max_len"):
        init_cache(config, 2, 0)


def test_cache_write_literal():
    cache = KVCache(k=jnp.zeros((2, 2, 1, 4, 1)), v=jnp.zeros((2, 2, 1, 4, 1)))
    new = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)    # [B, T, K, H]
    pos = jnp.array([[0, 1], [3, 4]])                                # row 1: position 4 >= S
    out = cache.write(1, new, -new, pos)
    np.testing.assert_array_equal(out.k[1, :, 0, :, 0], [[1, 2, 0, 0], [0, 0, 0, 3]])
    np.testing.assert_array_equal(out.v[1, :, 0, :, 0], [[-1, -2, 0, 0], [0, 0, 0, -3]])
    assert not np.any(np.asarray(out.k[0]))                          # other layer untouched


# ---- end to end against transformers ------------------------------------------------------------

def test_hf_dir_logits_match_transformers(tied_model, hf_loaded):
    config, params = hf_loaded
    toks = tokens(2, SEQ)
    logits, _ = run(params, config, toks)
    assert logits.dtype == jnp.float32 and logits.shape == (2, SEQ, 97)
    assert rel_err(logits, torch_logits(tied_model, toks)) < F32_TOL


def test_gguf_logits_match_transformers(tied_model, gguf_loaded):
    config, params = gguf_loaded
    assert config.tied_embeddings and "output" not in params
    toks = tokens(2, SEQ)
    logits, _ = run(params, config, toks)
    assert rel_err(logits, torch_logits(tied_model, toks)) < F32_TOL


def test_linen_module_and_hidden_path_agree(hf_loaded):
    config, params = hf_loaded
    toks = jnp.asarray(tokens(2, SEQ))
    start = jnp.zeros(2, jnp.int32)
    cache = init_cache(config, 2, config.context_length)
    logits, _ = forward(params, toks, start, cache, config=config)

    @jax.jit
    def both(p, t, s, c):
        via_linen, _ = gpt2.GPT2(config).apply({"params": p}, t, s, c)
        hidden, _ = gpt2.forward(p, t, s, c, config, return_hidden=True)
        return via_linen, hidden

    via_linen, hidden = both(params, toks, start, cache)
    assert rel_err(via_linen, logits) < OP_TOL
    assert hidden.shape == (2, SEQ, 48)
    assert rel_err(gpt2.unembed(params, hidden), logits) < OP_TOL


def test_prefill_then_decode_reproduces_full_sequence(tied_model, gguf_loaded):
    config, params = gguf_loaded
    toks = tokens(2, SEQ, seed=3)
    full, _ = run(params, config, toks)
    cache = init_cache(config, 2, config.context_length)
    pieces = []
    # prefill 7, a chunk of 7 starting at 7, then single-token steps
    bounds = [(0, 7), (7, 14), (14, 15), (15, 16)]
    for a, b in bounds:
        out, cache = run(params, config, toks[:, a:b], start=[a, a], cache=cache)
        pieces.append(out)
    stepped = jnp.concatenate(pieces, axis=1)
    assert rel_err(stepped, full) < F32_TOL
    assert rel_err(stepped, torch_logits(tied_model, toks)) < F32_TOL


def test_right_padded_batch_equals_rows_alone(tied_model, gguf_loaded):
    config, params = gguf_loaded
    short, long_ = tokens(1, 7, seed=4)[0], tokens(1, 12, seed=5)[0]
    garbage = tokens(1, 5, seed=6)[0]                     # padding: arbitrary tokens, not zeros
    batch = np.stack([np.concatenate([short, garbage]), long_])
    logits, cache = run(params, config, batch)
    # rows alone, each duplicated to B = 2 so that the compiled shapes are shared with other tests
    alone_short, _ = run(params, config, np.stack([short, short]))
    alone_long, _ = run(params, config, np.stack([long_, long_]))
    assert rel_err(logits[0, :7], alone_short[0]) < F32_TOL
    assert rel_err(logits[1], alone_long[0]) < F32_TOL
    # decode one token per row from its own length: row 0 overwrites the garbage slot 7
    nxt = np.array([[11], [29]], np.int32)
    step, _ = run(params, config, nxt, start=[7, 12], cache=cache)
    ref0 = torch_logits(tied_model, np.concatenate([short, nxt[0]])[None])[0, -1]
    ref1 = torch_logits(tied_model, np.concatenate([long_, nxt[1]])[None])[0, -1]
    assert rel_err(step[0, 0], ref0) < F32_TOL
    assert rel_err(step[1, 0], ref1) < F32_TOL


def test_untied_head_from_hf_and_gguf(tmp_path):
    model = tiny_gpt2(tied=False, seed=1)
    sd = state_dict_numpy(model)
    assert not np.allclose(sd["lm_head.weight"], sd["transformer.wte.weight"])
    toks = tokens(2, SEQ, seed=7)
    ref = torch_logits(model, toks)
    d = save_hf_dir(model, tmp_path / "hf")
    config = hf_config(d)
    assert not config.tied_embeddings
    params = load_params_hf(d, config, jnp.float32)
    assert "output" in params
    assert rel_err(run(params, config, toks)[0], ref) < F32_TOL
    gf = read_gguf(write_gpt2_gguf(model, tmp_path / "untied.gguf"))
    assert "output.weight" in gf.tensors
    config = ModelConfig.from_gguf(gf)
    assert not config.tied_embeddings
    assert rel_err(run(load_params_gguf(gf, config, jnp.float32), config, toks)[0], ref) < F32_TOL


def test_bfloat16_compute(tied_model, gguf_path):
    gf = read_gguf(gguf_path)
    config = ModelConfig.from_gguf(gf)
    params = load_params_gguf(gf, config, jnp.bfloat16)
    assert params["blocks"][0]["attn_qkv"]["weight"].dtype == jnp.bfloat16
    assert params["blocks"][0]["attn_qkv"]["bias"].dtype == jnp.float32     # vectors stay f32
    toks = tokens(2, SEQ, seed=8)
    logits, cache = run(params, config, toks, dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
    assert rel_err(logits, torch_logits(tied_model, toks)) < BF16_TOL


def _rounded_copy(model, dtype, *, matrices_only=True):
    """A float32 copy of ``model`` whose matrices (or all parameters) are rounded through
    ``dtype``: the reference for a file that stores them in 16 bits."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2 or not matrices_only:
                p.copy_(p.to(dtype).float())
    return ref


def test_gguf_f16_matrices_decode_through_quant(tied_model, tmp_path, gguf_loaded):
    """F16 tensors go through gptjax.quant.dequantize's raw-bytes path."""
    config, _ = gguf_loaded
    t = {k: (v.astype(np.float16) if v.ndim == 2 else v)
         for k, v in gpt2_gguf_tensors(tied_model).items()}
    gf = read_gguf(write_gpt2_gguf(tied_model, tmp_path / "f16.gguf", tensors=t))
    assert gf.tensors["blk.0.attn_qkv.weight"].type_name == "F16"
    toks = tokens(2, SEQ, seed=11)
    logits, _ = run(load_params_gguf(gf, config, jnp.float32), config, toks)
    ref = torch_logits(_rounded_copy(tied_model, torch.float16), toks)
    assert rel_err(logits, ref) < F32_TOL


def test_hf_bfloat16_safetensors(tied_model, tmp_path):
    """BF16 safetensors (numpy has no bfloat16; read through the library's jax backend)."""
    d = save_hf_dir(copy.deepcopy(tied_model).to(torch.bfloat16), tmp_path / "bf16")
    with safe_open(str(d / "model.safetensors"), "np") as f:
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_dtype() == "BF16"
    config = hf_config(d)
    toks = tokens(2, SEQ, seed=12)
    logits, _ = run(load_params_hf(d, config, jnp.float32), config, toks)
    ref = torch_logits(_rounded_copy(tied_model, torch.bfloat16, matrices_only=False), toks)
    assert rel_err(logits, ref) < F32_TOL


# ---- weight mapping and audit -------------------------------------------------------------------

def test_gguf_table_agrees_with_config_tensor_table(hf_loaded):
    """The GGUF rules name exactly the tensors gptjax.config expects, with the same shapes."""
    config, _ = hf_loaded
    rules = TABLES[("gpt2", "gguf")].rules
    for cfg in (config, dataclasses.replace(config, tied_embeddings=False)):
        expected = gpt2.param_shapes(cfg)
        mine = {}
        for r in rules:
            layers = range(cfg.n_layers) if "{i}" in r.source else [None]
            for i in layers:
                if r.param.format(i=i) in expected:
                    mine[r.source.format(i=i)] = expected[r.param.format(i=i)]
        assert mine == cfg.expected_tensors()


def test_gguf_audit_reports_every_problem_by_name(tied_model, tmp_path, gguf_loaded):
    config, _ = gguf_loaded
    t = gpt2_gguf_tensors(tied_model)
    del t["blk.1.ffn_up.bias"]                                           # missing
    t["blk.2.attn_qkv.weight"] = np.ascontiguousarray(t["blk.2.attn_qkv.weight"].T)  # transposed
    t["blk.0.attn_q.weight"] = np.zeros((48, 48), np.float32)             # unknown to gpt2
    t["blk.3.attn_norm.weight"] = np.ones(48, np.float32)                 # layer 3 of 3
    gf = read_gguf(write_gpt2_gguf(tied_model, tmp_path / "bad.gguf", tensors=t))
    with pytest.raises(WeightsError) as err:
        load_params_gguf(gf, config, jnp.float32)
    msg = str(err.value)
    assert "4 problems" in msg and str(gf.path) in msg
    assert "missing tensor 'blk.1.ffn_up.bias'" in msg
    assert "'blk.2.attn_qkv.weight' has shape (48, 144), expected (144, 48)" in msg
    assert "unexpected tensor 'blk.0.attn_q.weight'" in msg
    assert "'blk.3.attn_norm.weight' is for layer 3" in msg


@pytest.mark.parametrize("problem", ["missing", "shape", "extra"])
def test_gguf_audit_single_problem(tied_model, tmp_path, gguf_loaded, problem):
    config, _ = gguf_loaded
    t = gpt2_gguf_tensors(tied_model)
    name = {"missing": "position_embd.weight", "shape": "blk.0.ffn_down.weight",
            "extra": "rope_freqs.weight"}[problem]
    if problem == "missing":
        del t[name]
    elif problem == "shape":
        t[name] = np.zeros((48, 79), np.float32)
    else:
        t[name] = np.ones(6, np.float32)
    gf = read_gguf(write_gpt2_gguf(tied_model, tmp_path / "bad.gguf", tensors=t))
    with pytest.raises(WeightsError, match=f"(?s)1 problem\\b.*'{name}'"):
        load_params_gguf(gf, config, jnp.float32)


def _write_hf(dirpath, tensors, config_src):
    dirpath.mkdir()
    (dirpath / "config.json").write_text((config_src / "config.json").read_text())
    save_file(tensors, str(dirpath / "model.safetensors"))
    return dirpath


def test_hf_name_variants_and_ignored_buffers(tied_model, hf_dir, tmp_path):
    """Names without the ``transformer.`` prefix load too, and the causal-mask buffers of old
    checkpoints (``h.N.attn.bias``, ``h.N.attn.masked_bias``) are ignored on purpose."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict_numpy(tied_model).items()
          if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = np.tril(np.ones((64, 64), bool))[None, None]  # old: bool buffer
    sd["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    d = _write_hf(tmp_path / "old", sd, hf_dir)
    config = hf_config(d)
    toks = tokens(2, SEQ, seed=9)
    logits, _ = run(load_params_hf(d, config, jnp.float32), config, toks)
    assert rel_err(logits, torch_logits(tied_model, toks)) < F32_TOL


def test_hf_audit_reports_every_problem_by_name(tied_model, hf_dir, tmp_path):
    sd = state_dict_numpy(tied_model)
    sd.pop("lm_head.weight")
    del sd["transformer.h.0.ln_1.bias"]                                   # missing
    sd["transformer.h.1.mlp.c_fc.weight"] = np.ascontiguousarray(
        sd["transformer.h.1.mlp.c_fc.weight"].T)                          # [out, in]: not Conv1D
    sd["transformer.h.0.attn.rotary.inv_freq"] = np.ones(6, np.float32)   # unknown
    sd["wte.weight"] = sd["transformer.wte.weight"]                       # the same param twice
    sd["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"].astype(np.int32)  # not a float
    d = _write_hf(tmp_path / "bad", sd, hf_dir)
    config = hf_config(d)
    with pytest.raises(WeightsError) as err:
        load_params_hf(d, config, jnp.float32)
    msg = str(err.value)
    assert "5 problems" in msg and str(d) in msg
    assert "missing tensor 'transformer.h.0.ln_1.bias'" in msg
    assert ("'transformer.h.1.mlp.c_fc.weight' has shape (80, 48), expected (48, 80) "
            "(stored transposed" in msg)
    assert "unexpected tensor 'transformer.h.0.attn.rotary.inv_freq'" in msg
    assert "token_embd.weight is filled twice" in msg and "'wte.weight'" in msg
    assert "'transformer.ln_f.bias' has dtype I32" in msg


def test_tied_config_ignores_a_stored_lm_head(tied_model, hf_dir, tmp_path):
    """transformers ties lm_head to wte when tie_word_embeddings is true, whatever the file
    holds; so does the loader (a planted wrong lm_head must not change the logits)."""
    sd = state_dict_numpy(tied_model)
    sd["lm_head.weight"] = np.zeros_like(sd["transformer.wte.weight"])
    d = _write_hf(tmp_path / "tied_with_head", sd, hf_dir)
    config = hf_config(d)
    params = load_params_hf(d, config, jnp.float32)
    assert "output" not in params
    toks = tokens(2, SEQ, seed=10)
    assert rel_err(run(params, config, toks)[0], torch_logits(tied_model, toks)) < F32_TOL
