"""Load-time fusion (gptjax.fusion): fused parameters hold exactly the parts' rows, the model code
gives the same logits from fused and unfused trees, and parts that cannot be fused stay apart.

References: the unfused parameters (loaded with fuse=False) and, for the rows, the parts
themselves; tolerance: float32 summation order only (1e-6 relative on logits)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gptjax.cache import init_cache
from gptjax.config import ModelConfig
from gptjax.formats.gguf import read_gguf
from gptjax.fusion import FUSIONS, fuse_block, fuse_params, fused_partials, split_linear
from gptjax.packed import PackedWeight
from gptjax.weights import load_params_gguf
from tiny_models import (rel_err, tiny_gpt_oss, tiny_llama, write_gpt_oss_gguf,
                         write_llama_gguf)

FUSED_RTOL = 1e-6


def _q8_bytes(rng, o, i):
    b = rng.integers(0, 256, (o, i // 32, 34), dtype=np.uint8)
    b[..., :2] = np.full((o, i // 32), 0.01, np.float16).view(np.uint8).reshape(o, i // 32, 2)
    return b.reshape(o, -1)


def test_fuse_block_rows_and_biases():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((o, 8)), jnp.float32) for o in (6, 2, 2))
    bq, bk, bv = (jnp.asarray(rng.standard_normal(o), jnp.float32) for o in (6, 2, 2))
    block = {"attn_q": {"weight": q, "bias": bq}, "attn_k": {"weight": k, "bias": bk},
             "attn_v": {"weight": v, "bias": bv}, "attn_norm": {"weight": jnp.ones(8)}}
    fused = fuse_block(block)
    assert set(fused) == {"attn_qkv", "attn_norm"} and "attn_q" in block     # input untouched
    np.testing.assert_array_equal(fused["attn_qkv"]["weight"], jnp.concatenate([q, k, v]))
    np.testing.assert_array_equal(fused["attn_qkv"]["bias"], jnp.concatenate([bq, bk, bv]))
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    names = FUSIONS["attn_qkv"]
    for a, b in zip(split_linear(fused, names, x, (6, 2, 2)), split_linear(block, names, x, (6, 2, 2))):
        assert a.shape == b.shape and rel_err(a, b) < FUSED_RTOL
    # a bias on some parts only, or different dtypes: left apart
    for bad in ({**block, "attn_v": {"weight": v}},
                {**block, "attn_v": {"weight": v.astype(jnp.bfloat16), "bias": bv}}):
        assert set(fuse_block(bad)) == set(bad)


def test_fuse_packed_same_type_only():
    rng = np.random.default_rng(1)
    g = PackedWeight.from_bytes(_q8_bytes(rng, 4, 64), T.Q8_0, (4, 64))
    u = PackedWeight.from_bytes(_q8_bytes(rng, 4, 64), T.Q8_0, (4, 64))
    fused = fuse_block({"ffn_gate": {"weight": g}, "ffn_up": {"weight": u}})["ffn_gate_up"]["weight"]
    assert isinstance(fused, PackedWeight) and fused.shape == (8, 64) and fused.ggml_type == T.Q8_0
    np.testing.assert_array_equal(fused.dequantize(), jnp.concatenate([g.dequantize(), u.dequantize()]))
    dense_u = {"weight": u.dequantize()}
    assert set(fuse_block({"ffn_gate": {"weight": g}, "ffn_up": dense_u})) == {"ffn_gate", "ffn_up"}
    # expert stacks [E, O, I] fuse along O
    e = PackedWeight.from_bytes(_q8_bytes(rng, 3 * 4, 64).reshape(3, 4, -1), T.Q8_0, (3, 4, 64))
    f = fuse_block({"ffn_gate_exps": {"weight": e, "bias": jnp.zeros((3, 4))},
                    "ffn_up_exps": {"weight": e, "bias": jnp.ones((3, 4))}})["ffn_gate_up_exps"]
    assert f["weight"].shape == (3, 8, 64) and f["bias"].shape == (3, 8)
    np.testing.assert_array_equal(f["weight"].take(1).dequantize()[4:], e.take(1).dequantize())


def _logits(mod, params, config, toks):
    cache = init_cache(config, toks.shape[0], 32, jnp.float32)
    fwd = jax.jit(lambda p, t, c: mod.forward(p, t, jnp.zeros(t.shape[0], jnp.int32), c, config))
    return np.asarray(fwd(params, toks, cache)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt-oss"])
def test_fused_model_equals_unfused(tmp_path, arch):
    from gptjax.models import gpt_oss, llama

    if arch == "llama":
        path, mod = write_llama_gguf(tiny_llama(seed=3), tmp_path / "m.gguf"), llama
        fused_names = {"attn_qkv", "ffn_gate_up"}
    else:
        path, mod = write_gpt_oss_gguf(tiny_gpt_oss(seed=3), tmp_path / "m.gguf"), gpt_oss
        fused_names = {"attn_qkv", "ffn_gate_up_exps"}
    gf = read_gguf(path)
    config = ModelConfig.from_gguf(gf)
    plain = load_params_gguf(gf, config, jnp.float32, fuse=False)
    fused = load_params_gguf(gf, config, jnp.float32)                  # the default
    for block in fused["blocks"]:
        assert fused_names <= set(block)
        assert not {p for n in fused_names for p in FUSIONS[n]} & set(block)
    assert jax.tree.structure(fuse_params(plain)) == jax.tree.structure(fused)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)), jnp.int32)
    ref = _logits(mod, plain, config, toks)
    assert rel_err(_logits(mod, fused, config, toks), ref) < FUSED_RTOL


def test_qkv_partials_default_on(monkeypatch):
    """The q/k/v partials path is the default (timed on the H200, fifteenth session); the env
    switch turns it off."""
    monkeypatch.delenv("GPTJAX_QKV_PARTIALS", raising=False)
    assert fused_partials()
    monkeypatch.setenv("GPTJAX_QKV_PARTIALS", "0")
    assert not fused_partials()
