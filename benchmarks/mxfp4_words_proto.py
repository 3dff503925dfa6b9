"""Prototype: an MXFP4 decode GEMV on 32-bit words (8 nibbles per load word, two f16 lanes per
bit trick) against the byte-wise decode of pallas_kernels/mxfp4_matmul.py, at gpt-oss-20b's MoE
decode shapes (one token, 4 experts).  Device time per call from a profiler trace.

    python benchmarks/mxfp4_words_proto.py            # GPU: sweep, table
    python benchmarks/mxfp4_words_proto.py --check    # CPU interpret mode: against the reference

Word layout (per 32-element block: 4 uint32 words, word q holds elements 8q..8q+7): element
``r = 8q + 4 lane + 2 s1 + s2`` sits at bit ``16 lane + 4 s1 + 8 s2`` of word q, so that one
shift-and-mask pair turns a word into two IEEE halves (lanes) of ``FP4 * 2^-14``.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from pallas_kernels import mxfp4_matmul as mx  # noqa: E402

F32 = jnp.float32
SHIFTS = np.array([[[16 * l + 4 * s1 + 8 * s2 for s2 in (0, 1)] for s1 in (0, 1)] for l in (0, 1)],
                  np.uint32)                                                    # [lane, s1, s2]


def repack_words(data):
    """ggml MXFP4 bytes uint8[..., O, G*17] -> (words uint32[..., O, G, 4], scales uint8[..., O, G])."""
    b = np.asarray(data).reshape(*data.shape[:-1], -1, 17)
    qs = b[..., 1:].astype(np.uint32)
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)                        # [..., G, 32]
    codes = codes.reshape(*codes.shape[:-1], 4, 2, 2, 2) << SHIFTS
    words = np.bitwise_or.reduce(codes.reshape(*codes.shape[:-3], 8), axis=-1)  # [..., G, 4]
    return words.astype(np.uint32), np.ascontiguousarray(b[..., 0])


MAG, SGN = np.uint32(0x0E000E00), np.uint32(0x80008000)


def _halves(p):
    lo = lax.bitcast_convert_type((p & np.uint32(0xFFFF)).astype(jnp.uint16), jnp.float16)
    hi = lax.bitcast_convert_type((p >> 16).astype(jnp.uint16), jnp.float16)
    return lo.astype(F32), hi.astype(F32)


def _pieces(w):
    """uint32 words [...] -> {(s1, s2): f16-bit-trick uint32} (lanes = elements 4 lane + 2 s1 + s2)."""
    return {
        (0, 0): ((w << 9) & MAG) | ((w << 12) & SGN),
        (1, 0): ((w << 5) & MAG) | ((w << 8) & SGN),
        (0, 1): ((w << 1) & MAG) | ((w << 4) & SGN),
        (1, 1): ((w >> 3) & MAG) | (w & SGN),
    }


def decode_joined(w):
    """words [..., 4] -> f32 [..., 32] FP4 * 2^-14 in element order."""
    ps = _pieces(w)
    R = {k: jnp.stack(_halves(v), axis=-1) for k, v in ps.items()}              # [..., 4, 2(lane)]
    T = [jnp.stack([R[(0, s2)], R[(1, s2)]], axis=-1) for s2 in (0, 1)]        # [..., 4, 2, 2(s1)]
    Z = jnp.stack(T, axis=-1)                                                   # [..., 4, 2, 2, 2(s2)]
    return Z.reshape(*w.shape[:-1], 32)


def _kernel(x_ref, ids_ref, qw_ref, sc_ref, out_ref, *, O, G, bn, gt, variant):
    r, i_n = pl.program_id(0), pl.program_id(1)
    e = ids_ref[r]
    n0 = i_n * bn
    n_ok = (n0 + mx._iota(bn)) < O

    def step(s, acc):
        g0 = s * gt
        g_ok = (g0 + mx._iota(gt)) < G
        ok = n_ok[:, None] & g_ok[None, :]
        w = pltriton.load(qw_ref.at[e, pl.ds(n0, bn), pl.ds(g0, gt), pl.ds(0, 4)],
                          mask=ok[:, :, None], other=0)                          # [bn, gt, 4]
        sc = pltriton.load(sc_ref.at[e, pl.ds(n0, bn), pl.ds(g0, gt)], mask=ok, other=128)
        if variant == "joined":
            xt = pltriton.load(x_ref.at[mx._ix(0), pl.ds(g0, gt), pl.ds(0, 32)], mask=g_ok[:, None],
                               other=0.0)                                       # [gt, 32]
            part = jnp.sum(decode_joined(w) * xt[None], axis=2)
        else:                                                                   # "split"
            part = None
            for (s1, s2), p in _pieces(w).items():
                for lane, h in enumerate(_halves(p)):
                    xt = pltriton.load(x_ref.at[mx._ix(0), pl.ds(g0, gt), pl.ds(0, 4), mx._ix(lane),
                                                mx._ix(s1), mx._ix(s2)],
                                       mask=g_ok[:, None], other=0.0)           # [gt, 4]
                    t = jnp.sum(h * xt[None], axis=2)
                    part = t if part is None else part + t
        d1, d2 = mx._e8m0_split(sc)
        return acc + part * d1 * d2

    acc = lax.fori_loop(0, mx.cdiv(G, gt), step, jnp.zeros((bn, gt), F32))
    pltriton.store(out_ref.at[r, pl.ds(n0, bn)], jnp.sum(acc, axis=1), mask=n_ok)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "warps", "variant", "interpret"))
def words_pairs(x, qw, sc, ids, *, bn=32, bk=512, warps=4, variant="joined", interpret=False):
    """x f32 [1, I]; qw uint32 [E, O, G, 4]; sc uint8 [E, O, G]; ids int32 [U] -> f32 [U, O]."""
    E, O, G, _ = qw.shape
    U = ids.shape[0]
    xv = x.reshape(1, G, 32) if variant == "joined" else x.reshape(1, G, 4, 2, 2, 2)
    kern = functools.partial(_kernel, O=O, G=G, bn=bn, gt=bk // 32, variant=variant)
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((U, O), F32),
                          grid=(U, mx.cdiv(O, bn)),
                          compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
                          interpret=interpret, name="words_pairs")(xv, ids, qw, sc)


def check():
    rng = np.random.default_rng(0)
    E, O, I = 3, 40, 320
    data = rng.integers(0, 256, (E, O, I // 32 * 17), dtype=np.uint8)
    data.reshape(E, O, -1, 17)[..., 0] = rng.integers(110, 135, (E, O, I // 32))
    x = jnp.asarray(rng.standard_normal((1, I)), F32)
    ids = jnp.asarray([2, 0], jnp.int32)
    want = mx.mxfp4_moe_matmul_ref(x, jnp.asarray(data), ids[None])[0]         # [U, O]
    qw, sc = repack_words(data)
    for variant in ("joined", "split"):
        got = words_pairs(x, jnp.asarray(qw), jnp.asarray(sc), ids, bn=16, bk=64, variant=variant,
                          interpret=True)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        print(f"{variant}: max rel err {err:.2e}", "OK" if err < 1e-5 else "FAIL")
        f = jax.jit(lambda x, q, s, i, v=variant: words_pairs(x, q, s, i, bn=16, bk=64, variant=v))
        f.trace(x, jnp.asarray(qw), jnp.asarray(sc), ids).lower(lowering_platforms=("cuda",))
        print(f"{variant}: lowers to Triton")


def sweep():
    from report import add_candidate, device_us_per_call, print_ranked

    rng = np.random.default_rng(0)
    E, U, D, F = 32, 4, 2880, 2880
    ids = jnp.asarray([3, 17, 5, 28], jnp.int32)
    x = jnp.asarray(rng.standard_normal((1, D)), F32)
    fns, meta = {}, {}
    for sname, O in (("gate_up 5760x2880", 2 * F), ("down 2880x2880", D)):
        data = rng.integers(0, 256, (E, O, D // 32 * 17), dtype=np.uint8)
        data.reshape(E, O, -1, 17)[..., 0] = rng.integers(118, 128, (E, O, D // 32))
        ref = mx.mxfp4_moe_matmul_ref(x, jnp.asarray(data), ids[None])[0]
        qw, sc = (jnp.asarray(a) for a in repack_words(data))
        old = mx.repack_mxfp4(jnp.asarray(data))
        nbytes = U * O * D // 32 * 17
        # Weights are arguments, never closed over: captured arrays become HLO constants, and the
        # profiler serialises every module (a 12 GB trace).
        cands = [("old default", lambda x, i, q, s, o: mx.mxfp4_moe_matmul(x.astype(jnp.bfloat16), o, i[None]))]
        for bn, bk, warps, variant in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8),
                                                        ("joined", "split")):
            if variant == "split" and (bk != 512):
                continue
            cands.append((f"{variant} bn{bn} bk{bk} w{warps}",
                          lambda x, i, q, s, o, c=(bn, bk, warps, variant): words_pairs(
                              x, q, s, i, bn=c[0], bk=c[1], warps=c[2], variant=c[3])))
        for label, f in cands:
            name, _ = add_candidate(fns, f"{sname} {label}",
                                    lambda x, i, q, s, o, f=f: f(x, i, q, s, o).reshape(U, O),
                                    (x, ids, qw, sc, old), np.asarray(ref), prefix="wp")
            if name:
                meta[name] = (sname, label, nbytes)
    print_ranked(device_us_per_call(fns), meta, "old default", top=12)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    check() if a.check else sweep()
