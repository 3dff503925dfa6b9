"""Model hyper-parameters: :class:`ModelConfig`, read from GGUF metadata or a Hugging Face config.json.

Supported architectures (GGUF ``general.architecture`` / HF ``model_type``):

=========  ==========  =====================================================================
GGUF       HF          what it is
=========  ==========  =====================================================================
gpt2       gpt2        LayerNorm, learned absolute positions, GELU (tanh) MLP, fused qkv
llama      llama       RMSNorm, RoPE (GGUF q/k permuted for adjacent pairs), SwiGLU MLP, GQA
gpt-oss    gpt_oss     RMSNorm, RoPE+YaRN (half-split), GQA with sinks, alternating 128-token
                       sliding window, top-4 MoE with clamped SwiGLU
=========  ==========  =====================================================================

The key names and defaults follow the writers and readers of each format: llama.cpp's converter
(``conversion/{gpt2,llama,gpt_oss}.py``) and loader (``src/llama-model.cpp``, ``llama-hparams``),
``gguf.constants.Keys`` for the GGUF key strings, and transformers' ``GPT2Config``,
``LlamaConfig`` and ``GptOssConfig`` for config.json (facts gathered in
docs ``shared/reference/MODEL_FORMATS.md`` §1, §2, §4, §5).

A :class:`ModelConfig` validates itself in ``__post_init__``, so variants made with
``dataclasses.replace`` are checked too. Errors are :class:`~gptjax.errors.ConfigError` (missing,
mistyped, out-of-range or inconsistent values) or :class:`~gptjax.errors.UnsupportedModelError`
(a valid model this package cannot run); each names the file and the key.

Tensor shapes are logical numpy order (outermost first, i.e. ``[out, in]`` for a matrix), the
reverse of ggml's ``ne``. Axis letters as in docs/INTERFACES.md.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import gguf
import numpy as np

from gptjax.errors import ConfigError, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHS",
    "HF_MODEL_TYPES",
    "ModelConfig",
    "RopeScaling",
    "MemoryEstimate",
    "TensorSpec",
    "TENSOR_TABLES",
    "expected_tensors",
    "tensor_role",
    "tensor_types_by_role",
    "ggml_type",
    "tensor_nbytes",
]

SUPPORTED_ARCHS = ("gpt2", "llama", "gpt-oss")
# HF config.json ``model_type`` -> GGUF architecture name.
HF_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "gpt_oss": "gpt-oss"}

# Inclusive sane ranges of the integer fields. The upper bounds are far above any released model
# (largest vocabularies ~262k, widest d_model ~25k, deepest ~126 layers); they catch garbage such
# as a u32 -1 or a byte-swapped value, not unusual but real models.
_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "d_model": (1, 1 << 17),
    "n_layers": (1, 1 << 12),
    "n_heads": (1, 1 << 12),
    "n_kv_heads": (1, 1 << 12),
    "head_dim": (1, 1 << 12),
    "d_ff": (1, 1 << 20),
    "context_length": (1, 1 << 24),
    "n_experts": (0, 1 << 14),
    "n_experts_used": (0, 1 << 14),
    "expert_d_ff": (0, 1 << 20),
    "sliding_window": (0, 1 << 24),
    "rope_dim": (1, 1 << 12),
}

ROPE_SCALING_TYPES = ("linear", "yarn")  # plus "none", which is stored as rope_scaling=None

# Per-arch facts that are not stored in the files (llama.cpp ``llama_model_rope_type``, the
# reference implementations): see the properties of ModelConfig.
_ROPE_TYPE = {"gpt2": "none", "llama": "norm", "gpt-oss": "neox"}
_NORM_TYPE = {"gpt2": "layernorm", "llama": "rmsnorm", "gpt-oss": "rmsnorm"}
_ACTIVATION = {"gpt2": "gelu_tanh", "llama": "silu_glu", "gpt-oss": "swiglu_oai"}

_DTYPE_BYTES = {
    "float32": 4, "f32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "f16": 2, "fp16": 2, "half": 2,
    "int8": 1, "uint8": 1, "q8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1,
}
_GGML_ALIASES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
                 "bfloat16": "BF16"}


# --------------------------------------------------------------------------------------------
# RoPE scaling
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RopeScaling:
    """Context-extension settings of RoPE (``None`` on the config means plain RoPE).

    linear: every inverse frequency is divided by ``factor`` (position interpolation).

    yarn (Peng et al. 2023, "YaRN", arXiv:2309.00071; OpenAI gpt-oss ``torch/model.py``
    ``_compute_concentration_and_inv_freq``; transformers ``_compute_yarn_parameters``), with
    d = rope dim, L0 = ``original_context``, i = 0..d/2-1::

        low  = (d/2) ln(L0 / (beta_fast 2 pi)) / ln(theta)    (floor(low) if truncate)
        high = (d/2) ln(L0 / (beta_slow 2 pi)) / ln(theta)    (ceil(high) if truncate)
        mask_i   = 1 - clamp((i - low) / (high - low), 0, 1)
        inv_freq = theta^(-2i/d) / factor * (1 - mask_i) + theta^(-2i/d) * mask_i
        cos, sin multiplied by mscale = attention_factor or 0.1 ln(factor) + 1

    ``truncate=False`` is the OpenAI/HF gpt-oss ramp (low 8.09, high 17.40 for gpt-oss);
    llama.cpp always truncates (``ggml_rope_yarn_corr_dims``: 8 and 18).
    """

    type: str
    factor: float
    original_context: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False
    attention_factor: float | None = None

    @property
    def mscale(self) -> float:
        """Multiplier of cos and sin: YaRN's ``0.1 ln(factor) + 1`` (1.346574 for gpt-oss's 32)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0


