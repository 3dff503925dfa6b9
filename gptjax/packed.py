"""Packed quantized weights as pytree leaves, and the matmul and embedding that dequantize inside.

Why a separate file from :mod:`gptjax.quant`: quant.py is the *format* (what the bytes of each ggml
type mean, bit-exactly); this file is how weights *live on the device and get used*: a pytree leaf
that keeps the file's bytes (:class:`PackedWeight`), :func:`linear` and :func:`embed` that accept
either a plain array or a packed leaf (so model code never branches on quantization), and the
load-time choice between the two (:func:`pack_from_gguf_tensor`).  ``gptjax.quant`` re-exports
these names, so ``quant.linear`` and ``packed.linear`` are the same function.

Axis alphabet (docs/INTERFACES.md): O output features, I input features (a weight is ``[O, I]``,
one row per output feature: torch ``Linear`` and GGUF layout), E experts, V vocab, D model dim.

How the reference (plain-JAX) path computes ``linear(x, w)`` with a packed ``w``
-------------------------------------------------------------------------------
1. the rows' blocks are decoded to float32 with the exact dequantizers of quant.py (bit-identical
   to ``gguf.quants.dequantize``), then rounded to the compute dtype, which is ``x.dtype``
   (float32 or bfloat16);
2. ``x @ w.T`` runs in that dtype with float32 accumulation (``preferred_element_type=float32``);
   on XLA:CPU 16-bit operands are first upcast to float32, which is exact (the product of two
   bf16 values is exact in float32, which is what a GPU's bf16 dot with f32 accumulation does);
3. the bias is added to the float32 accumulator, then the result is cast to ``out_dtype``.

Inside ``jax.jit`` XLA fuses the decoding into one elementwise loop, but on CPU the dot is a library
call, so the decoded matrix is materialised.  For big matrices on the CPU backend the rows are
therefore processed in tiles of about :data:`TILE_ELEMENTS` weights (a ``fori_loop`` over row tiles,
the last one clamped to overlap its neighbour instead of padding), so the float32 temporary stays
~1 MiB and cache-resident instead of 4 bytes x every weight per call.  Measured on the 2-core CPU
dev box (jax 0.10.2, see benchmarks/RESULTS.md): for the 49152 x 576 Q8_0 output head, decode
(1 row) was 2-4x faster tiled than dequantized whole (e.g. ~36 ms vs ~150 ms), with a flat optimum between
2^17 and 2^19 weights per tile; matrices up to ~2^20 weights (e.g. 1536 x 576) are as fast or
faster dequantized whole, hence :data:`UNTILED_MAX_ELEMENTS`.  On GPU/TPU the whole matrix is
dequantized (a sequential loop of small dots would waste the device; Pallas kernels replace this
path there).

Dequantize-at-load is the alternative (:func:`pack_from_gguf_tensor` with
``dequantize_at_load=True``, or :func:`to_dense`): 3.8x (Q8_0) to 6.4x (Q4_1) the memory of the
packed bytes in float32, but a plain dense matmul at run time.

Default per backend (benchmarks/quant_cpu.py, RESULTS.md).  CPU: dequantize at load whenever the
float32 weights fit comfortably in RAM.  On the 2-core dev box the packed reference path made the
matmuls of one SmolLM2-135M decode step 3.5-4.3x slower than dense float32 (XLA:CPU spends the time
decoding, not reading: the f32 GEMV is memory-bound at ~8 GB/s while decoding costs ~1 ns per
weight), and 1.0-2.5x slower for 64-row prefill chunks; the whole model is 92 MiB packed vs 513 MiB
in float32.  Packed remains the CPU choice for models whose float32 size does not fit (gpt-oss-20b:
~12 GiB packed vs ~80 GiB).  GPU: packed (the design default; weights stay in the file's bytes).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as _T
from jax import lax

from gptjax.errors import UnsupportedModelError, WeightsError
from gptjax.quant import (
    QUANT_BLOCK,
    check_raw,
    dequantize,
    dequantize_blocks,
    ggml_type_name,
    row_bytes,
)

__all__ = [
    "PackedWeight",
    "SplitK",
    "linear",
    "embed",
    "to_dense",
    "pack_from_gguf_tensor",
    "is_packed",
    "FLOAT_TYPES",
    "KERNEL_LAYOUTS",
    "use_kernel_layout",
    "TILE_ELEMENTS",
    "UNTILED_MAX_ELEMENTS",
]

F32 = jnp.float32

#: ggml types that :func:`pack_from_gguf_tensor` always returns as plain arrays (there is nothing
#: to unpack: they are ordinary floats).  :class:`PackedWeight` still accepts them.
FLOAT_TYPES = frozenset({int(_T.F32), int(_T.F16), int(_T.BF16)})

# Both read when :func:`linear` is traced: changing them does not affect functions already traced.
#: CPU reference path: weights per row tile (float32 tile = 1 MiB).  Measured optimum, see above.
TILE_ELEMENTS = 1 << 18
#: CPU reference path: matrices with at most this many weights are dequantized whole.
UNTILED_MAX_ELEMENTS = 1 << 20


@functools.partial(jax.tree_util.register_dataclass, data_fields=["parts", "bias"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class SplitK:
    """A projection's result left as its K splits' partial products (``linear(...,
    partials=True)``), for a kernel that sums them where it reads the result (the decode
    attention reads the fused q/k/v projection this way at batch decode: no XLA sum kernel in
    between).  parts: float32 ``[S, ..., O]``; bias: float32 ``[O]`` or None; dtype: the
    rounding of the result (static in the pytree).  :meth:`value` is exactly what
    :func:`linear` returns otherwise."""

    parts: jax.Array
    bias: Any
    dtype: Any

    def value(self) -> jax.Array:
        y = self.parts.sum(axis=0)
        if self.bias is not None:
            y = y + self.bias
        return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """A quantized tensor kept as the file's bytes: a JAX pytree leaf with static type and shape.

    ``data``: ``uint8[*shape[:-1], row_bytes]``, one row of ggml blocks per innermost row, exactly
    as the GGUF file stores it (``row_bytes = shape[-1] / elements_per_block * bytes_per_block``);
    the only pytree child, so it is what ``jax.jit`` traces, ``jax.device_put`` moves and
    ``jax.eval_shape`` abstracts.
    ``ggml_type``: a ``gguf.GGMLQuantizationType`` id (any key of ``quant.QUANT_BLOCK``); static.
    ``shape``: the logical shape, e.g. ``(O, I)`` or ``(E, O, I)``; static.
    ``dtype``: the float dtype the weight stands for (what :meth:`dequantize` returns by default and
    what ``x.astype(w.dtype)`` in model code gets); static.  :func:`linear` computes in ``x.dtype``.
    ``layout``: ``"ggml"`` (``data`` as above) or ``"kernel"``: ``data`` is the Pallas kernels'
    repacked layout for the type (:data:`KERNEL_LAYOUTS`: MXFP4 -> ``Mxfp4Weights(qs, scales)``,
    Q8_0 -> ``Q8Weights(qs, scales)``, the same bytes with the block scales split off so that the
    code bytes are 16-byte aligned; a pure byte shuffle, exact).  Made at load time by
    :meth:`to_kernel_layout` when the kernels are on (the kernels read it ~1.4-1.7x faster than
    the 17/34-byte ggml blocks, benchmarks/RESULTS.md); every operation here accepts both.

    ``scale_max``: MXFP4 in the kernel layout only, the largest E8M0 scale byte of the tensor
    (set by :meth:`to_kernel_layout`; None: unknown).  A static hint for the kernels: with every
    scale byte <= 128 the grouped MoE kernel's byte decode needs one multiply per weight pair
    instead of two (``pallas_kernels.mxfp4_matmul._byte_pair_bf16_asm``).

    Build one with :meth:`from_bytes` (validates); the raw constructor does not validate because
    JAX rebuilds the object from tracers and placeholders.
    """

    data: Any
    ggml_type: int
    shape: tuple[int, ...]
    dtype: Any = np.dtype(np.float32)
    layout: str = "ggml"
    scale_max: int | None = None

    def __post_init__(self):
        # Static fields normalised to hashable plain values (jit caches on them).
        object.__setattr__(self, "ggml_type", int(self.ggml_type))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.scale_max is not None:
            object.__setattr__(self, "scale_max", int(self.scale_max))
        if self.layout not in ("ggml", "kernel"):
            raise WeightsError(f"PackedWeight layout {self.layout!r}: expected 'ggml' or 'kernel'")

    @classmethod
    def from_bytes(cls, raw, ggml_type: int, shape: Sequence[int], *, dtype=F32,
                   name: str | None = None, device=None) -> PackedWeight:
        """Validate ``raw`` (uint8, flat or ``[..., row_bytes]``) and put it on ``device``.

        The bytes are copied as bytes (never expanded on the host).  Raises
        UnsupportedModelError for a type without a decoder and WeightsError for a byte count or
        shape that does not fit the type, naming ``name``.
        """
        raw, shape = check_raw(raw, ggml_type, shape, name=name)
        if not jnp.issubdtype(np.dtype(dtype), jnp.floating):
            raise WeightsError(f"tensor {name!r}: dtype must be a float dtype, got {dtype}")
        rows = raw.reshape(*shape[:-1], row_bytes(ggml_type, shape[-1]))
        data = jax.device_put(rows if isinstance(rows, jax.Array) else np.asarray(rows), device)
        return cls(data, ggml_type, shape, dtype)

    # -- array-like attributes ----------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of logical elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (the packed blocks), not the dequantized size."""
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(self.data))

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    def __repr__(self) -> str:
        return (f"PackedWeight({self.type_name}, shape={self.shape}, dtype={self.dtype.name}, "
                f"nbytes={self.nbytes})")

    # -- operations -------------------------------------------------------------------------
    def dequantize(self, dtype=None) -> jax.Array:
        """The dense tensor ``[*shape]`` in ``dtype`` (default ``self.dtype``).

        Exact float32 decoding (bit-identical to ``gguf.quants.dequantize``), then one rounding to
        ``dtype``.  Traceable; outside jit it runs as one compiled program.
        """
        return _dequantize_jit(self.to_ggml_layout(), np.dtype(self.dtype if dtype is None else dtype))

    def to_kernel_layout(self) -> PackedWeight:
        """This weight in the kernels' layout (``layout="kernel"``) if its type has one and it is
        at least 2-D, else itself.  Runs on the device where ``data`` lives (jitted shuffle)."""
        if self.layout == "kernel" or self.ggml_type not in _kernel_layouts() or self.ndim < 2:
            return self
        repack, _ = _kernel_layouts()[self.ggml_type]
        data = repack(self.data)
        scale_max = None                      # unknown under tracing (a hint, never required)
        if self.ggml_type == int(_T.MXFP4):
            try:
                scale_max = int(jnp.max(data.scales))
            except jax.errors.ConcretizationTypeError:
                pass
        return dataclasses.replace(self, data=data, layout="kernel", scale_max=scale_max)

    def to_ggml_layout(self) -> PackedWeight:
        """This weight with ``data`` as ggml bytes ``uint8[*shape[:-1], row_bytes]`` (inverse of
        :meth:`to_kernel_layout`; traceable)."""
        if self.layout == "ggml":
            return self
        _, unpack = _kernel_layouts()[self.ggml_type]
        return dataclasses.replace(self, data=unpack(self.data), layout="ggml", scale_max=None)

    def take(self, indices, *, mode: str = "clip") -> PackedWeight:
        """Rows along axis 0, still packed: ``[*indices.shape, *shape[1:]]``.

        Embedding rows of a ``[V, D]`` table, or the experts of an ``[E, O, I]`` stack.  ``mode``
        as in ``jnp.take``; the default clips out-of-range indices (a bad id never becomes NaN).
        """
        if self.ndim < 2:
            raise WeightsError(f"{self!r}: take() needs at least 2 dimensions (rows of blocks)")
        data = jax.tree_util.tree_map(lambda a: jnp.take(a, indices, axis=0, mode=mode), self.data)
        shape = (*jnp.shape(indices), *self.shape[1:])
        return PackedWeight(data, self.ggml_type, shape, self.dtype, self.layout, self.scale_max)


