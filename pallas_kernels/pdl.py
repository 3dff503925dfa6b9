"""Programmatic dependent launch (PDL): let the next kernel launch while this one runs.

Why.  A batch-1 decode step is ~170 dependent kernels of 1-25 µs.  Between two of them the GPU
spends ~1 µs launching the second (grid setup, dispatching its programs to the SMs) after the
first has drained.  Hopper can overlap that: a kernel launched with the PDL attribute may start
before its predecessor ends, and waits in ``griddepcontrol.wait`` until the predecessor has
finished and its writes are visible.

What XLA does already (jax 0.11.2, ``--xla_gpu_enable_pdl``, on by default on Hopper): it
launches every Triton kernel -- Pallas calls included -- with the PDL attribute and puts
``griddepcontrol.wait`` at the start of the kernel (its ``InsertPDLPass``; the early-trigger
half of it, ``griddepcontrol.launch_dependents``, goes only into XLA's own fusions).  Without a
trigger a kernel's successor is launched only when every program of the kernel has exited, so
what overlaps is just the drain.  (benchmarks/pdl_probe.py, H100: 1.02 µs per chained tiny
Pallas kernel with PDL, 1.44 without.)

What this module adds: :func:`launch_dependents`, the trigger, for our Pallas kernels.  A kernel
calls it at its start (after XLA's wait): once all of its programs have issued it, the next
kernel is launched; that kernel's programs take SM slots as this kernel's programs exit and
then wait for this kernel to finish, so the launch and dispatch overlap this kernel's tail
instead of following it.

Correctness.  The trigger only allows the launch; the successor's ``griddepcontrol.wait``
still blocks until this grid has completed and flushed its memory.  The trigger follows this
kernel's own wait, so when a successor starts, every earlier kernel has completed as well.  A
grid's trigger condition needs every one of its programs to have issued it (or exited), i.e. to
be resident: the successor's waiting programs can never hold slots this grid still needs.

How.  Pallas-Triton has no op for it and ``elementwise_inline_asm`` is pure (dropped when its
result is unused), so a primitive of our own lowers to an impure inline-asm op on Triton that
returns an int32 zero: the kernel adds it to an index, which keeps it in the program and orders
it before the index's loads (an integer zero changes nothing).  Elsewhere (interpret mode, the
CPU) the primitive is the constant 0.  Env ``GPTJAX_PDL_TRIGGER=0`` turns it off (read at trace
time).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jax.interpreters import mlir

__all__ = ["launch_dependents", "program_id", "enabled"]

_ASM = "griddepcontrol.launch_dependents;\nmov.u32 $0, 0;"


def enabled() -> bool:
    """Whether kernels issue the trigger: env ``GPTJAX_PDL_TRIGGER`` (default "1")."""
    return os.environ.get("GPTJAX_PDL_TRIGGER", "1").strip() != "0"


launch_p = jax_core.Primitive("gptjax_pdl_launch_dependents")


@launch_p.def_abstract_eval
def _abstract_eval(anchor):
    del anchor
    return jax.core.ShapedArray((), jnp.int32)


@launch_p.def_impl
def _impl(anchor):
    del anchor
    return jnp.int32(0)


# Interpret mode and non-Triton lowerings: the constant zero.
mlir.register_lowering(launch_p, mlir.lower_fun(lambda anchor: jnp.zeros((), jnp.int32),
                                                multiple_results=False))


def _register_triton_lowering():
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering

    @lowering.register_lowering(launch_p)
    def _lower(ctx, anchor):
        del ctx
        return tt_dialect.elementwise_inline_asm([ir.IntegerType.get_signless(32)], _ASM,
                                                 constraints="=r,r", pure=False,
                                                 packed_element=1, args=[anchor])


_register_triton_lowering()


def launch_dependents(anchor):
    """Inside a Pallas kernel: issue ``griddepcontrol.launch_dependents`` (on the GPU; see the
    module docstring) and return an int32 zero to add to an index.  ``anchor``: any int32
    scalar of the kernel (e.g. ``pl.program_id(0)``).  The constant 0 when :func:`enabled` is
    false."""
    if not enabled():
        return jnp.int32(0)
    return launch_p.bind(jnp.asarray(anchor, jnp.int32))


def program_id(axis: int):
    """``pl.program_id(axis)`` with :func:`launch_dependents` issued first (its zero added):
    what a kernel reads as its first program index."""
    from jax.experimental import pallas as pl

    i = pl.program_id(axis)
    return i + launch_dependents(i)