# --------------------------------------------------------------------------------------------
# Expected tensors: one data table per architecture
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an architecture's GGUF layout.

    ``name`` has ``{i}`` for the layer index; ``shape`` is logical numpy order written with the
    dimension symbols of :func:`_dims`; ``when`` is None (always present) or the name of a
    boolean condition of :func:`_conditions` ("untied", "attn_bias", "mlp_bias").
    """

    name: str
    shape: tuple[str, ...]
    when: str | None = None


def _T(name: str, *shape: str, when: str | None = None) -> TensorSpec:
    return TensorSpec(name, tuple(shape), when)


# Sources: GGUF-py MODEL_TENSORS and llama.cpp loaders (LC-gpt2, LC-llama, LC-openai-moe), shapes
# in numpy order = reversed ggml ne (MODEL_FORMATS §2.2, §4, §5).
TENSOR_TABLES: dict[str, tuple[TensorSpec, ...]] = {
    "gpt2": (
        _T("token_embd.weight", "V", "D"),
        _T("position_embd.weight", "C", "D"),
        _T("blk.{i}.attn_norm.weight", "D"),
        _T("blk.{i}.attn_norm.bias", "D"),
        _T("blk.{i}.attn_qkv.weight", "QKV", "D"),     # rows: q | k | v
        _T("blk.{i}.attn_qkv.bias", "QKV"),
        _T("blk.{i}.attn_output.weight", "D", "NH"),
        _T("blk.{i}.attn_output.bias", "D"),
        _T("blk.{i}.ffn_norm.weight", "D"),
        _T("blk.{i}.ffn_norm.bias", "D"),
        _T("blk.{i}.ffn_up.weight", "F", "D"),
        _T("blk.{i}.ffn_up.bias", "F"),
        _T("blk.{i}.ffn_down.weight", "D", "F"),
        _T("blk.{i}.ffn_down.bias", "D"),
        _T("output_norm.weight", "D"),
        _T("output_norm.bias", "D"),
        _T("output.weight", "V", "D", when="untied"),
    ),
    "llama": (
        _T("token_embd.weight", "V", "D"),
        _T("blk.{i}.attn_norm.weight", "D"),
        _T("blk.{i}.attn_q.weight", "NH", "D"),
        _T("blk.{i}.attn_q.bias", "NH", when="attn_bias"),
        _T("blk.{i}.attn_k.weight", "KH", "D"),
        _T("blk.{i}.attn_k.bias", "KH", when="attn_bias"),
        _T("blk.{i}.attn_v.weight", "KH", "D"),
        _T("blk.{i}.attn_v.bias", "KH", when="attn_bias"),
        _T("blk.{i}.attn_output.weight", "D", "NH"),
        _T("blk.{i}.attn_output.bias", "D", when="attn_bias"),
        _T("blk.{i}.ffn_norm.weight", "D"),
        _T("blk.{i}.ffn_gate.weight", "F", "D"),
        _T("blk.{i}.ffn_gate.bias", "F", when="mlp_bias"),
        _T("blk.{i}.ffn_up.weight", "F", "D"),
        _T("blk.{i}.ffn_up.bias", "F", when="mlp_bias"),
        _T("blk.{i}.ffn_down.weight", "D", "F"),
        _T("blk.{i}.ffn_down.bias", "D", when="mlp_bias"),
        _T("output_norm.weight", "D"),
        _T("output.weight", "V", "D", when="untied"),
    ),
    "gpt-oss": (
        _T("token_embd.weight", "V", "D"),
        _T("blk.{i}.attn_norm.weight", "D"),
        _T("blk.{i}.attn_q.weight", "NH", "D"),
        _T("blk.{i}.attn_q.bias", "NH"),
        _T("blk.{i}.attn_k.weight", "KH", "D"),
        _T("blk.{i}.attn_k.bias", "KH"),
        _T("blk.{i}.attn_v.weight", "KH", "D"),
        _T("blk.{i}.attn_v.bias", "KH"),
        _T("blk.{i}.attn_output.weight", "D", "NH"),
        _T("blk.{i}.attn_output.bias", "D"),
        _T("blk.{i}.attn_sinks.weight", "N"),           # one logit per QUERY head
        _T("blk.{i}.post_attention_norm.weight", "D"),  # the pre-MoE RMSNorm
        _T("blk.{i}.ffn_gate_inp.weight", "E", "D"),    # router
        _T("blk.{i}.ffn_gate_inp.bias", "E"),
        _T("blk.{i}.ffn_gate_exps.weight", "E", "FE", "D"),
        _T("blk.{i}.ffn_gate_exps.bias", "E", "FE"),
        _T("blk.{i}.ffn_up_exps.weight", "E", "FE", "D"),
        _T("blk.{i}.ffn_up_exps.bias", "E", "FE"),
        _T("blk.{i}.ffn_down_exps.weight", "E", "D", "FE"),
        _T("blk.{i}.ffn_down_exps.bias", "E", "D"),
        _T("output_norm.weight", "D"),
        _T("output.weight", "V", "D", when="untied"),
    ),
}


def _dims(config: ModelConfig) -> dict[str, int]:
    """Values of the shape symbols of TENSOR_TABLES (axis letters of docs/INTERFACES.md):
    V vocab, D model dim, C context_length (rows of gpt2's position table), F ffn dim, N query
    heads, NH = N*H, KH = K*H, QKV = N*H + 2*K*H (gpt2's fused projection), E experts,
    FE expert ffn dim."""
    return {
        "V": config.vocab_size, "D": config.d_model, "C": config.context_length,
        "F": config.d_ff, "N": config.n_heads, "NH": config.q_dim, "KH": config.kv_dim,
        "QKV": config.q_dim + 2 * config.kv_dim, "E": config.n_experts, "FE": config.expert_d_ff,
    }


def _conditions(config: ModelConfig) -> dict[str | None, bool]:
    return {None: True, "untied": not config.tied_embeddings,
            "attn_bias": config.attention_bias, "mlp_bias": config.mlp_bias}


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> logical shape for every tensor the architecture needs.

    Data-driven from :data:`TENSOR_TABLES`; layer tensors come in layer order after the global
    ones that precede them in the table. The output matrix is absent when embeddings are tied.
    """
    dims, cond = _dims(config), _conditions(config)
    out: dict[str, tuple[int, ...]] = {}
    table = TENSOR_TABLES[config.arch]
    head = [s for s in table if "{i}" not in s.name and s.name.startswith(("token_", "position_"))]
    layer = [s for s in table if "{i}" in s.name]
    tail = [s for s in table if s not in head and s not in layer]
    for spec in head:
        if cond[spec.when]:
            out[spec.name] = tuple(dims[d] for d in spec.shape)
    for i in range(config.n_layers):
        for spec in layer:
            if cond[spec.when]:
                out[spec.name.format(i=i)] = tuple(dims[d] for d in spec.shape)
    for spec in tail:
        if cond[spec.when]:
            out[spec.name] = tuple(dims[d] for d in spec.shape)
    return out


_BLK_RE = re.compile(r"^blk\.\d+\.")


def tensor_role(name: str) -> str:
    """The tensor's role: its GGUF name without the ``blk.N.`` prefix (``ffn_down.weight``)."""
    return _BLK_RE.sub("", name)


def tensor_types_by_role(tensors: Mapping[str, Any]) -> dict[str, int]:
    """Role -> the most common ggml type of a file's tensors in that role.

    ``tensors`` maps names to objects with ``.ggml_type`` (e.g. ``GGUFFile.tensors``). The result
    is what :meth:`ModelConfig.weight_bytes` takes to estimate a file layout from the config.
    """
    counts: dict[str, Counter] = {}
    for name, t in tensors.items():
        counts.setdefault(tensor_role(name), Counter())[int(t.ggml_type)] += 1
    return {role: c.most_common(1)[0][0] for role, c in counts.items()}


def ggml_type(spec: Any, what: str = "tensor type") -> int:
    """A ggml type from an int / ``gguf.GGMLQuantizationType`` / name ("Q8_0", "bf16", "float32")."""
    try:
        if isinstance(spec, str):
            key = _GGML_ALIASES.get(spec.lower(), spec.upper())
            return int(gguf.GGMLQuantizationType[key])
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            return int(gguf.GGMLQuantizationType(int(spec)))
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"{what}: unknown ggml type {spec!r}: expected a gguf.GGMLQuantizationType "
                      f"name or value, e.g. F32, F16, BF16, Q8_0, Q4_K, MXFP4")


def tensor_nbytes(shape: tuple[int, ...], type_: Any, name: str = "tensor") -> int:
    """Bytes of a tensor of logical ``shape`` stored as ggml type ``type_``.

    ggml blocks run along the innermost axis (``shape[-1]`` = ne0), so it must be a multiple of
    the block size; bytes = n_elements / block_elements * block_bytes (``gguf.GGML_QUANT_SIZES``).
    """
    t = ggml_type(type_, name)
    if t not in gguf.GGML_QUANT_SIZES:
        raise ConfigError(f"{name}: ggml type {gguf.GGMLQuantizationType(t).name} has no known "
                          f"block size in gguf.GGML_QUANT_SIZES")
    block, size = gguf.GGML_QUANT_SIZES[t]
    inner = shape[-1] if shape else 1
    if inner % block:
        raise ConfigError(f"{name}: row length {inner} (shape {tuple(shape)}) is not a multiple "
                          f"of the {gguf.GGMLQuantizationType(t).name} block size {block}")
    return math.prod(shape) // block * size


def _dtype_bytes(dtype: Any, what: str) -> int:
    """Bytes per element of ``dtype``: an int (itself), a name ("bf16", "float32"), or anything
    ``numpy.dtype`` understands (numpy / ml_dtypes / jax dtypes)."""
    if isinstance(dtype, numbers.Integral) and not isinstance(dtype, bool) and dtype > 0:
        return int(dtype)
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype.lower()]
    if dtype is not None and not isinstance(dtype, (bool, numbers.Number)):
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        # ml_dtypes (bfloat16, float8_*) register as kind "V" with their true itemsize.
        if dt is not None and dt.kind in "fiubV" and 0 < dt.itemsize <= 8:
            return dt.itemsize
    raise ConfigError(f"{what}: unknown dtype {dtype!r}: expected bytes per element (int), a "
                      f"numpy/jax dtype or one of {sorted(_DTYPE_BYTES)}")