jax.tree_util.register_dataclass(PackedWeight, data_fields=["data"],
                                 meta_fields=["ggml_type", "shape", "dtype", "layout", "scale_max"])


@functools.cache
def _kernel_layouts() -> dict:
    """ggml type -> (jitted repack, unpack) of the Pallas kernels' layout for it."""
    from pallas_kernels.mxfp4_matmul import repack_mxfp4, unpack_mxfp4
    from pallas_kernels.q8_matmul import repack_q8_0, unpack_q8_0

    return {int(_T.MXFP4): (jax.jit(repack_mxfp4), unpack_mxfp4),
            int(_T.Q8_0): (jax.jit(repack_q8_0), unpack_q8_0)}


#: ggml types with a kernel layout (:meth:`PackedWeight.to_kernel_layout`).
KERNEL_LAYOUTS = frozenset({int(_T.MXFP4), int(_T.Q8_0)})


def use_kernel_layout() -> bool:
    """Whether loaders should repack weights to the kernel layout: when the Pallas kernels are on
    (``pallas_kernels.kernel_mode()`` is "pallas" or "interpret")."""
    from pallas_kernels import kernel_mode

    return kernel_mode() != "ref"


def is_packed(x) -> bool:
    """True for a :class:`PackedWeight` (use as ``is_leaf`` in ``jax.tree.map``)."""
    return isinstance(x, PackedWeight)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(w: PackedWeight, dtype: np.dtype) -> jax.Array:
    per_block, block_bytes = QUANT_BLOCK[w.ggml_type]
    nb = w.shape[-1] // per_block
    blocks = w.data.reshape(*w.shape[:-1], nb, block_bytes)                 # [..., nb, bytes]
    return dequantize_blocks(blocks, w.ggml_type).reshape(w.shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# linear / embed
# ---------------------------------------------------------------------------------------------

def _cpu_upcast(a: jax.Array) -> jax.Array:
    """16-bit float -> float32 on the CPU backend, which cannot run some bf16 x bf16 -> f32 dots
    (XLA:CPU "Unsupported element type for DotThunk"); exact, see the module docstring."""
    if jax.default_backend() == "cpu" and a.dtype in (jnp.bfloat16, jnp.float16):
        return a.astype(F32)
    return a


def _tile_rows(w: PackedWeight) -> int:
    """Rows per tile for the reference path: all of them off CPU or for small matrices."""
    o, i = w.shape
    if jax.default_backend() != "cpu" or o * i <= UNTILED_MAX_ELEMENTS:
        return o
    return max(1, min(o, TILE_ELEMENTS // i))


def linear(x, w, b=None, *, out_dtype=None, partials=False):
    """Dense layer ``y = x @ w.T + b`` accumulated in float32, for plain or packed ``w``.

    x: [..., I] float; w: [O, I] (a jax/numpy array or a :class:`PackedWeight`); b: [O] or None
    -> [..., O] in ``out_dtype`` (default: ``x.dtype``).  The bias is added to the float32
    accumulator before the cast.  Same signature and, for plain arrays, the same math as
    ``gptjax.models.layers.linear`` (``einsum`` with dtype promotion, float32 accumulation).

    Packed ``w``: decoded exactly, rounded to ``x.dtype``, multiplied with float32 accumulation
    (see the module docstring for tiling).  Matmul precision follows JAX's default
    (``jax_default_matmul_precision``), as for plain arrays.

    ``partials=True``: where the Pallas Q8_0 kernel runs with its K split, returns a
    :class:`SplitK` instead (``.value()`` is the array this call returns otherwise); elsewhere
    the array as usual.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if isinstance(w, PackedWeight):
        if w.ndim != 2:
            raise WeightsError(f"linear: packed weight {w!r} must be 2-D [out, in]; select the "
                               f"experts of a stacked weight with w.take(e) first")
        if x.shape[-1] != w.shape[1]:
            raise WeightsError(f"linear: x of shape {tuple(x.shape)} cannot multiply a weight of "
                               f"shape {w.shape} [out, in]: expected x[..., {w.shape[1]}]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise WeightsError(f"linear: x must be a float array, got dtype {x.dtype}")
        kernel = _matmul_kernel(w)
        if kernel is not None and partials and w.ggml_type == int(_T.Q8_0):
            parts = kernel(x, w.data, None, partials=True, interpret=_interpret())  # [S, ..., O]
            bias = None if b is None else to_dense(b, F32)
            if parts.shape[0] > 1:
                return SplitK(parts, bias, jnp.dtype(out_dtype))
            y = parts[0]
        elif kernel is not None:                                            # fused Pallas decode
            y = kernel(x, w.data, None, interpret=_interpret())            # [..., O] f32
        else:
            y = _packed_matmul(x, w.to_ggml_layout(), _tile_rows(w))       # [..., O] f32
    else:
        y = jnp.einsum("...i,oi->...o", _cpu_upcast(x), _cpu_upcast(w), preferred_element_type=F32)
    if b is not None:
        y = y + to_dense(b, F32)
    return y.astype(out_dtype)


def _interpret() -> bool:
    from pallas_kernels import kernel_mode

    return kernel_mode() == "interpret"


def _matmul_kernel(w: "PackedWeight"):
    """The Pallas matmul for ``w``'s type when kernels are on (pallas_kernels.kernel_mode), else
    None (the XLA reference: decode then dot).  MXFP4 and Q8_0 have kernels."""
    from pallas_kernels import kernel_mode

    if kernel_mode() == "ref":
        return None
    if w.ggml_type == int(_T.MXFP4):
        from pallas_kernels.mxfp4_matmul import mxfp4_matmul

        return mxfp4_matmul
    if w.ggml_type == int(_T.Q8_0):
        from pallas_kernels.q8_matmul import q8_0_matmul

        return q8_0_matmul
    return None


@functools.partial(jax.jit, static_argnames=("tile_rows",))
def _packed_matmul(x: jax.Array, w: PackedWeight, tile_rows: int) -> jax.Array:
    """x [..., I] @ dequant(w [O, I]).T -> float32 [..., O], ``tile_rows`` output rows at a time."""
    o, i = w.shape
    lead = x.shape[:-1]
    m = math.prod(lead)
    xc = _cpu_upcast(x.reshape(m, i))                                       # [M, I]

    def tile(data):                                                         # uint8 [R, row_bytes]
        wt = PackedWeight(data, w.ggml_type, (data.shape[0], i)).dequantize(x.dtype)  # [R, I]
        return lax.dot_general(xc, _cpu_upcast(wt), (((1,), (1,)), ((), ())),
                               preferred_element_type=F32)                  # [M, R]

    if tile_rows >= o:
        y = tile(w.data)
    else:
        def body(k, y):
            # The last tile is clamped to end at row O (overlapping the previous one, whose rows
            # are recomputed identically) so that every tile has the same static size.
            start = jnp.minimum(k * tile_rows, o - tile_rows)
            yt = tile(lax.dynamic_slice_in_dim(w.data, start, tile_rows, axis=0))
            return lax.dynamic_update_slice_in_dim(y, yt, start, axis=1)
        y = lax.fori_loop(0, -(-o // tile_rows), body, jnp.zeros((m, o), F32))
    return y.reshape(*lead, o)


def embed(table, ids):
    """Row lookup ``table[ids]`` returning float32, for plain or packed tables.

    table: [V, D] (or [P, D] for learned positions); ids: int [B, T] (any shape) -> float32
    [*ids.shape, D].  A packed table gathers the packed rows first and decodes only those (exact,
    so bit-identical to gathering from the dequantized table).  Out-of-range ids are clipped, as
    in ``gptjax.models.layers.embed``.
    """
    if isinstance(table, PackedWeight):
        return table.take(ids, mode="clip").dequantize(F32)
    return jnp.take(table, ids, axis=0, mode="clip").astype(F32)


# ---------------------------------------------------------------------------------------------
# Load time
# ---------------------------------------------------------------------------------------------

def to_dense(w, dtype=None) -> jax.Array:
    """A plain array from a packed or plain leaf: ``w.dequantize(dtype)`` or ``w.astype(dtype)``.

    ``dtype=None`` keeps the leaf's dtype.  For a whole parameter tree:
    ``jax.tree.map(lambda a: to_dense(a, dt), params, is_leaf=is_packed)``.
    """
    if isinstance(w, PackedWeight):
        return w.dequantize(dtype)
    w = jnp.asarray(w)
    return w if dtype is None else w.astype(dtype)


def pack_from_gguf_tensor(gguf_tensor, *, dequantize_at_load: bool = False, dtype=F32,
                          device=None):
    """The parameter leaf for one GGUF tensor: a :class:`PackedWeight` or a dense array.

    ``gguf_tensor``: a :class:`gptjax.formats.gguf.GGUFTensor` (uses ``name``, ``ggml_type``,
    ``shape``, ``raw``).  Returns a dense ``dtype`` array (exact float32 decoding, then one
    rounding) when ``dequantize_at_load`` is true, when the type is a float type
    (:data:`FLOAT_TYPES`) or when the tensor has fewer than 2 dimensions (norm weights, biases);
    otherwise a PackedWeight holding the file's bytes ``uint8[*shape[:-1], row_bytes]`` with
    ``dtype`` as its logical dtype.  ``device``: where to put it (default device if None).

    Raises UnsupportedModelError for a type without a decoder, WeightsError for a byte count that
    does not match the shape, both naming the tensor.
    """
    t = gguf_tensor
    ggml_type = int(t.ggml_type)
    if ggml_type not in QUANT_BLOCK:
        supported = ", ".join(ggml_type_name(k) for k in QUANT_BLOCK)
        raise UnsupportedModelError(f"tensor {t.name!r}: ggml type {ggml_type_name(ggml_type)} "
                                    f"(id {ggml_type}) is not supported; supported: {supported}")
    if dequantize_at_load or ggml_type in FLOAT_TYPES or len(t.shape) < 2:
        dense = dequantize(t.raw, ggml_type, t.shape, name=t.name).astype(dtype)
        return dense if device is None else jax.device_put(dense, device)
    return PackedWeight.from_bytes(t.raw, ggml_type, t.shape, dtype=dtype, name=t.name,
                                   device=device)
