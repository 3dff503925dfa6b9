"""File tensors → the parameter pytree: one name table per (architecture, source), and an audit.

A table row says which file tensor fills which parameter (``{i}`` is the layer index) and
whether the file stores it transposed. Before any tensor is read, the audit checks that:

* every parameter the model expects (``gptjax.models.<arch>.param_shapes``) is filled exactly
  once, with the right shape;
* every tensor of the file is either used or deliberately ignored (e.g. the causal-mask
  buffers ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` that old HF GPT-2 files carry);

and reports every mismatch by name in one :class:`WeightsError`.

Sources:

* GGUF (llama.cpp layout, MODEL_FORMATS.md §4): tensors from :func:`gptjax.formats.gguf.read_gguf`,
  decoded to float32 by :func:`gptjax.quant.dequantize`. Matrices are already ``[out, in]`` rows.
* Hugging Face directories: ``model.safetensors`` (or the shards listed in
  ``model.safetensors.index.json``) read with the ``safetensors`` library. GPT-2's ``Conv1D``
  layers store ``[in, out]``, so ``c_attn``, ``c_proj`` and ``c_fc`` weights are transposed
  (llama.cpp's converter does the same when writing GGUF; transformers' GGUF loader undoes it).
  Names may carry the ``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model, the
  original openai-community/gpt2 upload).

Tied heads: when ``config.tied_embeddings`` is true the model has no ``output.weight`` parameter
and uses the token embedding; an ``lm_head.weight`` / ``output.weight`` still present in the file
is ignored, as transformers does when it ties the weights.

dtypes: matrices (embeddings, linear weights) are cast to the compute dtype chosen at load
(:func:`default_dtype`: float32 on CPU, bfloat16 on GPU/TPU); vectors (norm weights, biases) stay
float32 because they are added to float32 accumulators and cost nothing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from gptjax.errors import FormatError, UnsupportedModelError, WeightsError

__all__ = [
    "Rule", "TABLES", "default_dtype", "load_params_gguf", "load_params_hf", "param_shapes",
]


@dataclass(frozen=True)
class Rule:
    """File tensor ``source`` fills parameter ``param`` (``{i}`` = layer index in both).

    ``transpose``: the file stores the matrix as [in, out]; the parameter is [out, in].
    ``param=None`` marks a tensor that is deliberately ignored.
    """

    source: str
    param: str | None
    transpose: bool = False


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = ("",)   # optional name prefixes, stripped before matching


# ---- GPT-2 ------------------------------------------------------------------------------------

_GPT2_GGUF = Table(rules=(
    Rule("token_embd.weight", "token_embd.weight"),
    Rule("position_embd.weight", "position_embd.weight"),
    Rule("output_norm.weight", "output_norm.weight"),
    Rule("output_norm.bias", "output_norm.bias"),
    Rule("output.weight", "output.weight"),
    Rule("blk.{i}.attn_norm.weight", "blocks.{i}.attn_norm.weight"),
    Rule("blk.{i}.attn_norm.bias", "blocks.{i}.attn_norm.bias"),
    Rule("blk.{i}.attn_qkv.weight", "blocks.{i}.attn_qkv.weight"),
    Rule("blk.{i}.attn_qkv.bias", "blocks.{i}.attn_qkv.bias"),
    Rule("blk.{i}.attn_output.weight", "blocks.{i}.attn_output.weight"),
    Rule("blk.{i}.attn_output.bias", "blocks.{i}.attn_output.bias"),
    Rule("blk.{i}.ffn_norm.weight", "blocks.{i}.ffn_norm.weight"),
    Rule("blk.{i}.ffn_norm.bias", "blocks.{i}.ffn_norm.bias"),
    Rule("blk.{i}.ffn_up.weight", "blocks.{i}.ffn_up.weight"),
    Rule("blk.{i}.ffn_up.bias", "blocks.{i}.ffn_up.bias"),
    Rule("blk.{i}.ffn_down.weight", "blocks.{i}.ffn_down.weight"),
    Rule("blk.{i}.ffn_down.bias", "blocks.{i}.ffn_down.bias"),
))

_GPT2_HF = Table(prefixes=("transformer.", ""), rules=(
    Rule("wte.weight", "token_embd.weight"),
    Rule("wpe.weight", "position_embd.weight"),
    Rule("ln_f.weight", "output_norm.weight"),
    Rule("ln_f.bias", "output_norm.bias"),
    Rule("lm_head.weight", "output.weight"),
    Rule("h.{i}.ln_1.weight", "blocks.{i}.attn_norm.weight"),
    Rule("h.{i}.ln_1.bias", "blocks.{i}.attn_norm.bias"),
    Rule("h.{i}.attn.c_attn.weight", "blocks.{i}.attn_qkv.weight", transpose=True),
    Rule("h.{i}.attn.c_attn.bias", "blocks.{i}.attn_qkv.bias"),
    Rule("h.{i}.attn.c_proj.weight", "blocks.{i}.attn_output.weight", transpose=True),
    Rule("h.{i}.attn.c_proj.bias", "blocks.{i}.attn_output.bias"),
    Rule("h.{i}.ln_2.weight", "blocks.{i}.ffn_norm.weight"),
    Rule("h.{i}.ln_2.bias", "blocks.{i}.ffn_norm.bias"),
    Rule("h.{i}.mlp.c_fc.weight", "blocks.{i}.ffn_up.weight", transpose=True),
    Rule("h.{i}.mlp.c_fc.bias", "blocks.{i}.ffn_up.bias"),
    Rule("h.{i}.mlp.c_proj.weight", "blocks.{i}.ffn_down.weight", transpose=True),
    Rule("h.{i}.mlp.c_proj.bias", "blocks.{i}.ffn_down.bias"),
    # causal-mask buffers saved by old transformers versions (persistent buffers)
    Rule("h.{i}.attn.bias", None),
    Rule("h.{i}.attn.masked_bias", None),
))

# (arch, source) → table; source is "gguf" or "hf".
TABLES: dict[tuple[str, str], Table] = {
    ("gpt2", "gguf"): _GPT2_GGUF,
    ("gpt2", "hf"): _GPT2_HF,
}


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """The parameters of ``config.arch`` with their shapes (dotted paths, see models/*.py)."""
    if config.arch == "gpt2":
        from gptjax.models import gpt2
        return gpt2.param_shapes(config)
    raise UnsupportedModelError(f"no weight table for architecture {config.arch!r}; "
                                f"supported: {sorted({a for a, _ in TABLES})}")


def default_dtype():
    """Compute dtype used when the caller gives none: bfloat16 on GPU/TPU, float32 on CPU
    (XLA's CPU backend has no fast bfloat16 matmul, and float32 lets tests match references)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32


# ---- the audit --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Use:
    source: str                 # file tensor name
    transpose: bool


def _compile(table: Table):
    """[(regex, rule)] with ``{i}`` → a captured layer index."""
    out = []
    for rule in table.rules:
        pat = re.escape(rule.source).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(pat + r"\Z"), rule))
    return out


def _match(name: str, table: Table, compiled):
    """(rule, layer or None) for a file tensor name, or None when no rule matches."""
    for prefix in table.prefixes:
        if prefix and not name.startswith(prefix):
            continue
        short = name[len(prefix):]
        for regex, rule in compiled:
            m = regex.match(short)
            if m:
                return rule, (int(m.group(1)) if m.groups() else None)
    return None


def _expected_name(param: str, table: Table) -> str:
    """The file name that would fill ``param`` (for 'missing' messages)."""
    layer = None
    m = re.match(r"blocks\.(\d+)\.", param)
    if m:
        layer = int(m.group(1))
    for rule in table.rules:
        if rule.param is not None and rule.param.format(i=layer) == param:
            name = table.prefixes[0] + rule.source.format(i=layer)
            if len(table.prefixes) > 1:
                alts = " or ".join(repr(p + rule.source.format(i=layer))
                                   for p in table.prefixes[1:])
                return f"{name!r} (or {alts})"
            return repr(name)
    return "(no table entry)"


def audit(tensor_shapes: dict[str, tuple[int, ...]], config, source: str, where: str, *,
          problems: list[str] | None = None, dtypes: dict[str, str] | None = None,
          allowed_dtypes: frozenset[str] = frozenset()) -> dict[str, _Use]:
    """Match a file's tensors to the model's parameters; raise one WeightsError listing every
    problem. ``tensor_shapes``: file tensor name → logical shape; ``source``: "gguf" or "hf";
    ``where``: the file or directory, for messages; ``problems``: ones the caller already found
    (reported together); ``dtypes``: file tensor name → dtype name, checked against
    ``allowed_dtypes`` for the tensors that are used (ignored buffers may be bool or int).
    Returns parameter path → file tensor."""
    table = TABLES.get((config.arch, source))
    if table is None:
        raise UnsupportedModelError(f"{where}: no {source} weight table for architecture "
                                    f"{config.arch!r}")
    expected = param_shapes(config)
    compiled = _compile(table)
    uses: dict[str, _Use] = {}
    claimed: dict[str, str] = {}    # param → the first tensor naming it (even with a bad shape)
    problems = list(problems or [])
    for name, shape in tensor_shapes.items():
        shape = tuple(int(d) for d in shape)
        hit = _match(name, table, compiled)
        if hit is None:
            problems.append(f"unexpected tensor {name!r} {shape}: not part of a {config.arch} "
                            f"model")
            continue
        rule, layer = hit
        if rule.param is None:
            continue                                    # deliberately ignored
        if layer is not None and layer >= config.n_layers:
            problems.append(f"tensor {name!r} is for layer {layer} but the model has "
                            f"{config.n_layers} layers")
            continue
        param = rule.param.format(i=layer)
        if param not in expected:
            if param == "output.weight" and config.tied_embeddings:
                continue                                # tied head: the token embedding is used
            problems.append(f"unexpected tensor {name!r}: parameter {param} is not used by this "
                            f"{config.arch} configuration")
            continue
        if param in claimed:
            problems.append(f"parameter {param} is filled twice: by {claimed[param]!r} and by "
                            f"{name!r}")
            continue
        claimed[param] = name
        want = expected[param][::-1] if rule.transpose else expected[param]
        if shape != want:
            note = " (stored transposed, [in, out])" if rule.transpose else ""
            problems.append(f"tensor {name!r} has shape {shape}, expected {want}{note} for "
                            f"parameter {param}")
            continue
        if dtypes is not None and dtypes[name] not in allowed_dtypes:
            problems.append(f"tensor {name!r} has dtype {dtypes[name]}, expected one of "
                            f"{sorted(allowed_dtypes)} for parameter {param}")
            continue
        uses[param] = _Use(name, rule.transpose)
    for param, shape in expected.items():
        if param not in claimed:
            problems.append(f"missing tensor {_expected_name(param, table)} for parameter "
                            f"{param} {shape}")
    if problems:
        raise WeightsError(f"{where}: the {config.arch} weights do not match the model "
                           f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  "
                           + "\n  ".join(problems))
    return uses


# ---- building the tree ------------------------------------------------------------------------

def _cast(x, dtype):
    """Matrices to the compute dtype, vectors (norms, biases) float32."""
    return jnp.asarray(x, dtype=dtype if x.ndim >= 2 else jnp.float32)


def _build(uses: dict[str, _Use], config, read, dtype):
    """Nested params from ``read(file_name) -> float array`` (in the file's own layout)."""
    params: dict = {"blocks": [dict() for _ in range(config.n_layers)]}
    for param, use in uses.items():
        x = read(use.source)
        if use.transpose:
            x = x.T
        node = params
        parts = param.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[parts[-1]] = _cast(x, dtype)
    return params


def load_params_gguf(gguf_file, config, dtype=None):
    """The parameter pytree of ``config.arch`` from a GGUF file (path or GGUFFile).

    Every tensor is decoded to float32 by gptjax.quant.dequantize (any supported ggml type) and
    cast per :func:`_cast`. Raises WeightsError (all name/shape problems at once) or
    UnsupportedModelError (a ggml type without a decoder) before reading any tensor data.
    """
    from gptjax.formats.gguf import GGUFFile, read_gguf
    from gptjax.quant import QUANT_BLOCK, dequantize, ggml_type_name

    gf = gguf_file if isinstance(gguf_file, GGUFFile) else read_gguf(gguf_file)
    dtype = default_dtype() if dtype is None else dtype
    uses = audit({n: t.shape for n, t in gf.tensors.items()}, config, "gguf", gf.path)
    bad = [f"{u.source!r} ({gf.tensors[u.source].type_name})" for u in uses.values()
           if gf.tensors[u.source].ggml_type not in QUANT_BLOCK]
    if bad:
        supported = ", ".join(ggml_type_name(t) for t in QUANT_BLOCK)
        raise UnsupportedModelError(f"{gf.path}: tensors of unsupported ggml types: "
                                    f"{', '.join(bad)}; supported: {supported}")

    def read(name):
        t = gf.tensors[name]
        return dequantize(t.raw, t.ggml_type, t.shape, name=name)

    return _build(uses, config, read, dtype)


# safetensors dtypes accepted for float parameters; numpy has no bfloat16/float8, so those are
# read through the library's flax (jax) backend instead.
_NUMPY_DTYPES = {"F64", "F32", "F16"}
_JAX_DTYPES = {"BF16"}


def _safetensors_files(dirpath: Path) -> list[Path]:
    index = dirpath / "model.safetensors.index.json"
    single = dirpath / "model.safetensors"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [dirpath / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: cannot read the shard list 'weight_map': {e}") from e
    raise FormatError(f"{dirpath}: no model.safetensors or model.safetensors.index.json "
                      f"(only safetensors checkpoints are supported)")


def load_params_hf(dirpath, config, dtype=None):
    """The parameter pytree of ``config.arch`` from a Hugging Face directory's safetensors.

    ``config`` comes from the directory's config.json (ModelConfig.from_hf). Raises FormatError
    for unreadable files, WeightsError for name/shape/dtype problems (all at once).
    """
    from safetensors import SafetensorError, safe_open

    dirpath = Path(os.fspath(dirpath))
    dtype = default_dtype() if dtype is None else dtype
    handles = {}
    located: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    problems: list[str] = []
    for path in _safetensors_files(dirpath):
        try:
            f = safe_open(str(path), framework="np")
            for name in f.keys():
                sl = f.get_slice(name)
                if name in located:
                    problems.append(f"tensor {name!r} is in both {located[name].name} and "
                                    f"{path.name}")
                    continue
                dtypes[name] = sl.get_dtype()
                located[name] = path
                shapes[name] = tuple(sl.get_shape())
        except (OSError, SafetensorError) as e:
            raise FormatError(f"{path}: cannot read safetensors file: {e}") from e
        handles[path] = f
    uses = audit(shapes, config, "hf", str(dirpath), problems=problems, dtypes=dtypes,
                 allowed_dtypes=_NUMPY_DTYPES | _JAX_DTYPES)

    def read(name):
        path = located[name]
        if dtypes[name] in _JAX_DTYPES:
            with safe_open(str(path), framework="flax") as g:
                return g.get_tensor(name)
        return handles[path].get_tensor(name)

    return _build(uses, config, read, dtype)
