"""Token sampling: greedy, temperature, top-k, top-p, min-p, and repetition penalties.

A sampling method is a small frozen (hashable) dataclass, :class:`Sampler` or :class:`Greedy`.
Inside the compiled generation loop it is split in two (:func:`split`):

* a static :class:`SamplerPlan` (which stages run, ``top_k``, the penalty window), hashable and
  passed to ``jax.jit`` as a static argument: changing it recompiles;
* dynamic :data:`SamplerParams` (temperature, top_p, min_p, the three penalties) passed as traced
  float32 scalars, so that a new temperature or top_p reuses the compiled loop.

Order of operations (the Hugging Face ``transformers`` logits-processor order, chosen because it
is the common reference for checkpoints' recommended settings):

1. penalties on the raw logits (repetition, then presence/frequency);
2. temperature ``x = logits / T`` (``T == 0`` means greedy: argmax of the penalised logits);
3. top-k: keep the ``k`` largest;
4. top-p (nucleus): keep the smallest prefix of the sorted survivors whose probability mass
   (renormalised over the survivors) reaches ``top_p``;
5. min-p: keep tokens whose probability is at least ``min_p`` times the largest one;
6. draw from ``softmax`` over the survivors.

llama.cpp's default chain (``common/common.h``: penalties, dry, top-n-sigma, top-k, typical, top-p,
min-p, xtc, temperature) applies the temperature *last*, so with ``T != 1`` its top-p / min-p
thresholds act on the ``T = 1`` distribution and differ from ours.  Top-k is unaffected.

Penalties (all three use the same token history: the last ``penalty_last_n`` tokens of the
sequence, prompt included, as llama.cpp does; ``penalty_last_n = -1`` means the whole sequence, as
Hugging Face's ``RepetitionPenaltyLogitsProcessor`` does; ``0`` disables penalties).  With ``c_v``
the number of occurrences of token ``v`` in the history:

* repetition (llama.cpp ``penalty_repeat``, HF ``repetition_penalty``, CTRL paper, Keskar et al.
  2019): if ``c_v > 0``, ``l_v / r`` when ``l_v > 0`` else ``l_v * r``;
* presence and frequency (OpenAI API semantics):
  ``l_v - c_v * frequency - (c_v > 0) * presence``.

The history is a static-shape count array ``counts: int32 [B, V]`` maintained by the loop
(:func:`init_counts`, :func:`update_counts`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax.errors import GenerationError

__all__ = [
    "Sampler",
    "Greedy",
    "SamplerPlan",
    "split",
    "apply_penalties",
    "filter_logits",
    "sample_tokens",
    "sample",
    "row_keys",
    "step_keys",
    "init_counts",
    "update_counts",
]

# OpenAI accepts presence/frequency penalties in [-2, 2].
_MAX_ABS_PENALTY = 2.0


def _check_number(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise GenerationError(f"Sampler.{name} must be a finite number, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise GenerationError(f"Sampler.{name} must be in {left}{lo_s}, {hi_s}{right}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Sampler:
    """Stochastic sampling (see the module docstring for the math and the order of stages).

    temperature: ``>= 0``; ``0`` means greedy (argmax after penalties).
    top_k: ``>= 0``; ``0`` disables.
    top_p: in ``(0, 1]``; ``1`` disables.
    min_p: in ``[0, 1)``; ``0`` disables.
    repetition_penalty: ``> 0``; ``1`` disables.
    presence_penalty, frequency_penalty: in ``[-2, 2]``; ``0`` disables.
    penalty_last_n: tokens of history the penalties look at; ``-1`` the whole sequence, ``0`` none.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64

    def __post_init__(self):
        _check_number("temperature", self.temperature, lo=0.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise GenerationError(f"Sampler.top_k must be an integer >= 0, got {self.top_k!r}")
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0, hi_open=True)
        _check_number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_number("presence_penalty", self.presence_penalty, -_MAX_ABS_PENALTY, _MAX_ABS_PENALTY)
        _check_number("frequency_penalty", self.frequency_penalty, -_MAX_ABS_PENALTY, _MAX_ABS_PENALTY)
        n = self.penalty_last_n
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < -1:
            raise GenerationError(f"Sampler.penalty_last_n must be an integer >= -1, got {n!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.penalty_last_n != 0 and (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class Greedy(Sampler):
    """Argmax decoding (after the optional penalties).  Truncation settings cannot change an
    argmax (top-k, top-p and min-p always keep the most likely token), so only penalties matter."""

    temperature: float = dataclasses.field(default=0.0, init=False)


class SamplerPlan(NamedTuple):
    """The static (shape- and code-path-deciding) part of a sampler; hashable."""

    greedy: bool
    top_k: int             # 0: off
    top_p: bool            # whether the nucleus stage runs
    min_p: bool            # whether the min-p stage runs
    penalties: bool        # whether counts exist and penalties run
    penalty_last_n: int    # -1: whole sequence; > 0: window (meaningful only with penalties)


# Dynamic part: traced float32 scalars (or [B] arrays, broadcast per row).
SamplerParams = dict


def split(sampler: Sampler) -> tuple[SamplerPlan, SamplerParams]:
    """Split a sampler into its static plan and its dynamic float parameters."""
    if not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler must be a gptjax.sampling.Sampler, got {type(sampler).__name__}")
    pen = sampler.has_penalties
    plan = SamplerPlan(
        greedy=sampler.is_greedy,
        top_k=0 if sampler.is_greedy else int(sampler.top_k),
        top_p=not sampler.is_greedy and sampler.top_p < 1.0,
        min_p=not sampler.is_greedy and sampler.min_p > 0.0,
        penalties=pen,
        penalty_last_n=int(sampler.penalty_last_n) if pen else 0,
    )
    params = {
        "temperature": sampler.temperature,
        "top_p": sampler.top_p,
        "min_p": sampler.min_p,
        "repetition_penalty": sampler.repetition_penalty,
        "presence_penalty": sampler.presence_penalty,
        "frequency_penalty": sampler.frequency_penalty,
    }
    return plan, {k: jnp.float32(v) for k, v in params.items()}


def _col(x):
    """A scalar or per-row [B] parameter, shaped to broadcast against [B, V]."""
    x = jnp.asarray(x, jnp.float32)
    return x[:, None] if x.ndim == 1 else x


def apply_penalties(logits, counts, repetition, presence, frequency):
    """Repetition, presence and frequency penalties (module docstring).

    logits: float32 [B, V]; counts: int [B, V] occurrences in the history; the three penalties are
    scalars or [B].  Returns float32 [B, V].
    """
    logits = logits.astype(jnp.float32)
    seen = counts > 0                                                   # [B, V]
    r = _col(repetition)
    repeated = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen, repeated, logits)
    return logits - counts.astype(jnp.float32) * _col(frequency) - seen * _col(presence)


