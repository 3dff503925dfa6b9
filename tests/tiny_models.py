"""Tiny random Hugging Face models, written as HF directories and as llama.cpp-layout GGUF files.

Shared by the model tests (GPT-2, llama, gpt-oss). Import from any test
(pytest puts ``tests/`` on ``sys.path``)::

    from tiny_models import tiny_gpt2, save_hf_dir, write_gpt2_gguf, gpt2_gguf_tensors, torch_logits
    from tiny_models import tiny_llama, write_llama_gguf, llama_gguf_tensors
    from tiny_models import tiny_gpt_oss, write_gpt_oss_gguf, save_gpt_oss_mxfp4_dir
    from tiny_models import byte_bpe_tokenizer_metadata, write_harmony_gpt_oss_gguf, ScriptedLM

The reference is always the transformers implementation run with torch on CPU in float32.
Every dimension of the default tiny configs is distinct (equal sizes hide transposed axes).
Weights are re-drawn with a larger spread than the HF init (which zeroes biases and sets norm
weights to one), so that every parameter - biases and norm affines included - moves the logits.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gguf_factory import write_gguf

__all__ = [
    "GPT2_TINY", "randomize_", "tiny_gpt2", "save_hf_dir", "torch_logits", "state_dict_numpy",
    "dummy_tokenizer_metadata", "gpt2_gguf_metadata", "gpt2_gguf_tensors", "write_gpt2_gguf",
    "rel_err", "LLAMA_TINY", "tiny_llama", "llama_cpp_permute", "llama_gguf_metadata",
    "llama_gguf_tensors", "write_llama_gguf", "GPT_OSS_TINY", "GPT_OSS_TINY_ROPE", "FP4_VALUES",
    "mxfp4_quantize", "mxfp4_value", "mxfp4_openai_bytes", "mxfp4_ggml_bytes", "TinyGptOss",
    "tiny_gpt_oss", "gpt_oss_gguf_tensors", "gpt_oss_gguf_metadata", "write_gpt_oss_gguf",
    "save_gpt_oss_mxfp4_dir", "HARMONY_SPECIALS", "CHATML_SPECIALS", "CHAT_WORDS",
    "gpt2_byte_alphabet", "byte_bpe_vocab", "byte_bpe_tokenizer_metadata", "harmony_vocab_size",
    "write_harmony_gpt_oss_gguf", "ScriptedLM",
]

# V 97, P 64, D 48, N 4 (so H 12), L 3, F 80.
GPT2_TINY = dict(vocab_size=97, n_positions=64, n_embd=48, n_head=4, n_layer=3, n_inner=80)


def rel_err(x, ref) -> float:
    """Relative Frobenius-norm error ||x - ref|| / ||ref||, in float64."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def randomize_(model, seed: int = 0, std: float = 0.15) -> None:
    """Redraw every parameter in place: weights N(0, std^2); 1-D parameters of norms
    (names ending in ``ln_*.weight``/``norm.weight``) 1 + N(0, std^2), other 1-D N(0, std^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            is_norm_scale = p.ndim == 1 and name.endswith(".weight")
            p.copy_((1.0 + noise) if is_norm_scale else noise)


def tiny_gpt2(*, tied: bool = True, seed: int = 0, **overrides):
    """A random float32 ``transformers.GPT2LMHeadModel`` in eval mode (dims: GPT2_TINY)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = {**GPT2_TINY, **overrides}
    cfg = GPT2Config(**dims, tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).to(torch.float32).eval()
    randomize_(model, seed)
    if tied:
        model.tie_weights()
    return model


def save_hf_dir(model, dirpath) -> Path:
    """``save_pretrained`` as safetensors (config.json + model.safetensors)."""
    dirpath = Path(dirpath)
    model.save_pretrained(dirpath, safe_serialization=True)
    return dirpath


