"""File tensors → the parameter pytree: one name table per (architecture, source), and an audit.

A table row says which file tensor fills which parameter (``{i}`` is the layer index) and
whether the file stores it transposed. Before any tensor is read, the audit checks that:

* every parameter the model expects (``gptjax.models.<arch>.param_shapes``) is filled exactly
  once, with the right shape;
* every tensor of the file is either used or deliberately ignored (e.g. the causal-mask
  buffers ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` that old HF GPT-2 files carry);

and reports every mismatch by name in one :class:`WeightsError`.

Sources:

* GGUF (llama.cpp layout, MODEL_FORMATS.md §4, §5): tensors from
  :func:`gptjax.formats.gguf.read_gguf`, turned into leaves by
  :func:`gptjax.packed.pack_from_gguf_tensor`: quantized matrices stay packed (the file's bytes)
  or are decoded exactly at load (``dequantize_at_load``, the CPU default). Matrices are already
  ``[out, in]`` rows, so nothing is rearranged.
* Hugging Face directories: ``model.safetensors`` (or the shards listed in
  ``model.safetensors.index.json``) read with the ``safetensors`` library. GPT-2's ``Conv1D``
  layers store ``[in, out]``, so ``c_attn``, ``c_proj`` and ``c_fc`` weights are transposed
  (llama.cpp's converter does the same when writing GGUF; transformers' GGUF loader undoes it).
  Names may carry the ``transformer.`` prefix (GPT2LMHeadModel) or not (GPT2Model, the
  original openai-community/gpt2 upload).

llama (MODEL_FORMATS.md §5): the parameters keep llama.cpp's GGUF order of the q/k rows, in
which each head's RoPE pairs are adjacent rows (the converter permuted HF's half-split order,
``LlamaModel.permute``); models/llama.py rotates adjacent pairs (``rope_type == "norm"``). So GGUF
tensors, packed or not, load untouched, and the HF loader applies the same permutation to
``q_proj`` / ``k_proj`` weights and biases (:func:`rope_permute_rows`); both sources give the
same tree. A GGUF ``rope_freqs.weight`` (llama3 frequency factors) raises UnsupportedModelError.

gpt-oss (MODEL_FORMATS.md §1.7, §2.2-§2.3): the parameters follow the GGUF layout, with separate
gate and up expert stacks ``[E, F, D]`` and ``down`` ``[E, D, F]`` (rows = output features).
Three file layouts map onto it, through rules that *split* one file tensor into two parameters
along axis 1 (the output rows of an expert stack) and through MXFP4 pairs:

* GGUF ``ffn_{gate,up,down}_exps`` (MXFP4 in ggml-org files), or a fused ``ffn_gate_up_exps``
  holding the gate rows then the up rows (``split="halves"``);
* OpenAI's hub layout: ``gate_up_proj_blocks`` [E, 2F, D/32, 16] + ``_scales`` [E, 2F, D/32]
  with gate and up rows *interleaved* (row 2j gate_j, 2j+1 up_j; ``split="interleaved"``) and
  ``down_proj_blocks`` / ``_scales``. Each ``X_blocks`` / ``X_scales`` pair is read as one MXFP4
  tensor ``X_blocks`` of logical shape [..., 32 G] and repacked to ggml's 17-byte blocks
  (:func:`gptjax.quant.mxfp4_openai_to_ggml`, an exact re-nibbling), so GGUF and HF experts end
  up as the same bytes and one kernel format serves both;
* dequantized HF checkpoints: ``gate_up_proj`` [E, D, 2F] and ``down_proj`` [E, F, D] used as
  ``x @ W`` (transposed with respect to a Linear weight), interleaved like the MXFP4 ones.

Expert stacks (the only 3-D tensors) stay packed by default on every backend, whatever the
default for 2-D matrices: gpt-oss-20b's experts are 12 GiB in float32 against 1.5 GiB packed, and
the MoE code (models/moe.py) decodes only the experts a token is routed to.

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
    "Rule", "TABLES", "default_dequantize_at_load", "default_dtype", "load_params_gguf",
    "load_params_hf", "param_shapes", "rope_permute_rows",
]


@dataclass(frozen=True)
class Rule:
    """File tensor ``source`` fills parameter ``param`` (``{i}`` = layer index in both).

    ``transpose``: the file stores the matrix as [in, out]; the parameter is [out, in].
    ``rope_permute``: "q" or "k": the file stores the rows of each head in HF's half-split RoPE
    order; apply llama.cpp's converter permutation (:func:`rope_permute_rows`) with
    ``config.n_heads`` ("q") or ``config.n_kv_heads`` ("k") heads to get the GGUF order.
    ``param=None`` marks a tensor that is deliberately ignored.
    ``split``: ``param`` is a tuple of parameters that share the file tensor along axis 1 (the
    output rows of an expert stack [E, O, I], or of its biases [E, O]): "halves" (the first
    parameter's rows, then the second's; llama.cpp's fused gate_up) or "interleaved" (row 2j to
    the first, 2j+1 to the second; OpenAI's gate_up). Applied after ``transpose``.
    """

    source: str
    param: str | tuple[str, ...] | None
    transpose: bool = False
    rope_permute: str | None = None
    split: str | None = None

    @property
    def params(self) -> tuple[str, ...]:
        """The filled parameters (empty for an ignored tensor)."""
        if self.param is None:
            return ()
        return self.param if isinstance(self.param, tuple) else (self.param,)


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = ("",)   # optional name prefixes, stripped before matching
    # file tensor name → why a file holding it cannot be run (UnsupportedModelError)
    unsupported: tuple[tuple[str, str], ...] = ()


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

# ---- llama (MODEL_FORMATS.md §5) ----------------------------------------------------------------
# The parameters keep the GGUF q/k row order (adjacent RoPE pairs, see models/llama.py); HF rows
# are permuted at load the way llama.cpp's converter does.

_LLAMA_LAYER = (   # (GGUF role, HF name under model.layers.{i}., rope permutation)
    ("attn_norm.weight", "input_layernorm.weight", None),
    ("attn_q.weight", "self_attn.q_proj.weight", "q"),
    ("attn_q.bias", "self_attn.q_proj.bias", "q"),
    ("attn_k.weight", "self_attn.k_proj.weight", "k"),
    ("attn_k.bias", "self_attn.k_proj.bias", "k"),
    ("attn_v.weight", "self_attn.v_proj.weight", None),
    ("attn_v.bias", "self_attn.v_proj.bias", None),
    ("attn_output.weight", "self_attn.o_proj.weight", None),
    ("attn_output.bias", "self_attn.o_proj.bias", None),
    ("ffn_norm.weight", "post_attention_layernorm.weight", None),
    ("ffn_gate.weight", "mlp.gate_proj.weight", None),
    ("ffn_gate.bias", "mlp.gate_proj.bias", None),
    ("ffn_up.weight", "mlp.up_proj.weight", None),
    ("ffn_up.bias", "mlp.up_proj.bias", None),
    ("ffn_down.weight", "mlp.down_proj.weight", None),
    ("ffn_down.bias", "mlp.down_proj.bias", None),
)

_LLAMA_GGUF = Table(
    rules=(
        Rule("token_embd.weight", "token_embd.weight"),
        Rule("output_norm.weight", "output_norm.weight"),
        Rule("output.weight", "output.weight"),
        *(Rule(f"blk.{{i}}.{g}", f"blocks.{{i}}.{g}") for g, _, _ in _LLAMA_LAYER),
    ),
    # llama.cpp's converter writes rope_freqs for llama3-style RoPE scaling (per-dimension
    # frequency divisors, LC-llama ``rope_factors``); not implemented here.
    unsupported=(("rope_freqs.weight", "llama3-style RoPE scaling (per-dimension frequency "
                  "factors) is not supported"),),
)

_LLAMA_HF = Table(
    prefixes=("model.", ""),
    rules=(
        Rule("embed_tokens.weight", "token_embd.weight"),
        Rule("norm.weight", "output_norm.weight"),
        Rule("lm_head.weight", "output.weight"),
        *(Rule(f"layers.{{i}}.{h}", f"blocks.{{i}}.{g}", rope_permute=perm)
          for g, h, perm in _LLAMA_LAYER),
        # RoPE frequencies that old transformers versions saved as a buffer: recomputed.
        Rule("layers.{i}.self_attn.rotary_emb.inv_freq", None),
    ),
)

# ---- gpt-oss (MODEL_FORMATS.md §1.7, §2.2) ---------------------------------------------------

_GPT_OSS_LAYER = (   # (GGUF role, HF name under model.layers.{i}.)
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("attn_sinks.weight", "self_attn.sinks"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate_inp.weight", "mlp.router.weight"),
    ("ffn_gate_inp.bias", "mlp.router.bias"),
)
_GATE_UP_W = ("blocks.{i}.ffn_gate_exps.weight", "blocks.{i}.ffn_up_exps.weight")
_GATE_UP_B = ("blocks.{i}.ffn_gate_exps.bias", "blocks.{i}.ffn_up_exps.bias")

_GPT_OSS_GGUF = Table(rules=(
    Rule("token_embd.weight", "token_embd.weight"),
    Rule("output_norm.weight", "output_norm.weight"),
    Rule("output.weight", "output.weight"),
    *(Rule(f"blk.{{i}}.{g}", f"blocks.{{i}}.{g}") for g, _ in _GPT_OSS_LAYER),
    *(Rule(f"blk.{{i}}.ffn_{e}_exps.{k}", f"blocks.{{i}}.ffn_{e}_exps.{k}")
      for e in ("gate", "up", "down") for k in ("weight", "bias")),
    # llama.cpp converter option fuse_gate_up_exps: gate rows then up rows (LC-graph splits
    # the fused tensor as views [0:F] and [F:2F])
    Rule("blk.{i}.ffn_gate_up_exps.weight", _GATE_UP_W, split="halves"),
    Rule("blk.{i}.ffn_gate_up_exps.bias", _GATE_UP_B, split="halves"),
))

_GPT_OSS_HF = Table(prefixes=("model.", ""), rules=(
    Rule("embed_tokens.weight", "token_embd.weight"),
    Rule("norm.weight", "output_norm.weight"),
    Rule("lm_head.weight", "output.weight"),
    *(Rule(f"layers.{{i}}.{h}", f"blocks.{{i}}.{g}") for g, h in _GPT_OSS_LAYER),
    # MXFP4 (OpenAI hub layout): each _blocks tensor stands for its _blocks/_scales pair
    Rule("layers.{i}.mlp.experts.gate_up_proj_blocks", _GATE_UP_W, split="interleaved"),
    Rule("layers.{i}.mlp.experts.down_proj_blocks", "blocks.{i}.ffn_down_exps.weight"),
    # dequantized checkpoints: transformers GptOssExperts parameters, [E, in, out] (x @ W)
    Rule("layers.{i}.mlp.experts.gate_up_proj", _GATE_UP_W, transpose=True, split="interleaved"),
    Rule("layers.{i}.mlp.experts.down_proj", "blocks.{i}.ffn_down_exps.weight", transpose=True),
    Rule("layers.{i}.mlp.experts.gate_up_proj_bias", _GATE_UP_B, split="interleaved"),
    Rule("layers.{i}.mlp.experts.down_proj_bias", "blocks.{i}.ffn_down_exps.bias"),
))

# (arch, source) → table; source is "gguf" or "hf".
TABLES: dict[tuple[str, str], Table] = {
    ("gpt2", "gguf"): _GPT2_GGUF,
    ("gpt2", "hf"): _GPT2_HF,
    ("llama", "gguf"): _LLAMA_GGUF,
    ("llama", "hf"): _LLAMA_HF,
    ("gpt-oss", "gguf"): _GPT_OSS_GGUF,
    ("gpt-oss", "hf"): _GPT_OSS_HF,
}


def rope_permute_rows(w, n_heads: int):
    """llama.cpp's converter permutation of q/k rows (CONV-llama ``LlamaModel.permute``):
    ``w.reshape(n_heads, 2, rows/n_heads/2, *rest).swapaxes(1, 2).reshape(w.shape)``.

    Per head of d = rows/n_heads rows: new row 2i + j = old row j*d/2 + i (i < d/2, j in
    {0, 1}), so HF's half-split RoPE pairs (x_i, x_{i+d/2}) become adjacent (x_2i, x_2i+1).
    w: [n_heads * d, ...] (a weight [rows, D] or a bias [rows]); numpy or jax array.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """The parameters of ``config.arch`` with their shapes (dotted paths, see models/*.py)."""
    if config.arch == "gpt2":
        from gptjax.models import gpt2
        return gpt2.param_shapes(config)
    if config.arch == "llama":
        from gptjax.models import llama
        return llama.param_shapes(config)
    if config.arch == "gpt-oss":
        from gptjax.models import gpt_oss
        return gpt_oss.param_shapes(config)
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
    rope_permute: str | None = None
    split: str | None = None    # "halves" / "interleaved": this parameter is part `part` of
    part: int = 0               # `n_parts` sharing the file tensor along axis 1
    n_parts: int = 1


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
        if param in (p.format(i=layer) for p in rule.params):
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
    for bad, why in table.unsupported:
        if bad in tensor_shapes:
            raise UnsupportedModelError(f"{where}: tensor {bad!r}: {why}")
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
        if not rule.params:
            continue                                    # deliberately ignored
        if layer is not None and layer >= config.n_layers:
            problems.append(f"tensor {name!r} is for layer {layer} but the model has "
                            f"{config.n_layers} layers")
            continue
        params = [p.format(i=layer) for p in rule.params]
        unused = [p for p in params if p not in expected]
        if unused:
            if unused == ["output.weight"] and config.tied_embeddings:
                continue                                # tied head: the token embedding is used
            problems.append(f"unexpected tensor {name!r}: parameter {unused[0]} is not used by "
                            f"this {config.arch} configuration")
            continue
        twice = [p for p in params if p in claimed]
        for p in twice:
            problems.append(f"parameter {p} is filled twice: by {claimed[p]!r} and by {name!r}")
        if twice:
            continue
        claimed.update((p, name) for p in params)
        what = "parameter " + " and ".join(params)
        want = expected[params[0]]
        if rule.split:
            if len({expected[p] for p in params}) != 1:
                raise AssertionError(f"split rule {rule} over parameters of different shapes")
            want = (want[0], want[1] * len(params), *want[2:])  # rows of all parts, axis 1
        if rule.transpose:
            want = (*want[:-2], want[-1], want[-2])
        if shape != want:
            note = " (stored transposed, [in, out])" if rule.transpose else ""
            problems.append(f"tensor {name!r} has shape {shape}, expected {want}{note} for "
                            f"{what}")
            continue
        if dtypes is not None and dtypes[name] not in allowed_dtypes:
            problems.append(f"tensor {name!r} has dtype {dtypes[name]}, expected one of "
                            f"{sorted(allowed_dtypes)} for {what}")
            continue
        for k, p in enumerate(params):
            uses[p] = _Use(name, rule.transpose, rule.rope_permute, rule.split, k, len(params))
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


def _build(uses: dict[str, _Use], config, leaf, *, fuse: bool = True):
    """Nested params from ``leaf(use) -> array or PackedWeight`` (already in parameter layout).

    Biases are float32 whatever their rank (they are added to float32 accumulators).
    ``fuse``: projections sharing an input are concatenated per block (gptjax.fusion: q/k/v,
    gate/up, expert gate/up). Then packed leaves are repacked to the Pallas kernels' layout
    when the kernels are on (``gptjax.packed.use_kernel_layout``), block by block so that the
    transient extra memory is one block's."""
    from gptjax.fusion import fuse_block
    from gptjax.packed import PackedWeight, use_kernel_layout

    params: dict = {"blocks": [dict() for _ in range(config.n_layers)]}
    for param, use in uses.items():
        node = params
        parts = param.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        x = leaf(use)
        if param.endswith(".bias") and not isinstance(x, PackedWeight):
            x = jnp.asarray(x, jnp.float32)  # biases stay float32, expert stacks [E, O] too
        node[parts[-1]] = x
    kernel_layout = use_kernel_layout()

    def finish(tree):
        if not kernel_layout:
            return tree
        return {k: (v.to_kernel_layout() if isinstance(v, PackedWeight)
                    else finish(v) if isinstance(v, dict) else v) for k, v in tree.items()}

    blocks = params.pop("blocks")
    for i, block in enumerate(blocks):
        blocks[i] = finish(fuse_block(block) if fuse else block)
    params = finish(params)
    params["blocks"] = blocks
    return params


def _dense_leaf(x, use: _Use, config, dtype):
    """A float array from the file's layout to the parameter's: transpose (of the last two
    axes), q/k row permutation, split part, then :func:`_cast`."""
    if use.transpose:
        x = x.swapaxes(-1, -2)
    if use.rope_permute is not None:
        x = rope_permute_rows(x, config.n_heads if use.rope_permute == "q" else config.n_kv_heads)
    return _cast(_split_rows(x, use), dtype)


def _split_rows(x, use: _Use):
    """Part ``use.part`` of the ``use.n_parts`` parameters sharing x along axis 1:
    consecutive blocks of rows ("halves") or every n_parts-th row ("interleaved")."""
    if use.split is None:
        return x
    n = x.shape[1] // use.n_parts
    if use.split == "halves":
        return x[:, use.part * n:(use.part + 1) * n]
    return x[:, use.part::use.n_parts]


@dataclass(frozen=True)
class _Bytes:
    """A quantized tensor as bytes, shaped like :class:`gptjax.formats.gguf.GGUFTensor` for
    :func:`gptjax.packed.pack_from_gguf_tensor`: ``raw`` uint8 [*shape[:-1], row_bytes]."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    raw: object


def _part_bytes(t, use: _Use) -> _Bytes:
    """The rows of one split part of a quantized stack [E, O, I], still as bytes (a ggml row
    holds whole blocks along I, so rows can be selected without decoding)."""
    rows = _split_rows(t.raw.reshape(*t.shape[:-1], -1), use)
    return _Bytes(f"{t.name} (part {use.part + 1} of {use.n_parts})", t.ggml_type,
                  (t.shape[0], rows.shape[1], *t.shape[2:]), rows)


def _last_read(fn):
    """``fn(name)`` remembering its last result: the parts of a split tensor are built one after
    the other (the audit lists them consecutively), so the file tensor is read once."""
    last: dict = {}

    def read(name):
        if name not in last:
            last.clear()
            last[name] = fn(name)
        return last[name]

    return read


def default_dequantize_at_load() -> bool:
    """Whether GGUF quantized matrices are decoded at load when the caller does not say:
    yes on CPU (a dense float32 matmul beats decoding inside every call there, and a model
    small enough for a CPU fits dense), no on GPU/TPU (packed bytes are 4-7x smaller, and the
    matmul decodes them on the fly)."""
    return jax.default_backend() == "cpu"


def load_params_gguf(gguf_file, config, dtype=None, *, dequantize_at_load: bool | None = None,
                     fuse: bool = True):
    """The parameter pytree of ``config.arch`` from a GGUF file (path or GGUFFile).

    Each tensor becomes a leaf through :func:`gptjax.packed.pack_from_gguf_tensor`: float
    tensors (F32/F16/BF16) and vectors (norm weights, biases) are decoded and cast per
    :func:`_cast`; quantized matrices stay packed (:class:`~gptjax.packed.PackedWeight`, the
    file's bytes, logical dtype ``dtype``) unless ``dequantize_at_load`` is true, in which case
    they are decoded exactly to float32 and rounded to ``dtype``. ``dequantize_at_load=None``
    picks :func:`default_dequantize_at_load` (true on CPU) for matrices but keeps expert stacks
    (3-D, gpt-oss) packed on every backend; pass True to decode those too. GGUF tensors are
    already in parameter layout ([out, in] rows, llama q/k in GGUF order), so packed rows are
    never rearranged (a fused gate_up stack is split by selecting whole rows).

    ``fuse`` (default True): q/k/v, gate/up and expert gate/up are concatenated per block
    (gptjax.fusion; the model code reads either form).

    Raises WeightsError (all name/shape problems at once) or UnsupportedModelError (a ggml type
    without a decoder, a tensor the architecture cannot run) before reading any tensor data.
    """
    from gptjax.formats.gguf import GGUFFile, read_gguf
    from gptjax.packed import pack_from_gguf_tensor
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

    default_dq = default_dequantize_at_load()
    decoded = _last_read(lambda name: dequantize(gf.tensors[name].raw, gf.tensors[name].ggml_type,
                                                 gf.tensors[name].shape, name=name))

    def leaf(use: _Use):
        # Internal invariant: GGUF rules never transpose or permute (a packed row holds whole
        # blocks along the input dim, so a transpose could not be applied to the bytes); split
        # rules select rows of an expert stack (bytes) or elements of its bias (decoded).
        assert not use.transpose and use.rope_permute is None, use
        t = gf.tensors[use.source]
        if use.split is not None and len(t.shape) < 3:
            return _cast(_split_rows(decoded(use.source), use), dtype)
        dq = (dequantize_at_load if dequantize_at_load is not None
              else default_dq and len(t.shape) < 3)       # expert stacks stay packed
        return pack_from_gguf_tensor(t if use.split is None else _part_bytes(t, use),
                                     dequantize_at_load=bool(dq),
                                     dtype=dtype if len(t.shape) >= 2 else jnp.float32)

    return _build(uses, config, leaf, fuse=fuse)


# safetensors dtypes accepted for float parameters; numpy has no bfloat16/float8, so those are
# read through the library's flax (jax) backend instead.
_NUMPY_DTYPES = {"F64", "F32", "F16"}
_JAX_DTYPES = {"BF16"}
# Pseudo dtype of an OpenAI-layout ``X_blocks`` / ``X_scales`` pair read as one tensor.
_MXFP4 = "MXFP4"


def _pair_mxfp4(shapes: dict, dtypes: dict, problems: list) -> dict[str, str]:
    """Fold every ``X_blocks`` (uint8 [..., G, 16]) + ``X_scales`` (uint8 [..., G]) pair of an
    HF MXFP4 checkpoint (MODEL_FORMATS.md §3.2) into one entry ``X_blocks`` of dtype "MXFP4" and
    logical shape [..., 32 G], in place. Returns {blocks name: scales name}; malformed or
    incomplete pairs are reported in ``problems`` and left out."""
    pairs = {}
    for name in [n for n in shapes if n.endswith("_blocks")]:
        sc = name[: -len("_blocks")] + "_scales"
        b, s = shapes[name], shapes.get(sc)
        if s is None:
            problems.append(f"MXFP4 tensor {name!r} {b} has no scales tensor {sc!r}")
            del shapes[name]
            continue
        if (dtypes[name], dtypes[sc]) != ("U8", "U8") or len(b) < 2 or b[-1] != 16 or b[:-1] != s:
            problems.append(f"MXFP4 tensors {name!r} ({dtypes[name]} {b}) and {sc!r} "
                            f"({dtypes[sc]} {s}): expected uint8 blocks [..., G, 16] and uint8 "
                            f"scales [..., G]")
            del shapes[name], shapes[sc]
            continue
        shapes[name], dtypes[name] = (*b[:-2], b[-2] * 32), _MXFP4
        del shapes[sc]
        pairs[name] = sc
    return pairs


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


def load_params_hf(dirpath, config, dtype=None, *, dequantize_at_load: bool | None = None,
                   fuse: bool = True):
    """The parameter pytree of ``config.arch`` from a Hugging Face directory's safetensors.

    ``config`` comes from the directory's config.json (ModelConfig.from_hf). Float tensors are
    cast per :func:`_cast`. MXFP4 ``_blocks`` / ``_scales`` pairs (gpt-oss experts) are repacked
    to ggml blocks and stay packed (:class:`~gptjax.packed.PackedWeight`, logical dtype
    ``dtype``) unless ``dequantize_at_load`` is true. Raises FormatError for unreadable files,
    WeightsError for name/shape/dtype problems (all at once).
    """
    from gguf import GGMLQuantizationType as gguf_types
    from safetensors import SafetensorError, safe_open

    from gptjax.packed import PackedWeight
    from gptjax.quant import dequantize, mxfp4_openai_to_ggml

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
    pairs = _pair_mxfp4(shapes, dtypes, problems)
    uses = audit(shapes, config, "hf", str(dirpath), problems=problems, dtypes=dtypes,
                 allowed_dtypes=_NUMPY_DTYPES | _JAX_DTYPES | {_MXFP4})

    @_last_read
    def read(name):
        path = located[name]
        if name in pairs:        # ggml block_mxfp4 rows [..., G*17] (exact re-nibbling)
            return mxfp4_openai_to_ggml(handles[path].get_tensor(name),
                                        handles[located[pairs[name]]].get_tensor(pairs[name]))
        if dtypes[name] in _JAX_DTYPES:
            with safe_open(str(path), framework="flax") as g:
                return g.get_tensor(name)
        return handles[path].get_tensor(name)

    def leaf(use: _Use):
        x = read(use.source)
        if use.source not in pairs:
            return _dense_leaf(x, use, config, dtype)
        assert not use.transpose and use.rope_permute is None, use
        rows = _split_rows(x, use)                                   # uint8 [E, O, row_bytes]
        shape = (*rows.shape[:-1], shapes[use.source][-1])
        if dequantize_at_load:
            return _cast(dequantize(rows, gguf_types.MXFP4, shape, name=use.source), dtype)
        return PackedWeight.from_bytes(rows, gguf_types.MXFP4, shape, dtype=dtype,
                                       name=use.source)

    return _build(uses, config, leaf, fuse=fuse)
