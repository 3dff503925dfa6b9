"""Tiny random Hugging Face models, written as HF directories and as llama.cpp-layout GGUF files.

Shared by the model tests (GPT-2, llama; gpt-oss later). Import from any test
(pytest puts ``tests/`` on ``sys.path``)::

    from tiny_models import tiny_gpt2, save_hf_dir, write_gpt2_gguf, gpt2_gguf_tensors, torch_logits
    from tiny_models import tiny_llama, write_llama_gguf, llama_gguf_tensors

The reference is always the transformers implementation run with torch on CPU in float32.
Every dimension of the default tiny configs is distinct (equal sizes hide transposed axes).
Weights are re-drawn with a larger spread than the HF init (which zeroes biases and sets norm
weights to one), so that every parameter - biases and norm affines included - moves the logits.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from gguf_factory import write_gguf

__all__ = [
    "GPT2_TINY", "randomize_", "tiny_gpt2", "save_hf_dir", "torch_logits", "state_dict_numpy",
    "dummy_tokenizer_metadata", "gpt2_gguf_metadata", "gpt2_gguf_tensors", "write_gpt2_gguf",
    "rel_err", "LLAMA_TINY", "tiny_llama", "llama_cpp_permute", "llama_gguf_metadata",
    "llama_gguf_tensors", "write_llama_gguf",
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