def torch_logits(model, tokens) -> np.ndarray:
    """float32 [B, T, V] logits of the HF model for int tokens [B, T] (no padding, no cache)."""
    import torch

    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        out = model(input_ids=ids, use_cache=False)
    return out.logits.float().numpy()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """name → float32 numpy copy of every tensor ``save_pretrained`` would write."""
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def dummy_tokenizer_metadata(vocab_size: int, *, bos: int = 0, eos: int = 1) -> dict[str, Any]:
    """A minimal byte-level-BPE tokenizer block (tokens ``t0``, ``t1``, ... ; no merges) so that a
    test GGUF looks like a converter's output; models tests do not tokenize text."""
    from gguf import GGUFValueType as VT

    from gguf_factory import Typed

    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab_size)],
        "tokenizer.ggml.token_type": [1] * vocab_size,
        "tokenizer.ggml.merges": Typed([], VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": bos,
        "tokenizer.ggml.eos_token_id": eos,
    }


# ---- GPT-2 in llama.cpp's GGUF layout (MODEL_FORMATS.md §4; convert_hf_to_gguf GPT2Model) -------

_GPT2_GGUF_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
# HF Conv1D stores [in, out]; the converter transposes these to GGUF's [out, in] rows.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name → float32 array (logical [out, in] shape) as llama.cpp's converter writes them:
    ``transformer.`` dropped, ``h.N.`` → ``blk.N.``, Conv1D weights transposed, the causal-mask
    buffers dropped, ``lm_head.weight`` → ``output.weight`` only for an untied head."""
    tied = bool(model.config.tie_word_embeddings)
    out: dict[str, np.ndarray] = {}
    for name, arr in state_dict_numpy(model).items():
        name = name.removeprefix("transformer.")
        if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
            continue
        if name == "lm_head.weight":
            if not tied:
                out["output.weight"] = arr
            continue
        if name.startswith("h."):
            _, layer, rest = name.split(".", 2)
            if rest in _CONV1D:
                arr = arr.T
            out[f"blk.{layer}.{_GPT2_GGUF_NAMES[rest]}"] = np.ascontiguousarray(arr)
        else:
            out[_GPT2_GGUF_NAMES[name]] = arr
    return out


def gpt2_gguf_metadata(hf_config) -> dict[str, Any]:
    """The ``gpt2.*`` keys convert_hf_to_gguf writes (GPT2Model.set_gguf_parameters) plus a
    dummy tokenizer."""
    d_ff = hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd
    return {
        "general.name": "tiny-gpt2",
        "general.file_type": 0,                     # ALL_F32
        "gpt2.block_count": hf_config.n_layer,
        "gpt2.context_length": hf_config.n_positions,
        "gpt2.embedding_length": hf_config.n_embd,
        "gpt2.feed_forward_length": d_ff,
        "gpt2.attention.head_count": hf_config.n_head,
        "gpt2.attention.layer_norm_epsilon": float(hf_config.layer_norm_epsilon),
        **dummy_tokenizer_metadata(hf_config.vocab_size),
    }


def write_gpt2_gguf(model, path, *, tensors: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a llama.cpp-layout gpt2 GGUF. ``tensors`` / ``metadata`` replace the
    converted ones when given (for tests that plant a broken file)."""
    return write_gguf(path, "gpt2",
                      metadata=gpt2_gguf_metadata(model.config) if metadata is None else metadata,
                      tensors=gpt2_gguf_tensors(model) if tensors is None else tensors)


# ---- llama in llama.cpp's GGUF layout (MODEL_FORMATS.md §5; convert_hf_to_gguf LlamaModel) -------

