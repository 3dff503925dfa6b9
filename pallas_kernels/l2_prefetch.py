"""Warm the GPU's L2 cache with a weight from inside a latency-bound Pallas kernel.

Why.  A batch-1 decode layer alternates bandwidth-bound GEMVs with kernels that leave the HBM
nearly idle: the decode attention (~3 µs on short contexts) and its split merge (~1.4 µs) run
between the q/k/v projection and the attention output projection.  The output projection's
weight is known all along (12.5 MB for gpt-oss-20b: it fits the H100's 50 MB L2), so the
attention kernel's programs can ask the memory system to fetch it while they work; the
projection then streams it from L2.

How.  Hopper's ``cp.async.bulk.prefetch.L2.global [addr], size`` is fire-and-forget: the issuing
thread does not wait, nothing is written to registers or shared memory, and no completion is
tracked (the fetch outlives the kernel).  :func:`prefetch` splits a whole array into chunks of
at least :data:`MIN_CHUNK` bytes and gives each thread of the kernel's grid at most one chunk,
so every SM's bulk-copy unit takes a share.  It is a hint: results never depend on it.

Pallas-Triton has no way to name a buffer's address (``elementwise_inline_asm`` takes values, and
its lowering marks the asm pure, so an unused result is dropped), hence a primitive of our own
whose Triton lowering passes the ref -- a ``!tt.ptr`` there -- to an impure inline-asm op.  It
is GPU-only (sm_90+); :func:`available` says whether a kernel may call it, and callers skip it
in interpret mode.  Its result is a float32 zero to add into something the kernel stores (the
asm is impure, so the compiler keeps it regardless; the add only keeps JAX's tracing honest).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

#: Smallest chunk one thread asks for (bytes; a multiple of 16, as the instruction requires).
MIN_CHUNK = 4096


def available() -> bool:
    """True on a CUDA GPU of compute capability 9.0 or newer (the bulk prefetch instruction)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    try:
        return cc is not None and float(cc) >= 9.0
    except (TypeError, ValueError):
        return False


#: Where the kernels issue the hint (env ``GPTJAX_L2_PREFETCH``: "0" none, "1" all, or a comma
#: list of these names).
SITES = ("attention", "moe")


def enabled(site: str) -> bool:
    """Whether the kernel at ``site`` (one of :data:`SITES`) issues the hint: on a GPU where
    :func:`available`, and env ``GPTJAX_L2_PREFETCH`` (default "1") allows it.  Read at trace
    time."""
    env = os.environ.get("GPTJAX_L2_PREFETCH", "1").strip()
    on = env == "1" or site in env.split(",")
    return on and available()


