"""Synthetic-weight GGUF files at real sizes and in real layouts, for speed measurements.

Values do not change speed, so every tensor is random bytes with small finite scales
(PERFORMANCE.md "How we measure"): Q8_0 / Q4_0 / Q4_1 blocks with f16 scales around 1e-3..1e-2,
MXFP4 blocks with exponent bytes 118..122, float tensors N(0, 0.02) (norm weights 1).  The tensor
list comes from gptjax.config.expected_tensors, so the file is exactly what the loader expects.

    python benchmarks/synthetic_gguf.py smollm2 /tmp/smollm2-synthetic.gguf
    python benchmarks/synthetic_gguf.py gpt-oss-20b /tmp/gpt-oss-20b-synthetic.gguf
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import gguf
import numpy as np

from gptjax.config import ModelConfig, expected_tensors

T = gguf.GGMLQuantizationType

# Full-size metadata (MODEL_FORMATS.md §2.1, §5; the real SmolLM2 file's keys).
METADATA = {
    "smollm2": {
        "general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
        "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
        "llama.rope.dimension_count": 64,
    },
    "gpt-oss-20b": {
        "general.architecture": "gpt-oss", "gpt-oss.block_count": 24, "gpt-oss.context_length": 131072,
        "gpt-oss.embedding_length": 2880, "gpt-oss.feed_forward_length": 2880,
        "gpt-oss.attention.head_count": 64, "gpt-oss.attention.head_count_kv": 8,
        "gpt-oss.rope.freq_base": 150000.0, "gpt-oss.attention.layer_norm_rms_epsilon": 1e-5,
        "gpt-oss.expert_count": 32, "gpt-oss.expert_used_count": 4, "gpt-oss.attention.key_length": 64,
        "gpt-oss.attention.value_length": 64, "gpt-oss.attention.sliding_window": 128,
        "gpt-oss.expert_feed_forward_length": 2880, "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096,
        "gpt-oss.vocab_size": 201088,
    },
}
# The 20b layout at toy sizes: a CPU smoke test of the benchmark before spending device time.
METADATA["gpt-oss-toy"] = {**METADATA["gpt-oss-20b"], "gpt-oss.block_count": 2, "gpt-oss.embedding_length": 256,
                           "gpt-oss.feed_forward_length": 256, "gpt-oss.expert_feed_forward_length": 256,
                           "gpt-oss.attention.head_count": 8, "gpt-oss.attention.head_count_kv": 2,
                           "gpt-oss.vocab_size": 1024, "gpt-oss.context_length": 4096}

TIED = {"smollm2"}

_GPT_OSS_Q8 = {"token_embd.weight", "output.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
               "attn_output.weight"}

# Tensor type by role (the name without "blk.N."), as the real files store them.
TYPES = {
    "smollm2": lambda role: T.Q8_0 if role == "token_embd.weight" else T.F32 if "norm" in role else T.Q4_1,
    # ggml-org's gpt-oss-20b GGUF: MXFP4 experts, Q8_0 attention/embeddings/output, F32 rest.
    "gpt-oss-toy": lambda role: (T.MXFP4 if role.endswith("_exps.weight") else T.Q8_0 if role in _GPT_OSS_Q8 else T.F32),
    "gpt-oss-20b": lambda role: (T.MXFP4 if role.endswith("_exps.weight") else T.Q8_0 if role in _GPT_OSS_Q8 else T.F32),
}


def random_tensor(shape: tuple[int, ...], qtype: int, rng: np.random.Generator, *, is_norm: bool) -> np.ndarray:
    """Raw bytes [..., row_bytes] (quantized) or a float32 array (F32)."""
    if qtype == T.F32:
        return (np.ones(shape, np.float32) if is_norm
                else (rng.standard_normal(shape, dtype=np.float32) * 0.02))
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_elems
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    scale = lambda: rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.Q8_0:
        raw[:, 0:2] = scale()
    elif qtype == T.Q4_0:
        raw[:, 0:2] = scale()
    elif qtype == T.Q4_1:
        raw[:, 0:2] = scale()
        raw[:, 2:4] = (-rng.uniform(1e-3, 1e-2, n_blocks)).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    elif qtype == T.MXFP4:
        raw[:, 0] = rng.integers(118, 123, n_blocks, dtype=np.uint8)
    else:
        raise NotImplementedError(f"synthetic {qtype.name} blocks")
    return raw.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def write(model: str, path: str, seed: int = 0) -> ModelConfig:
    md = METADATA[model]
    arch = md["general.architecture"]
    config = ModelConfig.from_gguf_metadata(md, source=f"{model} (synthetic)")
    w = gguf.GGUFWriter(path, arch)
    for k, v in md.items():
        if k == "general.architecture":
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    rng = np.random.default_rng(seed)
    for name, shape in expected_tensors(config).items():
        if name == "output.weight" and model in TIED:
            continue                        # tied head: the loader falls back to token_embd
        role = name.split(".", 2)[2] if name.startswith("blk.") else name
        qtype = TYPES[model](role)
        data = random_tensor(tuple(shape), qtype, rng, is_norm="norm" in role)
        if qtype == T.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config


def cached(model: str) -> str:
    """Path of ``{tempdir}/{model}-synthetic.gguf``, written by :func:`write` (seed 0) unless it
    exists: the benchmarks share one file per model."""
    path = os.path.join(tempfile.gettempdir(), f"{model}-synthetic.gguf")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        write(model, path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def random_prompt(model, seed: int = 0):
    """``n -> n`` random token ids of a loaded model's vocabulary (one numpy generator per call
    of this function, so a script's prompts are the same run to run)."""
    rng, V = np.random.default_rng(seed), model.config.vocab_size
    return lambda n: [int(t) for t in rng.integers(0, V, n)]


if __name__ == "__main__":
    write(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}")
