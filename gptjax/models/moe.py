"""Mixture of experts for gpt-oss: the top-k router, the clamped SwiGLU and the expert FFNs.

Axis alphabet (docs/INTERFACES.md) plus two local letters: M tokens of the flattened batch
(M = B*T), U experts used per token (top-k, ``config.n_experts_used``), R = M*U routed rows.
E experts, D model dim, F expert ffn dim.

Math (MODEL_FORMATS.md §1.5-1.6; OpenAI gpt_oss/torch/model.py ``MLPBlock``; transformers
``GptOssTopKRouter`` / ``GptOssExperts``; llama.cpp ``build_moe_ffn`` with SOFTMAX_WEIGHT gating
and SWIGLU_OAI_MOE)::

    logits = x @ router.T + b                           [M, E]   float32
    ids, top = top_k(logits, U)                         raw logits first, sorted descending
    w = softmax(top)                                    over the U selected logits only
    for each selected expert e:
        g = x @ gate_e.T + bg_e,  u = x @ up_e.T + bu_e            [F]
        h = min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1)
        y_e = h @ down_e.T + bd_e                                  [D]
    out = sum_u w_u * y_{ids_u}

Parameters (per block; GGUF names, rows = output features)::

    ffn_gate_inp.weight [E, D], .bias [E]               router
    ffn_gate_exps.weight [E, F, D], .bias [E, F]        gate half of the first projection
    ffn_up_exps.weight [E, F, D], .bias [E, F]          linear half
    (or ffn_gate_up_exps.weight [E, 2F, D], .bias [E, 2F]: the two fused at load, gate rows first;
    gptjax.fusion)
    ffn_down_exps.weight [E, D, F], .bias [E, D]

The expert matrices are either dense arrays or :class:`gptjax.packed.PackedWeight` stacks that
keep the file's MXFP4 (or other ggml) blocks, ``uint8[E, O, row_bytes]``. Packed stacks are
never dequantized whole: both paths below decode only the experts they use.

The block as the models call it is :func:`moe_block` (``x + moe(norm(x))``); at decode (<= 2
tokens, MXFP4 experts, kernels on) it is three Pallas kernels instead: the router GEMV with the
RMSNorm in (``layers.norm_linear``), then pallas_kernels/moe_decode.py's gate/up (top-k and
SwiGLU inside) and down (weighted sum and residual inside).  With the kernels on, more than 16
routed rows and few enough tokens for one routing program (batch decode, short prompts:
:func:`experts_grouped_kernel`), :func:`moe` runs the routing kernel (pallas_kernels/moe_route.py:
top-k, softmax, the sort by expert and the tiles in one program) and the grouped expert kernel on
expert-sorted rows for both projections.  Otherwise :func:`moe` runs the experts one of two ways
(plain JAX, or the MXFP4 "pairs"/"grouped" kernels where noted):

* **gather** (:func:`experts_gather`, decode): gathers the blocks of the U experts of each token
  (``PackedWeight.take`` on the packed bytes), dequantizes those, and applies them with batched
  einsums. Memory ~ R * 3 * F * D weights, so it is used only when R <= :data:`GATHER_MAX_ROWS`.
* **sorted** (:func:`experts_sorted`, prefill): the R rows are sorted by expert id (stable, so
  the rows of one expert keep their token order), then a ``fori_loop`` over the E experts
  dequantizes each *used* expert once (``lax.cond`` skips experts no token chose) and runs its
  contiguous rows through the FFN in chunks of C rows (an inner loop with a data-dependent trip
  count ceil(n_e / C)). Peak memory: one expert's weights plus C rows, independent of E and of
  the prompt length; compute: the R rows plus at most C - 1 padding rows per used expert.
  Nothing is dropped (no capacity factor): the result is exact for any routing.
  ``lax.ragged_dot`` was the other candidate; it needs the weights of all E experts dense at
  once (gpt-oss-120b: 128 experts x 3 x 2880^2 per layer), which this loop avoids.

Numerics: matmuls take the compute dtype (``x.dtype``; packed weights are decoded exactly and
rounded to it) and accumulate in float32; router, softmax, activation, biases and the weighted
sum are float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gptjax.models.layers import F32, einsum_f32, linear
from gptjax.packed import PackedWeight

__all__ = [
    "GATHER_MAX_ROWS", "route", "swiglu_oai", "experts_gather", "experts_grouped_kernel",
    "experts_sorted", "moe",
    "moe_block", "expert_weights", "gate_up",
]

#: Use the gather path when the routed rows R = M*U are at most this many (decode of a few rows).
GATHER_MAX_ROWS = 8
#: With the kernels on, routed rows up to which the Pallas MoE kernel runs instead of the sorted
#: path.  H100, gpt-oss-20b (benchmarks/RESULTS.md): the grouped kernel reads each routed expert
#: once per tile and wins at batch-64 decode and pp512 by 5-10x (second session), and since the
#: kernels' later speed-ups also at 4096 tokens: prefill 26,220 tok/s against the sorted path's
#: 13,142 (ninth session; the sorted path waits on the host at every expert's ``cond`` and
#: chunk loop), with a lower peak (13.5 vs ~20.7 GiB).  Both scale linearly in the rows past
#: that; the bound is for memory: the grouped path holds float32 [R, 2F] gate/up outputs (and
#: their un-sorted copy), ~3 GB at 65,536 rows (16k tokens at top-4) for gpt-oss.
KERNEL_MAX_ROWS = 65536
#: Largest row chunk of the sorted path.
MAX_CHUNK = 256


def route(x, weight, bias, n_used):
    """Top-k router: (weights float32 [M, U], expert ids int32 [M, U]).

    x: [M, D]; weight: [E, D]; bias: [E]. The U largest raw logits are selected (sorted
    descending, ``lax.top_k``; ties go to the lower expert id) and softmax is taken over those U
    logits only (OpenAI ``MLPBlock``: ``topk`` then ``softmax(experts.values)``; transformers
    ``GptOssTopKRouter``).
    """
    logits = linear(x, weight, bias, out_dtype=F32)                     # [M, E]
    top, ids = lax.top_k(logits, n_used)                                # [M, U]
    return jax.nn.softmax(top, axis=-1), ids.astype(jnp.int32)


def swiglu_oai(gate, up, *, alpha, limit):
    """gpt-oss clamped SwiGLU, float32: ``g * sigmoid(alpha g) * (u + 1)`` with
    ``g = min(gate, limit)`` (clamped above only) and ``u = clamp(up, -limit, limit)``.

    OpenAI ``swiglu`` (alpha 1.702, limit 7), transformers ``GptOssExperts._apply_gate``, ggml
    ``ggml_swiglu_oai`` (``x / (1 + exp(-alpha x)) * (y + 1)``). gate, up: [..., F] → float32.
    """
    g = jnp.minimum(gate.astype(F32), limit)
    u = jnp.clip(up.astype(F32), -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1.0)


def expert_weights(w, ids, dtype):
    """The matrices of experts ``ids`` (int, any shape) of a stack w [E, O, I], dense in ``dtype``:
    [*ids.shape, O, I]. A packed stack gathers its packed rows first and decodes only those."""
    if isinstance(w, PackedWeight):
        return w.take(ids).dequantize(dtype)
    return jnp.take(w, ids, axis=0).astype(dtype)


def experts_gather(x, ids, weights, p, config):
    """Expert FFNs by gathering each row's experts. x: [M, D]; ids: int [M, U]; weights:
    float32 [M, U] → float32 [M, D]. See the module docstring."""
    dtype = x.dtype
    a, lim = config.swiglu_alpha, config.swiglu_limit
    if _use_moe_kernel(p):
        return _experts_gather_kernel(x, ids, weights, p, config)
    g, u = gate_up(p, lambda q: einsum_f32("md,mufd->muf", x, expert_weights(q["weight"], ids, dtype))
                   + jnp.take(q["bias"], ids, axis=0))                         # [M, U, F] x 2
    h = swiglu_oai(g, u, alpha=a, limit=lim).astype(dtype)                    # [M, U, F]
    wd = expert_weights(p["ffn_down_exps"]["weight"], ids, dtype)             # [M, U, D, F]
    y = einsum_f32("muf,mudf->mud", h, wd) + jnp.take(p["ffn_down_exps"]["bias"], ids, axis=0)
    return jnp.einsum("mu,mud->md", weights, y)                               # [M, D] f32


def _first_names(p) -> tuple[str, ...]:
    """The first projection's parameters: the fused gate/up stack (gptjax.fusion) or the pair."""
    return ("ffn_gate_up_exps",) if "ffn_gate_up_exps" in p else ("ffn_gate_exps", "ffn_up_exps")