def _fmt_bytes(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# --------------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Device-memory estimate in bytes (see :meth:`ModelConfig.memory_estimate` for the formulas)."""

    weights: int
    kv_cache: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.logits

    def __str__(self) -> str:
        return (f"weights {_fmt_bytes(self.weights)} + kv cache {_fmt_bytes(self.kv_cache)} + "
                f"activations {_fmt_bytes(self.activations)} + logits {_fmt_bytes(self.logits)} "
                f"= {_fmt_bytes(self.total)}")


# --------------------------------------------------------------------------------------------
# ModelConfig
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model; validated on construction.

    Conventions: ``head_dim`` is read, never assumed ``d_model / n_heads`` when the file says
    otherwise (gpt-oss: 64 heads x 64 = 4096 != 2880). ``rope_theta``/``rope_dim`` are None for
    gpt2 (learned positions). ``n_experts == 0`` means a dense MLP. ``sliding_window == 0`` means
    full attention everywhere; otherwise ``sliding_window_pattern[i]`` says whether layer i is
    windowed (a query at p sees keys p-W+1..p). ``swiglu_alpha``/``swiglu_limit`` are only used by
    gpt-oss experts. Fields after ``swiglu_limit`` describe where the config came from and do
    not take part in ``==``.
    """

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    context_length: int
    norm_eps: float
    rope_theta: float | None = None
    rope_dim: int | None = None
    rope_scaling: RopeScaling | None = None
    n_experts: int = 0
    n_experts_used: int = 0
    expert_d_ff: int = 0
    sliding_window: int = 0
    sliding_window_pattern: tuple[bool, ...] = ()
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Provenance (not compared):
    name: str = field(default="", compare=False)
    source: str = field(default="", compare=False)
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)
    stored_weight_bytes: int | None = field(default=None, compare=False)
    source_keys: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    # ---------------------------------------------------------------- validation

    def _key(self, fname: str) -> str:
        keys = dict(self.source_keys)
        return f"{keys[fname]} ({fname})" if fname in keys else fname

    def _fail(self, fname: str, expected: str, value: Any = dataclasses.MISSING,
              exc: type[Exception] = ConfigError) -> None:
        if value is dataclasses.MISSING:
            value = getattr(self, fname.split(".")[0])
        raise exc(f"{self.source or '<config>'}: {self._key(fname)} = {value!r}: {expected}")

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            self._fail("arch", f"architecture not supported; supported: {', '.join(SUPPORTED_ARCHS)}",
                       exc=UnsupportedModelError)
        uses_rope = self.arch != "gpt2"
        if uses_rope and self.rope_dim is None:   # default: RoPE over the whole head
            object.__setattr__(self, "rope_dim", self.head_dim)
        for fname, (lo, hi) in _LIMITS.items():
            v = getattr(self, fname)
            if fname == "rope_dim" and not uses_rope:
                continue
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                self._fail(fname, "expected an integer")
            if not lo <= v <= hi:
                self._fail(fname, f"expected an integer in [{lo}, {hi}]")
        if not (isinstance(self.norm_eps, numbers.Real) and 0.0 < self.norm_eps < 1.0):
            self._fail("norm_eps", "expected a normalisation epsilon in (0, 1)")
        if self.n_heads % self.n_kv_heads:
            self._fail("n_kv_heads", f"must divide the query head count "
                       f"{self._key('n_heads')} = {self.n_heads}")
        # positions
        if uses_rope:
            th = self.rope_theta
            if not (isinstance(th, numbers.Real) and math.isfinite(th) and th > 0):
                self._fail("rope_theta", "expected a RoPE base frequency > 0")
            if self.head_dim % 2:
                self._fail("head_dim", "RoPE rotates pairs: head_dim must be even")
            if self.rope_dim != self.head_dim:
                self._fail("rope_dim", f"must equal head_dim = {self.head_dim} (partial RoPE is "
                           "not supported)")
            if self.rope_scaling is not None:
                self._check_rope_scaling(self.rope_scaling)
        else:
            if self.n_kv_heads != self.n_heads:
                self._fail("n_kv_heads", f"gpt2 has no grouped-query attention: expected n_heads = "
                           f"{self.n_heads}")
            if self.head_dim * self.n_heads != self.d_model:
                self._fail("head_dim", f"gpt2 expects head_dim * n_heads = d_model = {self.d_model}")
            for f in ("rope_theta", "rope_dim", "rope_scaling"):
                if getattr(self, f) is not None:
                    self._fail(f, "gpt2 has learned positions: expected None")
        # experts
        if self.arch == "gpt-oss":
            if self.n_experts < 1:
                self._fail("n_experts", "gpt-oss is a mixture of experts: expected >= 1")
            if not 1 <= self.n_experts_used <= self.n_experts:
                self._fail("n_experts_used", f"expected 1 <= n_experts_used <= n_experts = "
                           f"{self.n_experts} ({self._key('n_experts')})")
            if self.expert_d_ff < 1:
                self._fail("expert_d_ff", "expected >= 1")
            for f in ("swiglu_alpha", "swiglu_limit"):
                v = getattr(self, f)
                if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                    self._fail(f, "expected a finite value > 0")
        elif self.n_experts or self.n_experts_used:
            self._fail("n_experts", f"mixture-of-experts {self.arch} models (e.g. Mixtral) are not "
                       "supported; expected 0", exc=UnsupportedModelError)
        # sliding window
        pattern = tuple(self.sliding_window_pattern)
        if not pattern:
            pattern = (self.sliding_window > 0,) * self.n_layers
        if len(pattern) != self.n_layers or not all(isinstance(p, (bool, np.bool_)) for p in pattern):
            self._fail("sliding_window_pattern", f"expected {self.n_layers} booleans (one per layer)",
                       value=self.sliding_window_pattern)
        pattern = tuple(bool(p) for p in pattern)
        if self.sliding_window == 0 and any(pattern):
            self._fail("sliding_window", "sliding layers in sliding_window_pattern need a window > 0")
        object.__setattr__(self, "sliding_window_pattern", pattern)

    def _check_rope_scaling(self, rs: RopeScaling) -> None:
        if not isinstance(rs, RopeScaling):
            self._fail("rope_scaling", "expected a RopeScaling or None")
        if rs.type not in ROPE_SCALING_TYPES:
            self._fail("rope_scaling.type", f"unknown RoPE scaling type; supported: none, "
                       f"{', '.join(ROPE_SCALING_TYPES)}", value=rs.type, exc=UnsupportedModelError)
        f = rs.factor
        if not (isinstance(f, numbers.Real) and math.isfinite(f) and f > 0):
            self._fail("rope_scaling.factor", "expected a finite factor > 0", value=f)
        if rs.type == "yarn":
            if f < 1:
                self._fail("rope_scaling.factor", "YaRN extends the context: expected factor >= 1",
                           value=f)
            oc = rs.original_context
            if not (isinstance(oc, numbers.Integral) and 0 < oc <= _LIMITS["context_length"][1]):
                self._fail("rope_scaling.original_context", "YaRN needs the original (pre-training) "
                           "context length > 0", value=oc)
            for b in ("beta_fast", "beta_slow"):
                v = getattr(rs, b)
                if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                    self._fail(f"rope_scaling.{b}", "expected a finite value > 0", value=v)
            if rs.beta_fast <= rs.beta_slow:
                self._fail("rope_scaling.beta_fast", f"expected beta_fast > beta_slow = "
                           f"{rs.beta_slow} (the ramp runs from the fast to the slow dims)",
                           value=rs.beta_fast)
            if rs.attention_factor is not None and not (
                    isinstance(rs.attention_factor, numbers.Real) and rs.attention_factor > 0):
                self._fail("rope_scaling.attention_factor", "expected a value > 0 or None",
                           value=rs.attention_factor)

    # ---------------------------------------------------------------- derived sizes

    @property
    def q_dim(self) -> int:
        """Width of the query projection, N*H."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection, K*H."""
        return self.n_kv_heads * self.head_dim

    @property
    def n_groups(self) -> int:
        """G = N/K query heads per kv head; query head h uses kv head h // G."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def uses_rope(self) -> bool:
        return self.arch != "gpt2"

    @property
    def learned_positions(self) -> bool:
        """gpt2: a ``position_embd`` table of ``context_length`` rows instead of RoPE."""
        return self.arch == "gpt2"

    @property
    def rope_type(self) -> str:
        """Pairing of RoPE in the GGUF tensor layout (llama.cpp ``llama_model_rope_type``).

        "norm": adjacent pairs (x[2i], x[2i+1]) - llama GGUFs, whose q/k rows the converter
        permuted; HF llama checkpoints are stored un-permuted (half-split). "neox": half-split
        pairs (x[i], x[i+H/2]) - gpt-oss, not permuted in either format. "none": gpt2.
        """
        return _ROPE_TYPE[self.arch]

    @property
    def norm_type(self) -> str:
        """"layernorm" (gpt2, with bias) or "rmsnorm" (llama, gpt-oss)."""
        return _NORM_TYPE[self.arch]

    @property
    def activation(self) -> str:
        """"gelu_tanh" (gpt2 ``gelu_new``), "silu_glu" (llama SwiGLU), "swiglu_oai" (gpt-oss)."""
        return _ACTIVATION[self.arch]

    @property
    def has_attention_sinks(self) -> bool:
        """gpt-oss: one learned sink logit per query head joins each softmax."""
        return self.arch == "gpt-oss"

    def layer_is_sliding(self, i: int) -> bool:
        """Whether layer ``i`` uses the sliding window (gpt-oss: even layers)."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range [0, {self.n_layers})")
        return self.sliding_window_pattern[i]

    @property
    def n_sliding_layers(self) -> int:
        return sum(self.sliding_window_pattern)

    # ---------------------------------------------------------------- counts and bytes

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """See :func:`expected_tensors`."""
        return expected_tensors(self)

    def parameter_count(self) -> int:
        """Number of parameters: sum of the element counts of :func:`expected_tensors`
        (a tied output matrix counts once)."""
        return sum(math.prod(s) for s in expected_tensors(self).values())

    def active_parameter_count(self) -> int:
        """Parameters one token's forward pass multiplies with.

        Excludes the embedding tables (a row lookup; a tied table still counts once, as the
        output matrix) and, for MoE, counts the expert tensors at n_experts_used / n_experts.
        This is the convention of OpenAI's gpt-oss README (3.6B / 5.1B active).
        """
        total = 0
        for name, shape in expected_tensors(self).items():
            n = math.prod(shape)
            if name == "position_embd.weight" or (name == "token_embd.weight"
                                                  and not self.tied_embeddings):
                continue
            if "_exps." in name:
                n = n // self.n_experts * self.n_experts_used
            total += n
        return total

    def weight_bytes(self, tensor_types: Mapping[str, Any] | None = None,
                     default_type: Any = "BF16") -> int:
        """Estimated bytes of the weights laid out as in a GGUF file.

        Each tensor of :func:`expected_tensors` is stored as ``tensor_types[name]``, else
        ``tensor_types[role]`` (role = name without ``blk.N.``; see :func:`tensor_types_by_role`),
        else ``default_type``; bytes per tensor from :func:`tensor_nbytes`. Types are ggml types
        (int or name such as "Q8_0", "MXFP4", "F32"). For the bytes a file really holds see
        ``stored_weight_bytes``.
        """
        tensor_types = tensor_types or {}
        total = 0
        for name, shape in expected_tensors(self).items():
            t = tensor_types.get(name, tensor_types.get(tensor_role(name), default_type))
            total += tensor_nbytes(shape, t, name)
        return total

    def kv_cache_bytes(self, context: int, batch: int = 1, dtype: Any = "bfloat16") -> int:
        """Bytes of the K and V caches for ``batch`` sequences of ``context`` tokens.

        Per layer: 2 (K and V) * batch * slots * K*H * bytes(dtype), where slots = context for
        full-attention layers and min(context, sliding_window) for sliding ones (a ring buffer).
        """
        self._check_positive("context", context)
        self._check_positive("batch", batch)
        item = _dtype_bytes(dtype, "kv cache dtype")
        total = 0
        for i in range(self.n_layers):
            slots = min(context, self.sliding_window) if self.sliding_window_pattern[i] else context
            total += 2 * batch * slots * self.kv_dim * item
        return total

    def memory_estimate(self, context: int, batch: int = 1, *, kv_dtype: Any = "bfloat16",
                        weight_type: Any = "BF16", chunk: int = 512, all_logits: bool = False,
                        materialized_scores: bool = True) -> MemoryEstimate:
        """Rough device-memory need of ``batch`` sequences of up to ``context`` tokens.

        - weights: ``stored_weight_bytes`` when the config came from a file (weights stay packed
          on the device), else :meth:`weight_bytes` with every tensor as ``weight_type``.
        - kv cache: :meth:`kv_cache_bytes` (``kv_dtype``).
        - activations of one forward pass over T = min(chunk, context) tokens, float32:
          ``4 * B*T * (3D + N*H + 2*K*H + W)`` with W the MLP width alive at once (gpt2 F,
          llama 2F, MoE used*2*FE + E), plus the attention scores of one layer
          ``4 * B*N*T*context`` when ``materialized_scores`` (the plain-jnp path; flash kernels
          avoid them).
        - logits: float32 ``4 * B * V`` for the last position, ``* T`` with ``all_logits``.
        It is an estimate for planning (XLA buffers, fragmentation and compilation scratch come
        on top), not a measurement.
        """
        self._check_positive("context", context)
        self._check_positive("batch", batch)
        self._check_positive("chunk", chunk)
        weights = (self.stored_weight_bytes if self.stored_weight_bytes is not None
                   else self.weight_bytes(default_type=weight_type))
        kv = self.kv_cache_bytes(context, batch, kv_dtype)
        t = min(chunk, context)
        if self.is_moe:
            width = self.n_experts_used * 2 * self.expert_d_ff + self.n_experts
        elif self.arch == "gpt2":
            width = self.d_ff
        else:
            width = 2 * self.d_ff
        acts = 4 * batch * t * (3 * self.d_model + self.q_dim + 2 * self.kv_dim + width)
        if materialized_scores:
            acts += 4 * batch * self.n_heads * t * context
        logits = 4 * batch * self.vocab_size * (t if all_logits else 1)
        return MemoryEstimate(weights=weights, kv_cache=kv, activations=acts, logits=logits)

    @staticmethod
    def _check_positive(what: str, v: Any) -> None:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{what} = {v!r}: expected a positive integer")

    # ---------------------------------------------------------------- summary

    def summary(self) -> str:
        """A readable multi-line description."""
        title = f"{self.arch}" + (f' "{self.name}"' if self.name else "")
        lines = [title + (f"  ({self.source})" if self.source else "")]
        lines.append(f"  layers {self.n_layers}, d_model {self.d_model}, vocab {self.vocab_size}, "
                     f"context {self.context_length}")
        attn = (f"  attention: {self.n_heads} query heads / {self.n_kv_heads} kv heads "
                f"(G = {self.n_groups}) x head_dim {self.head_dim}: q {self.q_dim}, kv {self.kv_dim}")
        extras = [x for x, on in (("bias", self.attention_bias),
                                  ("sinks", self.has_attention_sinks)) if on]
        lines.append(attn + (f"; {', '.join(extras)}" if extras else ""))
        if self.uses_rope:
            rope = f"  positions: RoPE {self.rope_type}, theta {self.rope_theta:g}, dim {self.rope_dim}"
            rs = self.rope_scaling
            if rs is not None and rs.type == "yarn":
                rope += (f"; yarn factor {rs.factor:g}, original context {rs.original_context}, "
                         f"beta {rs.beta_fast:g}/{rs.beta_slow:g}, "
                         f"{'truncated' if rs.truncate else 'untruncated'} ramp, "
                         f"mscale {rs.mscale:.6f}")
            elif rs is not None:
                rope += f"; {rs.type} factor {rs.factor:g}"
            lines.append(rope)
        else:
            lines.append(f"  positions: learned table of {self.context_length}")
        if self.sliding_window:
            which = [i for i in range(self.n_layers) if self.sliding_window_pattern[i]]
            desc = ("even" if which == list(range(0, self.n_layers, 2)) else
                    "all" if len(which) == self.n_layers else ",".join(map(str, which)))
            lines.append(f"  sliding window {self.sliding_window} on {len(which)} of "
                         f"{self.n_layers} layers ({desc})")
        if self.is_moe:
            lines.append(f"  MoE: {self.n_experts} experts, {self.n_experts_used} per token, "
                         f"expert d_ff {self.expert_d_ff}, swiglu alpha {self.swiglu_alpha:g} "
                         f"limit {self.swiglu_limit:g}")
        else:
            lines.append(f"  MLP: {self.activation}, d_ff {self.d_ff}"
                         + (", bias" if self.mlp_bias else ""))
        lines.append(f"  norm: {self.norm_type}, eps {self.norm_eps:g}; tied embeddings: "
                     f"{'yes' if self.tied_embeddings else 'no'}")
        total, active = self.parameter_count(), self.active_parameter_count()
        lines.append(f"  parameters: {total:,} ({_fmt_count(total)}; active per token "
                     f"{_fmt_count(active)})")
        if self.stored_weight_bytes is not None:
            lines.append(f"  weights as stored: {_fmt_bytes(self.stored_weight_bytes)} "
                         f"({self.stored_weight_bytes * 8 / total:.2f} bits per parameter)")
        else:
            lines.append(f"  weights in bf16: {_fmt_bytes(self.weight_bytes())}")
        if self.unknown_keys:
            lines.append(f"  unknown keys (ignored): {', '.join(self.unknown_keys)}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_gguf(cls, gguf_file: Any) -> ModelConfig:
        """From a :class:`gptjax.formats.gguf.GGUFFile` (metadata plus its tensor table)."""
        return cls.from_gguf_metadata(gguf_file.metadata, source=str(gguf_file.path),
                                      tensors=gguf_file.tensors)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf metadata>", *,
                           tensors: Mapping[str, Any] | None = None) -> ModelConfig:
        """From GGUF metadata (plain python values). ``tensors`` (name -> object with ``.shape``,
        ``.ggml_type``, ``.n_bytes``), when given, decides tied embeddings (no ``output.weight``),
        llama biases, the vocabulary size cross-check and ``stored_weight_bytes``; without it
        embeddings count as tied for gpt2 only."""
        return _from_gguf(metadata, source, tensors)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """From a Hugging Face config.json dict (``model_type`` gpt2, llama or gpt_oss)."""
        return _from_hf(config, source)


