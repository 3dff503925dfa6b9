"""Pallas GPU kernels, each beside its plain-jnp ``_ref`` twin of the same signature.

:func:`kernel_mode` is the one switch the model code consults (env ``GPTJAX_KERNELS``):

* unset / ``auto``: the Pallas kernels on a GPU backend, the jnp references elsewhere;
* ``ref``: always the jnp references (the XLA path);
* ``pallas``: the kernels (a GPU is needed);
* ``interpret``: the kernels in Pallas interpret mode, on any backend (slow; lets CPU tests run
  the kernel wiring end to end).
"""
from __future__ import annotations

import os

import jax

_MODES = ("auto", "ref", "pallas", "interpret")


def kernel_mode() -> str:
    """"pallas", "interpret" or "ref" for the current backend and ``GPTJAX_KERNELS``.  Read at
    trace time: a jitted function keeps the choice it was traced with."""
    env = os.environ.get("GPTJAX_KERNELS", "auto").strip().lower() or "auto"
    if env not in _MODES:
        from gptjax.errors import GptjaxError

        raise GptjaxError(f"GPTJAX_KERNELS={env!r}: expected one of {', '.join(_MODES)}")
    if env == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "ref"
    return env