def plan_chunks(nbytes: int, n_threads: int, min_chunk: int = MIN_CHUNK) -> tuple[int, int, int]:
    """(chunk bytes, number of full chunks, tail bytes) covering ``nbytes`` with at most one chunk
    per thread: chunks of ``max(MIN_CHUNK, ceil(nbytes / n_threads))`` rounded up to 16 bytes,
    the tail (the bytes after the full chunks) rounded down to 16 (the last < 16 bytes are left
    out: a hint needs no exactness).  ``full + (tail > 0) <= n_threads``."""
    per = -(-nbytes // max(1, n_threads))
    chunk = max(min_chunk, -(-per // 16) * 16)
    full = nbytes // chunk
    tail = (nbytes - full * chunk) // 16 * 16
    return chunk, full, tail


def _asm(chunk: int, full: int, tail: int, threads_per_program: int) -> str:
    # $0: the float32 zero handed back; $1: the array's base address; $2: this program's index.
    # Thread t of program p takes chunk c = p * threads_per_program + t.
    lines = ["{", ".reg .u32 %pf_c;", ".reg .u64 %pf_a;", ".reg .pred %pf_p;",
             "mov.u32 %pf_c, %tid.x;",
             f"mad.lo.u32 %pf_c, $2, {threads_per_program}, %pf_c;",
             f"mad.wide.u32 %pf_a, %pf_c, {chunk}, $1;"]
    if full:
        lines += [f"setp.lt.u32 %pf_p, %pf_c, {full};",
                  f"@%pf_p cp.async.bulk.prefetch.L2.global [%pf_a], {chunk};"]
    if tail:
        lines += [f"setp.eq.u32 %pf_p, %pf_c, {full};",
                  f"@%pf_p cp.async.bulk.prefetch.L2.global [%pf_a], {tail};"]
    lines += ["mov.f32 $0, 0f00000000;", "}"]
    return "\n".join(lines)


def _slab_asm(slab_bytes: int, chunk: int, full: int, tail: int) -> str:
    # $0: the float32 zero; $1: base address; $2: slab index; $3: this program's chunk index.
    # Thread 0 of the program takes chunk $3 of slab $2.
    lines = ["{", ".reg .u32 %pf_t;", ".reg .u64 %pf_a;", ".reg .pred %pf_z, %pf_p;",
             "mov.u32 %pf_t, %tid.x;",
             "setp.eq.u32 %pf_z, %pf_t, 0;",
             f"mad.wide.u32 %pf_a, $2, {slab_bytes}, $1;",
             f"mad.wide.u32 %pf_a, $3, {chunk}, %pf_a;"]
    if full:
        lines += [f"setp.lt.and.u32 %pf_p, $3, {full}, %pf_z;",
                  f"@%pf_p cp.async.bulk.prefetch.L2.global [%pf_a], {chunk};"]
    if tail:
        lines += [f"setp.eq.and.u32 %pf_p, $3, {full}, %pf_z;",
                  f"@%pf_p cp.async.bulk.prefetch.L2.global [%pf_a], {tail};"]
    lines += ["mov.f32 $0, 0f00000000;", "}"]
    return "\n".join(lines)


prefetch_p = jax_core.Primitive("gptjax_l2_prefetch")


@prefetch_p.def_abstract_eval
def _abstract_eval(ref, *operands, asm):
    del ref, operands, asm
    return jax.core.ShapedArray((), jnp.float32)


def _register_lowering():
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering

    @lowering.register_lowering(prefetch_p)
    def _lower(ctx, ref, *operands, asm):
        del ctx
        return tt_dialect.elementwise_inline_asm([ir.F32Type.get()], asm,
                                                 constraints="=f,l" + ",r" * len(operands),
                                                 pure=False, packed_element=1,
                                                 args=[ref, *operands])


_register_lowering()


def prefetch(refs: Sequence, program, n_programs: int, num_warps: int):
    """Inside a Pallas-Triton kernel: ask L2 to fetch the whole of each of ``refs`` (whole-array
    refs, e.g. ``pl.no_block_spec`` inputs), spread over the ``n_programs`` programs of the grid
    (``program``: this one's flat index, int32 in [0, n_programs)) and their ``num_warps`` x 32
    threads.  Returns a float32 zero (see the module docstring).  GPU (sm_90+) only."""
    threads = num_warps * 32
    zero = jnp.float32(0)
    for ref in refs:
        nbytes = math.prod(ref.shape) * jnp.dtype(ref.dtype).itemsize
        chunk, full, tail = plan_chunks(nbytes, n_programs * threads)
        z = prefetch_p.bind(ref, program.astype(jnp.int32), asm=_asm(chunk, full, tail, threads))
        zero = zero + z
    return zero


def prefetch_slab(ref, slab, program, n_programs: int):
    """Inside a Pallas-Triton kernel: ask L2 to fetch slab ``slab`` (an index along the first
    axis, e.g. one expert of an [E, ...] stack; int32, in range) of the whole-array ``ref``,
    cut into ``n_programs`` chunks of which this program (``program``, int32 in [0,
    n_programs)) asks for one, from its thread 0.  Returns a float32 zero.  GPU (sm_90+) only."""
    slab_bytes = math.prod(ref.shape[1:]) * jnp.dtype(ref.dtype).itemsize
    if slab_bytes % 16:
        return jnp.float32(0)            # slabs not 16-byte aligned: no hint
    chunk, full, tail = plan_chunks(slab_bytes, n_programs, min_chunk=16)
    return prefetch_p.bind(ref, jnp.asarray(slab, jnp.int32), jnp.asarray(program, jnp.int32),
                           asm=_slab_asm(slab_bytes, chunk, full, tail))