# --------------------------------------------------------------------------------------------
# Reading raw mappings
# --------------------------------------------------------------------------------------------

_REQUIRED = object()


def _tidy_float(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06): when a value is exactly
    a float32, return the shortest decimal that rounds to that float32, so GGUF and config.json
    values compare equal."""
    x = float(x)
    f32 = np.float32(x)
    if math.isfinite(x) and float(f32) == x:
        return float(str(f32))
    return x


class _Reader:
    """Typed access to a metadata mapping, recording the keys that were consulted."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "",
                 label: str = "") -> None:
        # prefix: part of the stored key ("gpt-oss."); label: only shown in messages, for a
        # nested object ("rope_scaling.").
        self.data, self.source, self.prefix, self.label = data, source, prefix, label
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return self.prefix + k

    def shown(self, k: str) -> str:
        return self.label + self.prefix + k

    def has(self, k: str) -> bool:
        self.used.add(self.key(k))
        return self.data.get(self.key(k)) is not None

    def _get(self, k: str, default: Any, what: str) -> Any:
        key = self.key(k)
        self.used.add(key)
        v = self.data.get(key)
        if v is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing required key '{self.shown(k)}' ({what})")
            return default
        return v

    def _bad(self, k: str, v: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.shown(k)} = {v!r}: expected {expected}")

    def int(self, k: str, what: str, default: Any = _REQUIRED) -> Any:
        v = self._get(k, default, what)
        if v is default:
            return v
        if isinstance(v, (list, tuple, np.ndarray)):   # llama.cpp allows per-layer arrays
            vals = list(v)
            if vals and all(x == vals[0] for x in vals):
                v = vals[0]
            else:
                raise UnsupportedModelError(f"{self.source}: {self.shown(k)} = {vals!r}: per-layer "
                                            f"values that differ are not supported")
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise self._bad(k, v, f"an integer ({what})")
        return int(v)

    def float(self, k: str, what: str, default: Any = _REQUIRED) -> Any:
        v = self._get(k, default, what)
        if v is default:
            return v
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise self._bad(k, v, f"a number ({what})")
        return _tidy_float(v)

    def str(self, k: str, what: str, default: Any = _REQUIRED) -> Any:
        v = self._get(k, default, what)
        if v is not default and not isinstance(v, str):
            raise self._bad(k, v, f"a string ({what})")
        return v

    def bool(self, k: str, what: str, default: Any = _REQUIRED) -> Any:
        v = self._get(k, default, what)
        if v is not default and not isinstance(v, (bool, np.bool_)):
            raise self._bad(k, v, f"true or false ({what})")
        return v if v is default else bool(v)

    def raw(self, k: str, what: str, default: Any = _REQUIRED) -> Any:
        return self._get(k, default, what)