def filter_logits(logits, plan: SamplerPlan, params: SamplerParams):
    """Temperature, top-k, top-p and min-p (module docstring) on penalised logits.

    logits: float32 [B, V].  Returns ``(x, ids)``: ``x`` float32 [B, C] are the candidates'
    tempered logits with ``-inf`` for those removed, ``ids`` int32 [B, C] their token ids, or
    ``None`` when the candidates are the whole vocabulary in order (C = V).  Sampling draws from
    ``softmax(x)``.  Not for greedy plans.
    """
    assert not plan.greedy, "filter_logits is for stochastic plans"
    v = logits.shape[-1]
    x = logits.astype(jnp.float32) / _col(params["temperature"])           # [B, V]
    ids = None
    if plan.top_k > 0 or plan.top_p:
        # Sorted descending; top-k bounds the candidate set, top-p alone needs the full sort.
        k = min(plan.top_k, v) if plan.top_k > 0 else v
        x, ids = jax.lax.top_k(x, k)                                    # [B, C]
    if plan.top_p:
        probs = jax.nn.softmax(x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs                 # exclusive cumsum
        # The first candidate always survives (mass_before == 0 < top_p).
        x = jnp.where(mass_before < _col(params["top_p"]), x, -jnp.inf)
    if plan.min_p:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); the maximum always survives.
        x_max = jnp.max(x, axis=-1, keepdims=True)
        x = jnp.where(x >= x_max + jnp.log(_col(params["min_p"])), x, -jnp.inf)
    return x, ids