def _halves(ys):
    """(gate, up) from the first projection's outputs: one fused [..., 2F] or two [..., F]."""
    if len(ys) == 2:
        return ys[0], ys[1]
    f = ys[0].shape[-1] // 2
    return ys[0][..., :f], ys[0][..., f:]


def gate_up(p, apply):
    """(gate, up) outputs [..., F] of the first expert projection, ``apply(param) -> [..., O]``
    run on the fused stack ``ffn_gate_up_exps`` (rows: gate then up) or on the two stacks."""
    return _halves([apply(p[n]) for n in _first_names(p)])


def kernel_max_rows() -> int:
    """Routed rows up to which the Pallas MoE kernel replaces the sorted XLA path when the kernels
    are on (its "pairs" mode up to 16 rows, "grouped" beyond): env GPTJAX_MOE_KERNEL_MAX_ROWS,
    default :data:`KERNEL_MAX_ROWS`."""
    import os

    return int(os.environ.get("GPTJAX_MOE_KERNEL_MAX_ROWS", KERNEL_MAX_ROWS))


def _use_moe_kernel(p) -> bool:
    from pallas_kernels import kernel_mode

    names = [n for n in ("ffn_gate_up_exps", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if n in p]
    return (kernel_mode() != "ref"
            and all(isinstance(p[n]["weight"], PackedWeight) and p[n]["weight"].type_name == "MXFP4"
                    for n in names))


def _experts_gather_kernel(x, ids, weights, p, config):
    """:func:`experts_gather` with the fused Pallas MXFP4 MoE matmul (pallas_kernels.mxfp4_matmul,
    "pairs" mode for decode): only the routed experts' packed bytes are read, decoded in registers.
    The down projection treats each (row, slot) pair as its own row with one expert."""
    from pallas_kernels import kernel_mode
    from pallas_kernels.mxfp4_matmul import mxfp4_moe_matmul

    interpret = kernel_mode() == "interpret"
    M, U = ids.shape
    # the PackedWeights themselves: their static scale_max lets the kernel skip a multiply
    g, u = gate_up(p, lambda q: mxfp4_moe_matmul(x, q["weight"], ids, q["bias"],
                                                 interpret=interpret))         # [M, U, F] f32 x 2
    h = swiglu_oai(g, u, alpha=config.swiglu_alpha, limit=config.swiglu_limit).astype(x.dtype)
    y = mxfp4_moe_matmul(h.reshape(M * U, -1), p["ffn_down_exps"]["weight"], ids.reshape(M * U, 1),
                         p["ffn_down_exps"]["bias"], interpret=interpret)       # [M*U, 1, D] f32
    return jnp.einsum("mu,mud->md", weights, y.reshape(M, U, -1))              # [M, D] f32


def _chunk_rows(n_rows, n_experts):
    """Rows per chunk of the sorted path: the power of two >= the mean rows per expert,
    clamped to [8, MAX_CHUNK] and to the padded row count."""
    mean = -(-n_rows // n_experts)
    c = 8
    while c < mean and c < MAX_CHUNK:
        c *= 2
    return c


def experts_sorted(x, ids, weights, p, config, *, chunk=None):
    """Expert FFNs with rows grouped by expert (sort + per-expert loop). x: [M, D]; ids: int
    [M, U]; weights: float32 [M, U] → float32 [M, D]. ``chunk``: rows per inner step (static;
    default :func:`_chunk_rows`). See the module docstring."""
    M, D = x.shape
    U = ids.shape[1]
    E = config.n_experts
    R = M * U
    C = _chunk_rows(R, E) if chunk is None else int(chunk)
    dtype = x.dtype
    a, lim = config.swiglu_alpha, config.swiglu_limit
    pd = p["ffn_down_exps"]
    firsts = [p[n] for n in _first_names(p)]                                  # gate_up, or gate + up

    flat = ids.reshape(R)                                                     # [R] expert of row
    order = jnp.argsort(flat, stable=True)                                    # [R] sorted → row
    counts = jnp.bincount(flat, length=E)                                     # [E]
    starts = jnp.cumsum(counts) - counts                                      # [E] first sorted row
    xs = jnp.take(x, order // U, axis=0)                                      # [R, D] sorted rows
    xs = jnp.concatenate([xs, jnp.zeros((C, D), dtype)], axis=0)              # [R + C, D]
    out = jnp.zeros((R + C, D), F32)

    def one_expert(e, out):
        n = counts[e]

        def run(out):
            w1 = [(expert_weights(q["weight"], e, dtype), q["bias"][e]) for q in firsts]
            wd = expert_weights(pd["weight"], e, dtype)                       # [D, F]
            bd = pd["bias"][e]

            def step(c, out):
                s = starts[e] + c * C
                xc = lax.dynamic_slice_in_dim(xs, s, C, axis=0)               # [C, D]
                ys = [linear(xc, w, b, out_dtype=F32) for w, b in w1]         # [C, 2F] or 2 x [C, F]
                h = swiglu_oai(*_halves(ys), alpha=a, limit=lim)
                y = linear(h.astype(dtype), wd, bd, out_dtype=F32)            # [C, D]
                # A last chunk running past expert e's rows writes garbage over the rows of
                # later experts (sorted order), which overwrite them afterwards, or over the C
                # padding rows, which are dropped: no mask needed.
                return lax.dynamic_update_slice_in_dim(out, y, s, axis=0)

            return lax.fori_loop(0, (n + C - 1) // C, step, out)

        return lax.cond(n > 0, run, lambda o: o, out)

    out = lax.fori_loop(0, E, one_expert, out)
    y = jnp.zeros((R, D), F32).at[order].set(out[:R])                         # back to row order
    return jnp.einsum("mu,mud->md", weights, y.reshape(M, U, D))              # [M, D] f32


def _grouped_kernel_ok(x, p, config) -> bool:
    """Whether :func:`experts_grouped_kernel` takes this call: Pallas MoE kernels on, more
    routed rows than the "pairs" GEMVs take (mxfp4_matmul.plan_moe) and at most
    :func:`kernel_max_rows`, and a token count one routing program holds."""
    from pallas_kernels import moe_route as mr
    from pallas_kernels.mxfp4_matmul import PAIRS_MAX_ROWS

    rows = x.shape[0] * config.n_experts_used
    return (_use_moe_kernel(p) and PAIRS_MAX_ROWS < rows <= kernel_max_rows()
            and mr.fits(x.shape[0], config.n_experts))


def experts_grouped_kernel(x, logits, p, config):
    """The experts with the routing kernel and the grouped kernel on expert-sorted rows
    (pallas_kernels.moe_route, mxfp4_matmul.mxfp4_moe_grouped): one routing program (top-k,
    softmax, sort, tiles), the rows gathered once into expert order, both projections and the
    SwiGLU in that order, one gather back for the weighted sum.  x: [M, D] in the compute dtype;
    logits: float32 [M, E] → float32 [M, D]."""
    from pallas_kernels import kernel_mode
    from pallas_kernels.moe_route import moe_route
    from pallas_kernels.mxfp4_matmul import moe_block_m, mxfp4_moe_grouped

    interpret = kernel_mode() == "interpret"
    M, U = x.shape[0], config.n_experts_used
    bm = moe_block_m(M * U)
    r = moe_route(logits, n_used=U, block_m=bm, interpret=interpret)
    xs = jnp.take(x, r.order // U, axis=0)                                    # [R, D] sorted
    kw = dict(block_m=bm, interpret=interpret)
    g, u = gate_up(p, lambda q: mxfp4_moe_grouped(xs, q["weight"], r.tiles, q["bias"], **kw))
    h = swiglu_oai(g, u, alpha=config.swiglu_alpha, limit=config.swiglu_limit).astype(x.dtype)
    pd = p["ffn_down_exps"]
    y = mxfp4_moe_grouped(h, pd["weight"], r.tiles, pd["bias"], **kw)        # [R, D] sorted
    y = jnp.take(y, r.inv.reshape(-1), axis=0).reshape(M, U, -1)              # [M, U, D]
    return jnp.einsum("mu,mud->md", r.weights, y)


def moe(x, p, config, *, path=None):
    """The gpt-oss MoE block: router then experts. x: [M, D] in the compute dtype → float32
    [M, D]. ``path``: "gather", "sorted" or None: with the Pallas MoE kernels on (MXFP4 experts,
    kernels on), :func:`experts_grouped_kernel` where it applies (:func:`_grouped_kernel_ok`),
    else gather when M*U <= GATHER_MAX_ROWS or (kernels on) M*U <= :func:`kernel_max_rows` (the
    gather path then runs the kernel); sorted otherwise."""
    router = p["ffn_gate_inp"]
    if path is None and _grouped_kernel_ok(x, p, config):
        logits = linear(x, router["weight"], router["bias"], out_dtype=F32)   # as route()
        return experts_grouped_kernel(x, logits, p, config)
    weights, ids = route(x, router["weight"], router["bias"], config.n_experts_used)
    if path is None:
        rows = x.shape[0] * config.n_experts_used
        limit = kernel_max_rows() if _use_moe_kernel(p) else GATHER_MAX_ROWS
        path = "gather" if rows <= limit else "sorted"
    if path == "gather":
        return experts_gather(x, ids, weights, p, config)
    if path == "sorted":
        return experts_sorted(x, ids, weights, p, config)
    raise ValueError(f"moe path {path!r}: expected 'gather', 'sorted' or None")


def moe_block(x, p, config, norm, dtype):
    """The residual MoE block: ``x + moe(norm(x))``. x: float32 [M, D] (the residual stream);
    norm: the block's ``layers.Norm`` (gpt-oss: RMSNorm post_attention_norm); dtype: the compute
    dtype → float32 [M, D].

    Decode (M <= ``moe_decode.MAX_ROWS`` tokens) with the kernels on and MXFP4 experts runs as
    three Pallas kernels (pallas_kernels/moe_decode.py): the norm + router GEMV
    (``layers.norm_linear``, which also returns the normalised row), then gate/up with top-k and
    SwiGLU inside, then down with the weighted sum and the residual add inside.  Where
    :func:`experts_grouped_kernel` applies (batch decode), the norm and the router run as one
    fused GEMV (its row groups) in front of it.  Everything else: the XLA composition."""
    from pallas_kernels import kernel_mode
    from pallas_kernels import moe_decode as md

    mode = kernel_mode()
    if mode != "ref" and x.shape[0] <= md.MAX_ROWS and _use_moe_kernel(p):
        from gptjax.models.layers import norm_linear

        interpret = mode == "interpret"
        kw = dict(n_used=config.n_experts_used, alpha=config.swiglu_alpha,
                  limit=config.swiglu_limit, cdt=jnp.dtype(dtype), interpret=interpret)
        logits, n = norm_linear(x, p["ffn_gate_inp"]["weight"], p["ffn_gate_inp"]["bias"],
                                norm=norm, dtype=dtype, return_normed=True)  # [M, E] f32, [M, D] dtype
        firsts = [(p[n_]["weight"].data, p[n_]["bias"]) for n_ in _first_names(p)]
        (wg, bg), (wu, bu) = firsts if len(firsts) == 2 else (firsts[0], (None, None))
        h = md.moe_gate_up_swiglu(n, logits, wg, bg, wu, bu, **kw)            # [M*U, F] f32
        pd = p["ffn_down_exps"]
        return md.moe_down_combine(h, logits, pd["weight"].data, pd["bias"], x, **kw)
    if mode != "ref" and _grouped_kernel_ok(x, p, config):
        # Batch decode: the norm and the router in one kernel where it takes the rows (the
        # fused GEMV's row groups), else the same composition as moe()'s.
        from gptjax.models.layers import norm_linear

        router = p["ffn_gate_inp"]
        logits, n = norm_linear(x, router["weight"], router["bias"], norm=norm, dtype=dtype,
                                return_normed=True, row_groups=True)     # [M, E] f32, [M, D]
        return x + experts_grouped_kernel(n, logits, p, config)
    return x + moe(norm(x, out_dtype=dtype), p, config)