def _arch_from(value: Any, key: str, source: str, supported: Mapping[str, str] | tuple) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key} = {value!r}: expected the architecture name (a string)")
    if value not in supported:
        raise UnsupportedModelError(f"{source}: {key} = {value!r}: architecture not supported; "
                                    f"supported: {', '.join(supported)}")
    return value


def _swa_pattern(value: Any, n_layers: int, key: str, source: str) -> tuple[bool, ...]:
    """GGUF ``sliding_window_pattern``: a bool per layer, or an int period n with llama.cpp's rule
    ``is_swa(il) = n == 0 or il % n < n - 1`` (LC-hparams ``set_swa_pattern``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        n = int(value)
        if n < 0:
            raise ConfigError(f"{source}: {key} = {n}: expected a period >= 0 or a bool per layer")
        return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = list(value)
        if len(vals) != n_layers or not all(isinstance(x, (bool, np.bool_)) for x in vals):
            raise ConfigError(f"{source}: {key} has {len(vals)} entries: expected {n_layers} "
                              f"booleans (one per layer)")
        return tuple(bool(x) for x in vals)
    raise ConfigError(f"{source}: {key} = {value!r}: expected a period (int) or a bool per layer")


def _from_gguf(md: Mapping[str, Any], source: str, tensors: Mapping[str, Any] | None) -> ModelConfig:
    if "general.architecture" not in md:
        raise ConfigError(f"{source}: missing required key 'general.architecture' "
                          f"(one of {', '.join(SUPPORTED_ARCHS)})")
    arch = _arch_from(md["general.architecture"], "general.architecture", source, SUPPORTED_ARCHS)
    r = _Reader(md, source, prefix=f"{arch}.")
    keys: dict[str, str] = {}

    def take(fname: str, getter, k: str, what: str, default: Any = _REQUIRED) -> Any:
        keys[fname] = r.key(k)
        return getter(k, what, default)

    v: dict[str, Any] = {"arch": arch}
    v["n_layers"] = take("n_layers", r.int, "block_count", "number of layers")
    v["context_length"] = take("context_length", r.int, "context_length", "training context")
    v["d_model"] = take("d_model", r.int, "embedding_length", "model width")
    v["n_heads"] = take("n_heads", r.int, "attention.head_count", "query heads")
    v["n_kv_heads"] = take("n_kv_heads", r.int, "attention.head_count_kv", "kv heads",
                           default=v["n_heads"])
    if arch == "gpt2":
        v["norm_eps"] = take("norm_eps", r.float, "attention.layer_norm_epsilon", "LayerNorm eps")
    else:
        v["norm_eps"] = take("norm_eps", r.float, "attention.layer_norm_rms_epsilon", "RMSNorm eps")

    # head_dim: attention.key_length when present (gpt-oss 64 != 2880/64), else d_model / heads.
    k_len = take("head_dim", r.int, "attention.key_length", "head dim of keys", default=None)
    v_len = r.int("attention.value_length", "head dim of values", default=None)
    if k_len is not None and v_len is not None and k_len != v_len:
        raise ConfigError(f"{source}: {r.key('attention.value_length')} = {v_len} differs from "
                          f"{r.key('attention.key_length')} = {k_len}: expected equal head dims")
    head_dim = k_len if k_len is not None else v_len
    if head_dim is None:
        keys["head_dim"] = f"{r.key('embedding_length')} / {r.key('attention.head_count')}"
        if v["n_heads"] <= 0 or v["d_model"] % v["n_heads"]:
            raise ConfigError(f"{source}: {r.key('embedding_length')} = {v['d_model']} is not "
                              f"divisible by {r.key('attention.head_count')} = {v['n_heads']}: "
                              f"expected head_dim = d_model / heads (or attention.key_length)")
        head_dim = v["d_model"] // v["n_heads"]
    v["head_dim"] = head_dim

    if arch == "gpt-oss":
        v["n_experts"] = take("n_experts", r.int, "expert_count", "experts")
        v["n_experts_used"] = take("n_experts_used", r.int, "expert_used_count", "experts per token")
        v["expert_d_ff"] = take("expert_d_ff", r.int, "expert_feed_forward_length",
                                "expert FFN width")
        v["d_ff"] = take("d_ff", r.int, "feed_forward_length", "FFN width",
                         default=v["expert_d_ff"])
    else:
        v["d_ff"] = take("d_ff", r.int, "feed_forward_length", "FFN width")
        v["n_experts"] = take("n_experts", r.int, "expert_count", "experts", default=0)
        v["n_experts_used"] = take("n_experts_used", r.int, "expert_used_count",
                                   "experts per token", default=0)

    # RoPE
    if arch != "gpt2":
        default_theta = _REQUIRED if arch == "gpt-oss" else 10000.0   # llama.cpp default 10000
        v["rope_theta"] = take("rope_theta", r.float, "rope.freq_base", "RoPE base",
                               default=default_theta)
        v["rope_dim"] = take("rope_dim", r.int, "rope.dimension_count", "rotated dims",
                             default=v["head_dim"])
        v["rope_scaling"] = _gguf_rope_scaling(r, arch, keys)

    # sliding window
    if arch != "gpt2":
        default_w = _REQUIRED if arch == "gpt-oss" else 0
        w = take("sliding_window", r.int, "attention.sliding_window", "sliding window",
                 default=default_w)
        v["sliding_window"] = w
        if w:
            key = r.key("attention.sliding_window_pattern")
            keys["sliding_window_pattern"] = key
            pat = r.raw("attention.sliding_window_pattern", "sliding layers", default=None)
            if pat is None:   # gpt-oss: period 2 (LC-openai-moe set_swa_pattern(2)); llama: all
                pat = 2 if arch == "gpt-oss" else 0
            v["sliding_window_pattern"] = _swa_pattern(pat, v["n_layers"], key, source)

    # vocabulary size: every source present must agree
    found: list[tuple[str, int]] = []
    if r.has("vocab_size"):
        found.append((r.key("vocab_size"), r.int("vocab_size", "vocabulary size")))
    toks = md.get("tokenizer.ggml.tokens")
    if toks is not None:
        found.append(("len(tokenizer.ggml.tokens)", len(toks)))
    if tensors is not None and "token_embd.weight" in tensors:
        found.append(("token_embd.weight shape[0]", int(tensors["token_embd.weight"].shape[0])))
    if not found:
        raise ConfigError(f"{source}: no vocabulary size: expected key '{r.key('vocab_size')}', "
                          f"'tokenizer.ggml.tokens' or a token_embd.weight tensor")
    if len({n for _, n in found}) > 1:
        raise ConfigError(f"{source}: inconsistent vocabulary size: "
                          + ", ".join(f"{k} = {n}" for k, n in found))
    keys["vocab_size"] = found[0][0]
    v["vocab_size"] = found[0][1]

    # facts from the tensor table (a vocabulary-only file has none: fall back to the metadata rules)
    if tensors:
        v["tied_embeddings"] = "output.weight" not in tensors
        v["stored_weight_bytes"] = sum(int(t.n_bytes) for t in tensors.values())
    else:
        v["tied_embeddings"] = arch == "gpt2"   # HF GPT-2 never has lm_head; others: assume untied
    if arch == "gpt2" or arch == "gpt-oss":
        v["attention_bias"] = v["mlp_bias"] = True
    elif tensors:
        v["attention_bias"] = "blk.0.attn_q.bias" in tensors
        v["mlp_bias"] = "blk.0.ffn_up.bias" in tensors

    name = md.get("general.name")
    v["name"] = name if isinstance(name, str) else ""
    v["source"] = source
    v["unknown_keys"] = tuple(sorted(k for k in md if k.startswith(r.prefix) and k not in r.used))
    v["source_keys"] = tuple(keys.items())
    return ModelConfig(**v)


def _gguf_rope_scaling(r: _Reader, arch: str, keys: dict[str, str]) -> RopeScaling | None:
    kind = r.str("rope.scaling.type", "RoPE scaling type", default=None)
    if kind is None:
        # Legacy key (llama.cpp LLM_KV_ROPE_SCALE_LINEAR): a linear factor, 1 = off.
        lin = r.float("rope.scale_linear", "linear RoPE factor", default=None)
        if lin is None or lin == 1.0:
            return None
        keys["rope_scaling.factor"] = r.key("rope.scale_linear")
        return RopeScaling(type="linear", factor=lin)
    keys["rope_scaling.type"] = r.key("rope.scaling.type")
    if kind == "none":
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModelError(f"{r.source}: {r.key('rope.scaling.type')} = {kind!r}: unknown "
                                    f"RoPE scaling type; supported: none, "
                                    f"{', '.join(ROPE_SCALING_TYPES)}")
    keys["rope_scaling.factor"] = r.key("rope.scaling.factor")
    factor = r.float("rope.scaling.factor", "RoPE scaling factor")
    if kind == "linear":
        return RopeScaling(type="linear", factor=factor)
    keys["rope_scaling.original_context"] = r.key("rope.scaling.original_context_length")
    keys["rope_scaling.beta_fast"] = r.key("rope.scaling.yarn_beta_fast")
    keys["rope_scaling.beta_slow"] = r.key("rope.scaling.yarn_beta_slow")
    return RopeScaling(
        type="yarn", factor=factor,
        original_context=r.int("rope.scaling.original_context_length", "YaRN original context"),
        # gpt-oss GGUFs carry no beta keys: llama.cpp's defaults 32 / 1 (LC-hparams.h) = OpenAI's.
        beta_fast=r.float("rope.scaling.yarn_beta_fast", "YaRN beta_fast", default=32.0),
        beta_slow=r.float("rope.scaling.yarn_beta_slow", "YaRN beta_slow", default=1.0),
        # gpt-oss follows the OpenAI/HF reference (untruncated ramp); llama.cpp truncates always.
        truncate=arch != "gpt-oss",
    )


# HF config.json keys that carry no architecture information for inference.
_HF_IGNORED = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "output_attentions",
    "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "_name_or_path", "model_type", "use_cache",
    "initializer_range", "initializer_factor", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "pretraining_tp", "router_aux_loss_coef", "output_router_logits", "quantization_config",
    "reorder_and_upcast_attn", "n_ctx", "task_specific_params", "tokenizer_class",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
})


def _from_hf(cfg: Mapping[str, Any], source: str) -> ModelConfig:
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{source}: expected a JSON object (dict), got {type(cfg).__name__}")
    if cfg.get("model_type") is None:
        raise ConfigError(f"{source}: missing required key 'model_type' "
                          f"(one of {', '.join(HF_MODEL_TYPES)})")
    mt = _arch_from(cfg["model_type"], "model_type", source, HF_MODEL_TYPES)
    arch = HF_MODEL_TYPES[mt]
    r = _Reader(cfg, source)
    keys: dict[str, str] = {}

    def take(fname: str, getter, k: str, what: str, default: Any = _REQUIRED) -> Any:
        keys[fname] = k
        return getter(k, what, default)

    v: dict[str, Any] = {"arch": arch}
    v["vocab_size"] = take("vocab_size", r.int, "vocab_size", "vocabulary size")
    if arch == "gpt2":
        v["d_model"] = take("d_model", r.int, "n_embd", "model width")
        v["n_layers"] = take("n_layers", r.int, "n_layer", "number of layers")
        v["n_heads"] = take("n_heads", r.int, "n_head", "heads")
        v["n_kv_heads"] = v["n_heads"]
        keys["n_kv_heads"] = "n_head"
        v["context_length"] = take("context_length", r.int, "n_positions", "position table size")
        v["d_ff"] = take("d_ff", r.int, "n_inner", "FFN width", default=4 * v["d_model"])
        v["norm_eps"] = take("norm_eps", r.float, "layer_norm_epsilon", "LayerNorm eps",
                             default=1e-5)
        if v["n_heads"] <= 0 or v["d_model"] % v["n_heads"]:
            raise ConfigError(f"{source}: n_embd = {v['d_model']} is not divisible by n_head = "
                              f"{v['n_heads']}: expected head_dim = n_embd / n_head")
        v["head_dim"] = v["d_model"] // v["n_heads"]
        keys["head_dim"] = "n_embd / n_head"
        v["tied_embeddings"] = take("tied_embeddings", r.bool, "tie_word_embeddings",
                                    "tied output", default=True)
        v["attention_bias"] = v["mlp_bias"] = True
        act = r.str("activation_function", "activation", default="gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"{source}: activation_function = {act!r}: only the tanh "
                                        f"GELU (gelu_new, gelu_pytorch_tanh) is supported")
        for k, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            got = r.bool(k, "attention scaling", default=ok)
            if got != ok:
                raise UnsupportedModelError(f"{source}: {k} = {got}: only {ok} is supported")
    else:
        v["d_model"] = take("d_model", r.int, "hidden_size", "model width")
        v["n_layers"] = take("n_layers", r.int, "num_hidden_layers", "number of layers")
        v["n_heads"] = take("n_heads", r.int, "num_attention_heads", "query heads")
        v["n_kv_heads"] = take("n_kv_heads", r.int, "num_key_value_heads", "kv heads",
                               default=v["n_heads"])
        v["context_length"] = take("context_length", r.int, "max_position_embeddings", "context")
        v["norm_eps"] = take("norm_eps", r.float, "rms_norm_eps", "RMSNorm eps")
        v["d_ff"] = take("d_ff", r.int, "intermediate_size", "FFN width")
        hd = take("head_dim", r.int, "head_dim", "head dim", default=None)
        if hd is None:
            if v["n_heads"] <= 0 or v["d_model"] % v["n_heads"]:
                raise ConfigError(f"{source}: hidden_size = {v['d_model']} is not divisible by "
                                  f"num_attention_heads = {v['n_heads']}: expected head_dim")
            hd = v["d_model"] // v["n_heads"]
        v["head_dim"] = hd
        prf = r.float("partial_rotary_factor", "rotary fraction", default=1.0)
        if prf != 1.0:
            raise UnsupportedModelError(f"{source}: partial_rotary_factor = {prf}: only full RoPE "
                                        f"(1.0) is supported")
        act = r.str("hidden_act", "activation", default="silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act = {act!r}: only silu is supported")
        _hf_rope(r, cfg, arch, v, keys)
        v["tied_embeddings"] = take("tied_embeddings", r.bool, "tie_word_embeddings",
                                    "tied output", default=False)
        if arch == "llama":
            v["attention_bias"] = take("attention_bias", r.bool, "attention_bias", "qkvo bias",
                                       default=False)
            v["mlp_bias"] = take("mlp_bias", r.bool, "mlp_bias", "MLP bias", default=False)
            w = take("sliding_window", r.int, "sliding_window", "window", default=0)
            v["sliding_window"] = w
        else:
            v["attention_bias"] = take("attention_bias", r.bool, "attention_bias", "qkvo bias",
                                       default=True)
            if not v["attention_bias"]:
                raise UnsupportedModelError(f"{source}: attention_bias = False: gpt-oss weights "
                                            f"always carry q/k/v/o biases")
            v["mlp_bias"] = True
            v["n_experts"] = take("n_experts", r.int, "num_local_experts", "experts")
            v["n_experts_used"] = take("n_experts_used", r.int, "num_experts_per_tok",
                                       "experts per token")
            v["expert_d_ff"] = v["d_ff"]
            keys["expert_d_ff"] = "intermediate_size"
            v["swiglu_limit"] = take("swiglu_limit", r.float, "swiglu_limit", "clamp", default=7.0)
            v["swiglu_alpha"] = take("swiglu_alpha", r.float, "swiglu_alpha", "sigmoid scale",
                                     default=1.702)
            v["sliding_window"] = take("sliding_window", r.int, "sliding_window", "window",
                                       default=128)
            lt = take("sliding_window_pattern", r.raw, "layer_types", "attention per layer",
                      default=None)
            if lt is None:   # HF GptOssConfig default: even layers sliding
                v["sliding_window_pattern"] = tuple(i % 2 == 0 for i in range(v["n_layers"]))
            else:
                if not isinstance(lt, (list, tuple)) or len(lt) != v["n_layers"]:
                    raise ConfigError(f"{source}: layer_types = {lt!r}: expected a list of "
                                      f"{v['n_layers']} entries (num_hidden_layers)")
                bad = [t for t in lt if t not in ("sliding_attention", "full_attention")]
                if bad:
                    raise UnsupportedModelError(f"{source}: layer_types contains {bad[0]!r}: "
                                                f"supported: sliding_attention, full_attention")
                v["sliding_window_pattern"] = tuple(t == "sliding_attention" for t in lt)
    v["name"] = str(cfg.get("_name_or_path") or "")
    v["source"] = source
    v["unknown_keys"] = tuple(sorted(k for k in cfg if k not in r.used and k not in _HF_IGNORED))
    v["source_keys"] = tuple(keys.items())
    return ModelConfig(**v)


def _hf_rope(r: _Reader, cfg: Mapping[str, Any], arch: str, v: dict, keys: dict) -> None:
    """RoPE settings from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
    ``rope_scaling`` (older config.json files, e.g. the gpt-oss hub checkpoints)."""
    default_theta = 150000.0 if arch == "gpt-oss" else 10000.0   # GptOssConfig / LlamaConfig
    params = r.raw("rope_parameters", "RoPE parameters", default=None)
    r.used.update({"rope_theta", "rope_scaling"})
    if params is not None:
        if not isinstance(params, Mapping):
            raise ConfigError(f"{r.source}: rope_parameters = {params!r}: expected an object")
        base = "rope_parameters"
        theta_key = "rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta"
        theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
        scaling = params
    else:
        base = "rope_scaling"
        theta_key, theta = "rope_theta", cfg.get("rope_theta", default_theta)
        scaling = cfg.get("rope_scaling") or {}
        if not isinstance(scaling, Mapping):
            raise ConfigError(f"{r.source}: rope_scaling = {scaling!r}: expected an object or null")
    sub = _Reader(scaling, r.source, label=f"{base}.")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real):
        raise ConfigError(f"{r.source}: {theta_key} = {theta!r}: expected a number (RoPE base)")
    v["rope_theta"] = _tidy_float(theta)
    keys["rope_theta"] = theta_key
    v["rope_dim"] = v["head_dim"]
    kind_key = "rope_type" if "rope_type" in scaling else "type"
    kind = scaling.get(kind_key) or "default"
    keys["rope_scaling.type"] = f"{base}.{kind_key}"
    if kind in ("default", "none"):
        v["rope_scaling"] = None
        return
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModelError(f"{r.source}: {base}.{kind_key} = {kind!r}: unknown RoPE "
                                    f"scaling type; supported: default, "
                                    f"{', '.join(ROPE_SCALING_TYPES)}")
    for f, k in (("factor", "factor"), ("original_context", "original_max_position_embeddings"),
                 ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
        keys[f"rope_scaling.{f}"] = f"{base}.{k}"
    if kind == "linear":
        v["rope_scaling"] = RopeScaling(type="linear",
                                        factor=sub.float("factor", "RoPE scaling factor"))
        return
    orig = sub.int("original_max_position_embeddings", "YaRN original context")
    factor = sub.float("factor", "YaRN factor", default=None)
    if factor is None:   # transformers: factor = max_position_embeddings / original
        factor = v["context_length"] / orig
    v["rope_scaling"] = RopeScaling(
        type="yarn", factor=factor, original_context=orig,
        beta_fast=sub.float("beta_fast", "YaRN beta_fast", default=32.0),
        beta_slow=sub.float("beta_slow", "YaRN beta_slow", default=1.0),
        # transformers defaults truncate to True; gpt-oss configs say False (its reference).
        truncate=sub.bool("truncate", "YaRN ramp rounding", default=arch != "gpt-oss"),
        attention_factor=sub.float("attention_factor", "YaRN mscale", default=None),
    )