def sample_tokens(logits, keys, plan: SamplerPlan, params: SamplerParams, counts=None):
    """One token per row.  Traceable; ``plan`` must be static.

    logits: float [B, V]; keys: typed PRNG keys [B] (one independent stream per row, ignored when
    greedy); counts: int32 [B, V] history counts, required iff ``plan.penalties``.
    Returns int32 [B].
    """
    logits = logits.astype(jnp.float32)
    if plan.penalties:
        if counts is None:
            raise GenerationError("sampler with penalties needs the token-count array `counts`")
        logits = apply_penalties(
            logits, counts, params["repetition_penalty"], params["presence_penalty"],
            params["frequency_penalty"],
        )
    if plan.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x, ids = filter_logits(logits, plan, params)
    choice = jax.vmap(jax.random.categorical)(keys, x)                  # [B] index into C
    if ids is not None:
        choice = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def row_keys(key, batch: int):
    """Independent key streams for each row: ``fold_in(key, row)``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch))


def step_keys(keys, step):
    """The keys for one draw: ``fold_in(row_key, step)`` with ``step`` int [B] (the index of the
    token being generated in each row), so the stream does not depend on how the loop is chunked."""
    return jax.vmap(jax.random.fold_in)(keys, step)


def sample(logits, sampler: Sampler, key=None, counts=None):
    """Convenience wrapper (jitted per plan): one token per row of ``logits`` [B, V] with ``sampler``.

    key: a PRNG key (``jax.random.key(seed)``), required unless greedy; row ``b`` uses
    ``fold_in(key, b)``.  counts: int [B, V] history counts, used iff the sampler has penalties.
    """
    plan, params = split(sampler)
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise GenerationError(f"logits must be [B, V], got shape {logits.shape}")
    if not plan.greedy and key is None:
        raise GenerationError("a PRNG key is required for non-greedy sampling")
    if plan.penalties and counts is None:
        counts = jnp.zeros(logits.shape, jnp.int32)
    keys = row_keys(key if key is not None else jax.random.key(0), logits.shape[0])
    return _sample_jit(logits, keys, plan, params, counts if plan.penalties else None)


_sample_jit = jax.jit(sample_tokens, static_argnums=2)


def init_counts(tokens, lengths, vocab_size: int, last_n: int):
    """History counts after a right-padded prompt batch.

    tokens: int32 [B, T]; lengths: int32 [B] real lengths.  Counts the tokens at positions
    ``[max(0, len - last_n), len)`` (all of ``[0, len)`` when ``last_n == -1``).
    Returns int32 [B, V].
    """
    b, t = tokens.shape
    pos = jnp.arange(t)[None, :]                                        # [1, T]
    keep = pos < lengths[:, None]
    if last_n > 0:
        keep = keep & (pos >= lengths[:, None] - last_n)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return jnp.zeros((b, vocab_size), jnp.int32).at[rows, tokens].add(keep.astype(jnp.int32))


def update_counts(counts, seq, new_tokens, pos, active, last_n: int):
    """Add the token just placed at position ``pos`` and, with a window, drop the one at
    ``pos - last_n`` that leaves it.

    counts: int32 [B, V]; seq: int32 [B, S] the sequence (prompt + generated) so far;
    new_tokens, pos: int32 [B]; active: bool [B] rows that really advanced.
    """
    b = counts.shape[0]
    rows = jnp.arange(b)
    counts = counts.at[rows, new_tokens].add(active.astype(jnp.int32))
    if last_n > 0:
        old_pos = pos - last_n
        leaving = active & (old_pos >= 0)
        old = jnp.take_along_axis(seq, jnp.maximum(old_pos, 0)[:, None], axis=1)[:, 0]
        counts = counts.at[rows, old].add(-leaving.astype(jnp.int32))
    return counts
