"""Load-time fusion of projections that read the same input: one larger matmul instead of two or
three small ones (one kernel launch, one read of the input, a grid that fills the GPU).

The table :data:`FUSIONS` says which parameters of a block are fused, in row order::

    attn_qkv       = attn_q ; attn_k ; attn_v          [NH + 2 KH, D]     llama, gpt-oss
    ffn_gate_up    = ffn_gate ; ffn_up                 [2 F, D]           llama
    ffn_gate_up_exps = ffn_gate_exps ; ffn_up_exps     [E, 2 F, D]        gpt-oss experts

Weights are concatenated along the output-row axis (axis -2 of the logical shape) and biases
along their last axis, so ``linear(x, fused)`` is the concatenation of the parts' outputs (each
output element is the same dot product; only XLA's blocking may change the float32 summation
order).  Packed weights are concatenated as bytes: a ggml row holds whole blocks of one output
row, so rows of the same type concatenate exactly; parts of different types, layouts or dtypes,
or with a bias on some parts only, are left unfused (the model code takes either form:
:func:`split_linear`).  GPT-2's ``attn_qkv`` is fused in the file already.

Decode reads every weight byte once per token either way; what fusion removes is per-launch cost
(~2-5 µs per small kernel on an H100) and the split-K reductions that small matrices need to fill
132 SMs (gpt-oss-20b: K/V projections of 512 rows).  benchmarks/RESULTS.md has the numbers.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from gptjax.models.layers import norm_linear
from gptjax.packed import PackedWeight, SplitK

__all__ = ["FUSIONS", "fuse_block", "fuse_params", "split_linear", "fused_partials"]


def fused_partials() -> bool:
    """Whether :func:`split_linear` hands a fused projection's consumer the K splits' partials
    (``packed.SplitK``) where the Q8_0 kernel splits K (batch decode), so that the decode
    attention kernel sums them as it reads q/k/v instead of an XLA kernel before it.  Env
    ``GPTJAX_QKV_PARTIALS=0`` (read when a model is traced) turns it off; on by default
    (batch-64 gpt-oss-20b decode 7,099 vs 7,090 tok/s on an H200, fifteenth session)."""
    return os.environ.get("GPTJAX_QKV_PARTIALS", "1") == "1"

#: fused parameter -> the parameters it replaces, in row order.
FUSIONS: dict[str, tuple[str, ...]] = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps"),
}


def _concat_rows(ws):
    """Concatenate weights [..., O_i, I] along the rows (plain arrays or same-kind packed)."""
    if isinstance(ws[0], PackedWeight):
        w0 = ws[0]
        # ggml layout: data [..., O, row_bytes]; rows are axis -2 of data as of the shape
        data = jnp.concatenate([w.data for w in ws], axis=-2)
        shape = (*w0.shape[:-2], sum(w.shape[-2] for w in ws), w0.shape[-1])
        return PackedWeight(data, w0.ggml_type, shape, w0.dtype)
    return jnp.concatenate([jnp.asarray(w) for w in ws], axis=-2)


def _fusable(parts) -> bool:
    ws = [p["weight"] for p in parts]
    has_bias = ["bias" in p for p in parts]
    if any(set(p) - {"weight", "bias"} for p in parts) or len(set(has_bias)) != 1:
        return False
    if all(isinstance(w, PackedWeight) for w in ws):
        w0 = ws[0]
        return all(w.layout == "ggml" and w.ggml_type == w0.ggml_type and w.dtype == w0.dtype
                   and w.ndim == w0.ndim and w.shape[:-2] == w0.shape[:-2]
                   and w.shape[-1] == w0.shape[-1] for w in ws)
    if any(isinstance(w, PackedWeight) for w in ws):
        return False
    shapes = [jnp.shape(w) for w in ws]
    return (len({len(s) for s in shapes}) == 1 and len({s[:-2] + s[-1:] for s in shapes}) == 1
            and len({jnp.asarray(w).dtype for w in ws}) == 1)


def fuse_block(block: dict) -> dict:
    """One block's parameters with every applicable :data:`FUSIONS` entry fused (a new dict;
    the parts are removed).  Blocks without the parts, or with parts that cannot be fused, are
    returned unchanged for those entries."""
    out = dict(block)
    for fused, names in FUSIONS.items():
        if fused in out or not all(n in out for n in names):
            continue
        parts = [out[n] for n in names]
        if not _fusable(parts):
            continue
        entry = {"weight": _concat_rows([p["weight"] for p in parts])}
        if "bias" in parts[0]:
            entry["bias"] = jnp.concatenate([jnp.asarray(p["bias"]) for p in parts], axis=-1)
        for n in names:
            del out[n]
        out[fused] = entry
    return out


def fuse_params(params: dict) -> dict:
    """``params`` with every block fused (:func:`fuse_block`); other entries are shared."""
    out = dict(params)
    out["blocks"] = [fuse_block(b) for b in params["blocks"]]
    return out


def split_linear(p: dict, names: tuple[str, ...], x, sizes, *, out_dtype=None, norm=None,
                 dtype=None, with_fused=False):
    """The outputs of the projections ``names`` of block ``p`` on input x [..., I], from their
    fused parameter if the block has it (one matmul, then split) or one by one.  ``sizes``: the
    output width of each part.  With ``norm`` (a ``layers.Norm``), x is the float32 residual
    stream, normalised and cast to ``dtype`` first (``layers.norm_linear``: one fused kernel at
    decode).  Returns a tuple of [..., size_i] in ``out_dtype`` (default: the matmul input's
    dtype; float32 holding such values on the fused decode path).  ``with_fused=True``: returns
    (that tuple, the fused output [..., sum(sizes)] or None when the projections ran one by one)
    -- for a consumer that reads the parts straight from the fused array (XLA would otherwise
    materialise each slice in its own kernel); with :func:`fused_partials` on, that fused output
    may be a ``packed.SplitK`` (the matmul's unsummed K splits; the parts are its value)."""
    fused = next((f for f, parts in FUSIONS.items() if parts == tuple(names)), None)
    dtype = x.dtype if dtype is None else dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    if fused is not None and fused in p:
        y = norm_linear(x, p[fused]["weight"], p[fused].get("bias"), norm=norm, dtype=dtype,
                        out_dtype=out_dtype, partials=with_fused and fused_partials())
        whole = y.value() if isinstance(y, SplitK) else y
        cuts, acc = [], 0
        for s in sizes[:-1]:
            acc += s
            cuts.append(acc)
        parts = tuple(jnp.split(whole, cuts, axis=-1))
        return (parts, y) if with_fused else parts
    parts = tuple(norm_linear(x, p[n]["weight"], p[n].get("bias"), norm=norm, dtype=dtype,
                              out_dtype=out_dtype) for n in names)
    return (parts, None) if with_fused else parts