# V 101, D 48, N 6, K 2 (G 3), H 8, F 80, L 3, context 64.
LLAMA_TINY = dict(vocab_size=101, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=8, intermediate_size=80, num_hidden_layers=3,
                  max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_llama(*, tied: bool = False, seed: int = 0, rope_theta: float = 10000.0,
               rope_scaling: dict | None = None, **overrides):
    """A random float32 ``transformers.LlamaForCausalLM`` in eval mode (dims: LLAMA_TINY).

    ``rope_scaling``: extra ``rope_parameters`` entries (e.g. ``{"rope_type": "linear",
    "factor": 2.0}``); ``overrides`` replace LlamaConfig arguments (``attention_bias=True``...).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {**LLAMA_TINY, **overrides}
    rope = {"rope_type": "default", "rope_theta": float(rope_theta), **(rope_scaling or {})}
    cfg = LlamaConfig(**dims, rope_parameters=rope, tie_word_embeddings=tied,
                      attention_dropout=0.0, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    randomize_(model, seed)
    if tied:
        model.tie_weights()
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row order llama.cpp's converter writes, from the documented per-head rule
    (MODEL_FORMATS.md §5): GGUF row 2i + j of a head = HF row j*(d/2) + i (d = head dim,
    i < d/2, j in {0, 1}). Written as an explicit index table on purpose: it must not share
    code with the loader's inverse."""
    d = w.shape[0] // n_head
    index = np.empty(w.shape[0], np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                index[h * d + 2 * i + j] = h * d + j * (d // 2) + i
    return np.ascontiguousarray(w[index])


_LLAMA_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name → float32 array as llama.cpp's converter writes a LlamaForCausalLM:
    ``model.layers.N.`` → ``blk.N.``, q/k weights and biases permuted (:func:`llama_cpp_permute`
    with the query / kv head counts), ``lm_head.weight`` → ``output.weight`` only when untied."""
    cfg = model.config
    tied = bool(cfg.tie_word_embeddings)
    out: dict[str, np.ndarray] = {}
    for name, arr in state_dict_numpy(model).items():
        if name == "lm_head.weight":
            if not tied:
                out["output.weight"] = arr
            continue
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = arr
            continue
        if name == "model.norm.weight":
            out["output_norm.weight"] = arr
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        layer, module, kind = m.groups()
        if module == "self_attn.q_proj":
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        out[f"blk.{layer}.{_LLAMA_GGUF_LAYER[module]}.{kind}"] = arr
    return out


def llama_gguf_metadata(hf_config) -> dict[str, Any]:
    """The ``llama.*`` keys convert_hf_to_gguf writes (LlamaModel.set_gguf_parameters and the
    generic ones) plus a dummy tokenizer. ``attention.key_length`` only when head_dim is not
    hidden / heads (as the converter does)."""
    c = hf_config
    head_dim = c.head_dim
    md = {
        "general.name": "tiny-llama",
        "general.file_type": 0,                     # ALL_F32
        "llama.block_count": c.num_hidden_layers,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": c.vocab_size,
        **dummy_tokenizer_metadata(c.vocab_size),
    }
    if head_dim * c.num_attention_heads != c.hidden_size:
        md["llama.attention.key_length"] = head_dim
        md["llama.attention.value_length"] = head_dim
    rope = c.rope_parameters
    if rope.get("rope_type", "default") == "linear":
        md["llama.rope.scaling.type"] = "linear"
        md["llama.rope.scaling.factor"] = float(rope["factor"])
    elif rope.get("rope_type", "default") != "default":
        raise ValueError(f"no GGUF writer for rope_type {rope['rope_type']!r} in this helper")
    return md


def write_llama_gguf(model, path, *, tensors: dict[str, Any] | None = None,
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a llama.cpp-layout llama GGUF (``tensors`` / ``metadata`` replace the
    converted ones when given)."""
    return write_gguf(path, "llama",
                      metadata=llama_gguf_metadata(model.config) if metadata is None else metadata,
                      tensors=llama_gguf_tensors(model) if tensors is None else tensors)


# ---- gpt-oss (MODEL_FORMATS.md §1-§3) -----------------------------------------------------------

# V 103, D 96, N 6, K 2 (G 3), H 24 (NH 144, KH 48), E 5, top-2, F 64, L 4, window 8, context 64.
# D and F are multiples of 32: MXFP4 blocks (and Q8_0 blocks) run along the input dim.
GPT_OSS_TINY = dict(vocab_size=103, hidden_size=96, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                    num_local_experts=5, num_experts_per_tok=2, sliding_window=8,
                    max_position_embeddings=64, rms_norm_eps=1e-5)
# YaRN with theta 500, factor 4, original context 16 and beta 1 / 0.0625 puts the ramp at
# low = 1.80, high = 7.16 over the 12 frequencies: interior and non-integer, so llama.cpp's
# truncation (1 / 8) would change the result. (gpt-oss's own 32 / 1 would clamp it to [0, 0.6]
# at this head dim.) All values are exact in float32, so the GGUF keys read back identical.
GPT_OSS_TINY_ROPE = dict(rope_type="yarn", rope_theta=500.0, factor=4.0,
                         original_max_position_embeddings=16, beta_fast=1.0, beta_slow=0.0625,
                         truncate=False)

# E2M1 values of the 16 FP4 codes (OCP MX v1.0; OpenAI FP4_VALUES; MODEL_FORMATS.md §3.1).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float64)


def mxfp4_quantize(w):
    """Round w [..., I] (I a multiple of 32) to MXFP4: (codes uint8 [..., I/32, 32], scales uint8
    [..., I/32]). Per block of 32 the E8M0 scale 2^(s - 127) is the smallest power of two that
    maps the largest magnitude to at most 6; values round to the nearest E2M1 grid point."""
    w = np.asarray(w, np.float64)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(blocks).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0)
    scales = np.clip(exp + 127, 1, 254).astype(np.uint8)
    q = blocks / np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    idx = np.abs(np.abs(q)[..., None] - FP4_VALUES[:8]).argmin(axis=-1)
    return (idx + 8 * (q < 0)).astype(np.uint8), scales


def mxfp4_value(codes, scales):
    """float32 [..., G*32] of MXFP4 codes [..., G, 32] and E8M0 scales [..., G]:
    ``FP4[c] * 2^(s - 127)`` (OpenAI ``_get_mxfp4_tensor``; computed exactly in float64)."""
    v = FP4_VALUES[codes] * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return v.reshape(*codes.shape[:-2], -1).astype(np.float32)


def mxfp4_openai_bytes(codes):
    """OpenAI/HF ``*_blocks`` uint8 [..., G, 16]: byte k = code 2k (low nibble) | code 2k+1 << 4
    (MODEL_FORMATS.md §3.2)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def mxfp4_ggml_bytes(codes, scales):
    """ggml ``block_mxfp4`` rows uint8 [..., G*17]: per block [scale][qs 16] with
    qs[j] = code j (low nibble) | code j+16 << 4 (MODEL_FORMATS.md §3.3)."""
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    b = np.concatenate([scales[..., None], qs], axis=-1)
    return np.ascontiguousarray(b.reshape(*b.shape[:-2], -1))


class TinyGptOss:
    """A tiny random ``GptOssForCausalLM`` plus the quantized forms of its weights.

    ``model``: float32, eager attention and experts (the reference). Its expert matrices are
    exactly MXFP4-representable and, with ``q8``, its embeddings, head and q/k/v weights are
    exactly Q8_0-representable, so transformers runs on the very values the files hold.
    ``experts[l] = {"gate_up": (codes, scales), "down": (codes, scales)}`` in OpenAI row order
    ([E, 2F, D/32, 32] with gate/up rows interleaved; [E, D, F/32, 32]).
    ``q8[hf_name] = uint8 Q8_0 rows`` of the tensors stored as Q8_0 in the GGUF.
    """

    def __init__(self, model, experts, q8):
        self.model, self.experts, self.q8 = model, experts, q8

    @property
    def config(self):
        return self.model.config


_Q8_TENSORS = re.compile(r"model\.embed_tokens\.weight|lm_head\.weight|"
                         r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight")


def tiny_gpt_oss(*, seed: int = 0, expert_std: float = 0.35, q8: bool = True,
                 **overrides) -> TinyGptOss:
    """A :class:`TinyGptOss` (dims GPT_OSS_TINY, rope GPT_OSS_TINY_ROPE). Expert weights are
    drawn N(0, expert_std^2) (large enough that some gate/up pre-activations pass the +-7 clamp)
    then rounded to MXFP4; the rest as :func:`randomize_`."""
    import gguf.quants
    import torch
    from gguf import GGMLQuantizationType as Q
    from transformers import GptOssConfig, GptOssForCausalLM

    dims = {**GPT_OSS_TINY, **overrides}
    # no bos/eos ids: greedy generation in transformers then never stops early (nor
    # suppresses a token as "eos" before min_new_tokens), like a plain argmax loop
    cfg = GptOssConfig(**dims, rope_parameters=dict(GPT_OSS_TINY_ROPE), attention_dropout=0.0,
                       attn_implementation="eager")
    torch.manual_seed(seed)
    model = GptOssForCausalLM(cfg).to(torch.float32).eval()
    model.config._experts_implementation = "eager"       # the readable per-expert loop
    randomize_(model, seed)
    rng = np.random.default_rng(seed)
    experts, q8_rows = [], {}
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            E, D, F2 = ex.gate_up_proj.shape
            gate_up = mxfp4_quantize(rng.normal(0, expert_std, (E, F2, D)))   # [E, 2F, D]
            down = mxfp4_quantize(rng.normal(0, expert_std, (E, D, F2 // 2)))  # [E, D, F]
            # HF keeps them transposed, [E, in, out], used as x @ W
            ex.gate_up_proj.copy_(torch.from_numpy(mxfp4_value(*gate_up).transpose(0, 2, 1).copy()))
            ex.down_proj.copy_(torch.from_numpy(mxfp4_value(*down).transpose(0, 2, 1).copy()))
            experts.append({"gate_up": gate_up, "down": down})
        if q8:
            for name, p in model.named_parameters():
                if _Q8_TENSORS.fullmatch(name):
                    rows = gguf.quants.quantize(p.detach().numpy(), Q.Q8_0)
                    q8_rows[name] = rows
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(rows, Q.Q8_0).copy()))
    return TinyGptOss(model, experts, q8_rows)


_GPT_OSS_GGUF_LAYER = {   # HF module under model.layers.N. → GGUF role (MODEL_FORMATS.md §2.2)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.sinks": "attn_sinks", "post_attention_layernorm": "post_attention_norm",
    "mlp.router": "ffn_gate_inp",
}


def gpt_oss_gguf_tensors(tiny: TinyGptOss, *, fused: bool = False) -> dict[str, Any]:
    """GGUF name → array or (raw bytes, ggml type, shape) as llama.cpp's converter writes a
    gpt-oss checkpoint (CONV-gptoss): experts de-interleaved into ``ffn_gate_exps`` /
    ``ffn_up_exps`` (rows 0::2 / 1::2) and ``ffn_down_exps``, MXFP4 [E, out, in] in ggml's block
    layout, biases F32; ``attn_sinks.weight``; Q8_0 for the tensors of ``tiny.q8``.
    ``fused``: one ``ffn_gate_up_exps`` tensor, gate rows then up rows (the converter's
    ``fuse_gate_up_exps`` option)."""
    from gguf import GGMLQuantizationType as Q

    cfg = tiny.config
    E, F, D = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    out: dict[str, Any] = {}

    def put(gguf_name, hf_name, arr):
        if hf_name in tiny.q8:
            out[gguf_name] = (tiny.q8[hf_name], Q.Q8_0, arr.shape)
        else:
            out[gguf_name] = np.ascontiguousarray(arr)

    for name, arr in state_dict_numpy(tiny.model).items():
        if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "lm_head.weight": "output.weight", "model.norm.weight": "output_norm.weight"}
            put(gname[name], name, arr)
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?", name)
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3) or "weight"
        blk = f"blk.{layer}."
        if module == "mlp.experts.gate_up_proj_bias":
            if fused:
                out[blk + "ffn_gate_up_exps.bias"] = np.concatenate([arr[:, 0::2], arr[:, 1::2]], 1)
            else:
                out[blk + "ffn_gate_exps.bias"] = np.ascontiguousarray(arr[:, 0::2])
                out[blk + "ffn_up_exps.bias"] = np.ascontiguousarray(arr[:, 1::2])
        elif module == "mlp.experts.down_proj_bias":
            out[blk + "ffn_down_exps.bias"] = arr
        elif module == "mlp.experts.gate_up_proj":
            codes, scales = tiny.experts[layer]["gate_up"]
            gate = mxfp4_ggml_bytes(codes[:, 0::2], scales[:, 0::2])           # [E, F, D/32*17]
            up = mxfp4_ggml_bytes(codes[:, 1::2], scales[:, 1::2])
            if fused:
                out[blk + "ffn_gate_up_exps.weight"] = (np.concatenate([gate, up], 1), Q.MXFP4,
                                                        (E, 2 * F, D))
            else:
                out[blk + "ffn_gate_exps.weight"] = (gate, Q.MXFP4, (E, F, D))
                out[blk + "ffn_up_exps.weight"] = (up, Q.MXFP4, (E, F, D))
        elif module == "mlp.experts.down_proj":
            out[blk + "ffn_down_exps.weight"] = (mxfp4_ggml_bytes(*tiny.experts[layer]["down"]),
                                                 Q.MXFP4, (E, D, F))
        else:
            put(f"{blk}{_GPT_OSS_GGUF_LAYER[module]}.{kind}", name, arr)
    return out


def gpt_oss_gguf_metadata(hf_config) -> dict[str, Any]:
    """The ``gpt-oss.*`` keys llama.cpp's converter writes (MODEL_FORMATS.md §2.1), the YaRN
    betas (not written for the real model, whose 32 / 1 are llama.cpp's defaults) and a dummy
    tokenizer."""
    c = hf_config
    rope = c.rope_parameters
    return {
        "general.name": "tiny-gpt-oss",
        "general.file_type": 38,                    # MOSTLY_MXFP4_MOE
        "gpt-oss.block_count": c.num_hidden_layers,
        "gpt-oss.context_length": c.max_position_embeddings,
        "gpt-oss.embedding_length": c.hidden_size,
        "gpt-oss.feed_forward_length": c.intermediate_size,
        "gpt-oss.attention.head_count": c.num_attention_heads,
        "gpt-oss.attention.head_count_kv": c.num_key_value_heads,
        "gpt-oss.rope.freq_base": float(rope["rope_theta"]),
        "gpt-oss.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "gpt-oss.expert_count": c.num_local_experts,
        "gpt-oss.expert_used_count": c.num_experts_per_tok,
        "gpt-oss.attention.key_length": c.head_dim,
        "gpt-oss.attention.value_length": c.head_dim,
        "gpt-oss.attention.sliding_window": c.sliding_window,
        "gpt-oss.expert_feed_forward_length": c.intermediate_size,
        "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": float(rope["factor"]),
        "gpt-oss.rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        "gpt-oss.rope.scaling.yarn_beta_fast": float(rope["beta_fast"]),
        "gpt-oss.rope.scaling.yarn_beta_slow": float(rope["beta_slow"]),
        **dummy_tokenizer_metadata(c.vocab_size),
    }


def write_gpt_oss_gguf(tiny: TinyGptOss, path, *, fused: bool = False,
                       tensors: dict[str, Any] | None = None,
                       metadata: dict[str, Any] | None = None) -> Path:
    """Write ``tiny`` as a llama.cpp-layout gpt-oss GGUF (MXFP4 experts; see
    :func:`gpt_oss_gguf_tensors`). ``tensors`` / ``metadata`` replace the converted ones."""
    return write_gguf(path, "gpt-oss",
                      metadata=gpt_oss_gguf_metadata(tiny.config) if metadata is None else metadata,
                      tensors=gpt_oss_gguf_tensors(tiny, fused=fused) if tensors is None
                      else tensors)


def save_gpt_oss_mxfp4_dir(tiny: TinyGptOss, dirpath, *, drop: tuple[str, ...] = ()) -> Path:
    """An HF directory in OpenAI's hub layout (MODEL_FORMATS.md §1.7): ``config.json`` with
    ``quantization_config`` mxfp4 and ``model.safetensors`` whose experts are
    ``gate_up_proj_blocks`` [E, 2F, D/32, 16] / ``_scales`` [E, 2F, D/32] (rows interleaved
    gate/up), ``down_proj_blocks`` / ``_scales`` and float biases; everything else as
    ``save_pretrained`` writes it. ``drop``: tensor names to leave out (for audit tests)."""
    from safetensors.numpy import save_file

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, arr in state_dict_numpy(tiny.model).items():
        m = re.fullmatch(r"(model\.layers\.(\d+)\.mlp\.experts\.)(gate_up_proj|down_proj)", name)
        if m:
            codes, scales = tiny.experts[int(m.group(2))][m.group(3).removesuffix("_proj")]
            tensors[name + "_blocks"] = mxfp4_openai_bytes(codes)
            tensors[name + "_scales"] = np.ascontiguousarray(scales)
        else:
            tensors[name] = arr
    for name in drop:
        del tensors[name]
    save_file(tensors, str(dirpath / "model.safetensors"))
    config = tiny.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    (dirpath / "config.json").write_text(json.dumps(config, indent=2))
    return dirpath


# ---- byte-level BPE vocabularies with chat special tokens (chat tests) -------------------------

#: The harmony special tokens of o200k_harmony (MODEL_FORMATS.md §7), CONTROL in the GGUF.
HARMONY_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>",
                    "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>")
#: SmolLM2-style ChatML specials.
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Words whose BPE merges the chat vocabularies carry (letters only: dates and other digits stay
#: one byte token per digit, so a prompt's token count does not depend on the day).
CHAT_WORDS = ("Paris", " Paris", "analysis", "assistant", "final", "commentary", "functions",
              " the", " is", "user", "system")


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order (``encoder.py``
    ``bytes_to_unicode``): the printable Latin-1 bytes '!'..'~', '¡'..'¬', '®'..'ÿ' stand for
    themselves, the other 68 bytes, in byte order, for U+0100, U+0101, ..."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return out


def byte_bpe_vocab(words=CHAT_WORDS, specials=HARMONY_SPECIALS):
    """(tokens, merges, token_types) of a small byte-level BPE vocabulary: the 256 byte tokens in
    byte order (NORMAL), then one token per merge, which build each word of ``words`` left to
    right ("P a", "Pa r", ...; ranks in that order), then ``specials`` (CONTROL)."""
    alphabet = gpt2_byte_alphabet()
    tokens, merges = list(alphabet), []
    known = set(tokens)
    for word in words:
        chars = [alphabet[b] for b in word.encode("utf-8")]
        left = chars[0]
        for c in chars[1:]:
            if left + c not in known:
                merges.append(f"{left} {c}")
                tokens.append(left + c)
                known.add(left + c)
            left += c
    types = [1] * len(tokens) + [3] * len(specials)
    return tokens + list(specials), merges, types


def byte_bpe_tokenizer_metadata(words=CHAT_WORDS, specials=HARMONY_SPECIALS, *, pre: str = "gpt-4o",
                                bos: str | None = None, eos: str | None = None,
                                pad: str | None = None, chat_template: str | None = None
                                ) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys of :func:`byte_bpe_vocab` (``tokenizer.ggml.model`` "gpt2");
    ``bos`` / ``eos`` / ``pad`` name tokens; ``chat_template`` is written when given."""
    tokens, merges, types = byte_bpe_vocab(words, specials)
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, name in (("bos_token_id", bos), ("eos_token_id", eos), ("padding_token_id", pad)):
        if name is not None:
            md[f"tokenizer.ggml.{key}"] = tokens.index(name)
    if chat_template is not None:
        md["tokenizer.chat_template"] = chat_template
    return md


def harmony_vocab_size() -> int:
    """Size of the harmony test vocabulary (bytes + CHAT_WORDS merges + HARMONY_SPECIALS)."""
    return len(byte_bpe_vocab(CHAT_WORDS, HARMONY_SPECIALS)[0])


def write_harmony_gpt_oss_gguf(tiny: TinyGptOss, path, *, chat_template: str | None = None) -> Path:
    """``tiny`` (built with ``vocab_size=harmony_vocab_size()``) as a gpt-oss GGUF whose tokenizer
    is the harmony test vocabulary, set up as the real gpt-oss GGUF is (MODEL_FORMATS.md §2.1):
    pre "gpt-4o", bos <|startoftext|>, eos <|return|>, padding <|endoftext|>."""
    if tiny.config.vocab_size != harmony_vocab_size():
        raise ValueError(f"tiny gpt-oss vocab_size {tiny.config.vocab_size} != harmony vocabulary "
                         f"{harmony_vocab_size()}: build it with vocab_size=harmony_vocab_size()")
    md = {k: v for k, v in gpt_oss_gguf_metadata(tiny.config).items()
          if not k.startswith("tokenizer.")}
    md.update(byte_bpe_tokenizer_metadata(CHAT_WORDS, HARMONY_SPECIALS, bos="<|startoftext|>",
                                          eos="<|return|>", pad="<|endoftext|>",
                                          chat_template=chat_template))
    return write_gpt_oss_gguf(tiny, path, metadata=md)


# ---- a scripted stand-in for an architecture module (chat tests) -------------------------------

class ScriptedLM:
    """Wraps an architecture module (``forward`` / ``unembed``, docs/INTERFACES.md "Models") so
    that greedy decoding produces a chosen token sequence.

    ``script`` maps an absolute position p to the token id that must follow the token at p - 1:
    ``forward`` runs the real forward (real cache, real shapes), then adds ``FORCE`` to the logit
    of ``script[p + 1]`` for the token at position p (nothing where the script has no entry).
    With ``run_real=False`` the real logits are zeros and the cache is returned untouched (no
    model compilation at all).  The scripted ids come from the host through ``jax.pure_callback``,
    so one compilation serves every script; the callback also records the last prompt it saw
    (a call with start 0 and more than one token: prefill) in ``last_prefill``.

    ``unembed`` is the identity and ``forward(..., return_hidden=True)`` returns the logits, so a
    Generator that unembeds only the last position sees the same numbers.
    Install it with ``module(name)`` + ``gptjax.api.ARCHITECTURES[arch] = name`` (the API's data
    table of architecture modules) and ``sys.modules[name] = module``.
    """

    FORCE = 1.0e4

    def __init__(self, real_module: str, *, run_real: bool = True):
        import importlib

        self.real = importlib.import_module(real_module)
        self.run_real = run_real
        self.script: dict[int, int] = {}
        self.last_prefill: np.ndarray | None = None

    def set_script(self, prompt_len: int, ids, *, clear: bool = True) -> None:
        """The reply ``ids`` right after a prompt of ``prompt_len`` tokens (positions
        prompt_len, prompt_len + 1, ...)."""
        if clear:
            self.script = {}
        self.script.update({prompt_len + k: int(t) for k, t in enumerate(ids)})

    def _forced(self, tokens, start):
        tokens, start = np.asarray(tokens), np.asarray(start)
        if tokens.shape[1] > 1 and not start.any():
            self.last_prefill = tokens.copy()
        nxt = start[:, None] + np.arange(tokens.shape[1])[None, :] + 1       # [B, T]
        return np.vectorize(lambda p: self.script.get(int(p), -1), otypes=[np.int32])(nxt)

    def forward(self, params, tokens, start, cache, config, *, return_hidden=False):
        import jax
        import jax.numpy as jnp

        b, t = tokens.shape
        if self.run_real:
            logits, cache = self.real.forward(params, tokens, start, cache, config)   # [B, T, V]
        else:
            logits = jnp.zeros((b, t, config.vocab_size), jnp.float32)
        forced = jax.pure_callback(self._forced, jax.ShapeDtypeStruct((b, t), jnp.int32),
                                   tokens, start)
        return logits + self.FORCE * jax.nn.one_hot(forced, config.vocab_size, dtype=jnp.float32), cache

    @staticmethod
    def unembed(params, hidden):
        return hidden

    def module(self, name: str):
        """A module object exposing ``forward`` and ``unembed`` (for sys.modules[name])."""
        import types

        mod = types.ModuleType(name)
        mod.forward, mod.unembed = self.forward, self.unembed
        return mod
