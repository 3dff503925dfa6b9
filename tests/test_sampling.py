"""Sampling: each stage against an independent numpy reference of the documented math.

References are written with explicit loops over tokens (no code shared with gptjax.sampling).
Distribution tests draw many samples in one vmapped call and use a chi-square bound.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import GenerationError
from gptjax.sampling import (
    Greedy,
    Sampler,
    apply_penalties,
    init_counts,
    row_keys,
    sample,
    sample_tokens,
    split,
    update_counts,
)

V = 97


def _random_logits(seed, b=6, v=V, scale=2.0):
    return np.random.default_rng(seed).normal(0, scale, (b, v)).astype(np.float32)


# ------------------------------------------------------------------------ numpy references

def ref_penalties(logits, counts, rep, pres, freq):
    """llama.cpp llama_sampler_penalties_apply / HF RepetitionPenaltyLogitsProcessor + OpenAI."""
    out = np.array(logits, np.float64)
    for b in range(out.shape[0]):
        for v in range(out.shape[1]):
            c = int(counts[b, v])
            if c == 0:
                continue
            out[b, v] = out[b, v] / rep if out[b, v] > 0 else out[b, v] * rep
            out[b, v] -= c * freq + pres
    return out


def ref_probs(logits, s: Sampler, counts=None):
    """The distribution one row is drawn from: penalties, temperature, top-k, top-p, min-p."""
    x = np.array(logits, np.float64)
    if counts is not None:
        x = ref_penalties(x[None], counts[None], s.repetition_penalty, s.presence_penalty,
                          s.frequency_penalty)[0]
    v = x.size
    if s.temperature == 0:
        p = np.zeros(v)
        p[int(np.argmax(x))] = 1.0
        return p
    x = x / s.temperature
    order = sorted(range(v), key=lambda i: -x[i])
    kept = set(order[: s.top_k] if s.top_k > 0 else order)

    def probs_over(keep):
        m = max(x[i] for i in keep)
        w = {i: math.exp(x[i] - m) for i in keep}
        z = sum(w.values())
        return {i: w[i] / z for i in keep}

    if s.top_p < 1.0:
        p = probs_over(kept)
        mass, nucleus = 0.0, set()
        for i in order:
            if i not in kept:
                continue
            nucleus.add(i)
            mass += p[i]
            if mass >= s.top_p:
                break
        kept = nucleus
    if s.min_p > 0.0:
        p = probs_over(kept)
        pmax = max(p.values())
        kept = {i for i in kept if p[i] >= s.min_p * pmax}
    p = probs_over(kept)
    out = np.zeros(v)
    for i, pi in p.items():
        out[i] = pi
    return out


def chi2_upper(df, z=3.29):
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.29: one-sided 0.0005)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def draw(logits_row, sampler, n, seed=0, counts_row=None):
    """n independent draws from one row: the row repeated n times, one key stream per row."""
    plan, params = split(sampler)
    logits = jnp.broadcast_to(jnp.asarray(logits_row), (n, logits_row.size))
    counts = None
    if plan.penalties:
        counts = jnp.broadcast_to(jnp.asarray(counts_row), (n, logits_row.size))
    keys = row_keys(jax.random.key(seed), n)
    return np.asarray(_sample_jit(logits, keys, plan, params, counts))


_sample_jit = jax.jit(sample_tokens, static_argnums=2)
_update_counts_jit = jax.jit(update_counts, static_argnums=5)


def assert_distribution(samples, expected):
    obs = np.bincount(samples, minlength=expected.size).astype(np.float64)
    n = samples.size
    assert obs[expected == 0].sum() == 0, f"drew excluded tokens {np.nonzero(obs * (expected == 0))[0]}"
    support = expected > 0
    exp = expected[support] * n
    chi2 = float(((obs[support] - exp) ** 2 / exp).sum())
    df = max(int(support.sum()) - 1, 1)
    assert chi2 < chi2_upper(df), f"chi2={chi2:.1f} df={df} obs={obs[support]} exp={exp.round(1)}"


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"penalty_last_n": -2}, "penalty_last_n"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(GenerationError, match=f"Sampler.{field}"):
        Sampler(**kwargs)


def test_samplers_are_hashable_and_floats_are_dynamic():
    a, b = Sampler(temperature=0.7, top_p=0.9), Sampler(temperature=0.8, top_p=0.95)
    assert hash(a) != hash(b) and a == Sampler(temperature=0.7, top_p=0.9)
    # Same code path: one compilation serves both.
    assert split(a)[0] == split(b)[0]
    assert split(Sampler(temperature=0.0))[0].greedy
    assert Greedy().is_greedy and Greedy(repetition_penalty=1.2).has_penalties
    assert not Sampler(repetition_penalty=1.2, penalty_last_n=0).has_penalties


# ------------------------------------------------------------------------------- properties

def test_top_k_1_is_greedy():
    logits = _random_logits(1)
    for seed in range(3):
        got = sample(logits, Sampler(temperature=1.3, top_k=1), jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


def test_temperature_zero_and_tiny_are_argmax():
    logits = _random_logits(2)
    np.testing.assert_array_equal(np.asarray(sample(logits, Greedy())), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(sample(logits, Sampler(temperature=0.0))), logits.argmax(-1))
    # Gaps between the two largest logits of these rows are > 1e-2, so T = 1e-4 leaves the
    # runner-up a probability below exp(-100).
    top2 = np.sort(logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-2
    got = sample(logits, Sampler(temperature=1e-4), jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


def test_top_p_with_dominant_token_is_deterministic():
    logits = _random_logits(3, scale=1.0)
    dom = np.array([5, 17, 0, 96, 40, 41])
    logits[np.arange(6), dom] = 12.0    # p(dom) > 0.99 > top_p: the nucleus is that token alone
    s = Sampler(temperature=1.0, top_p=0.9)
    samples = draw(logits[0], s, 4000)
    assert (samples == dom[0]).all()
    for seed in range(4):
        np.testing.assert_array_equal(np.asarray(sample(logits, s, jax.random.key(seed))), dom)


def test_seed_reproducible_and_seeds_differ():
    logits = _random_logits(4, b=16)
    s = Sampler(temperature=1.0)
    a = np.asarray(sample(logits, s, jax.random.key(11)))
    b = np.asarray(sample(logits, s, jax.random.key(11)))
    c = np.asarray(sample(logits, s, jax.random.key(12)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_penalties_match_reference():
    rng = np.random.default_rng(5)
    logits = _random_logits(6)
    logits[0, :10] = 0.0                                  # exact zeros: multiplied, stay 0
    counts = rng.integers(0, 4, logits.shape) * (rng.random(logits.shape) < 0.3)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts), 1.3, 0.4, -0.25))
    np.testing.assert_allclose(got, ref_penalties(logits, counts, 1.3, 0.4, -0.25), rtol=1e-6, atol=1e-6)
    # Greedy with penalties is the argmax of the reference.
    g = Greedy(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=-0.25)
    got = np.asarray(sample(logits, g, counts=jnp.asarray(counts, jnp.int32)))
    np.testing.assert_array_equal(got, ref_penalties(logits, counts, 1.3, 0.4, -0.25).argmax(-1))


def test_counts_window_matches_reference():
    rng = np.random.default_rng(6)
    b, t, s_len, v = 3, 12, 24, 11
    lengths = np.array([12, 5, 1], np.int32)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    for last_n in (-1, 4):
        def ref(seq_rows, lens):
            out = np.zeros((b, v), np.int64)
            for i in range(b):
                lo = 0 if last_n == -1 else max(0, lens[i] - last_n)
                for p in range(lo, lens[i]):
                    out[i, seq_rows[i][p]] += 1
            return out

        counts = init_counts(jnp.asarray(tokens), jnp.asarray(lengths), v, last_n)
        np.testing.assert_array_equal(np.asarray(counts), ref(tokens, lengths))
        # Append 6 tokens (row 2 inactive for the last 3), updating counts incrementally.
        seq = np.zeros((b, s_len), np.int32)
        seq[:, :t] = tokens
        lens = lengths.copy()
        for step in range(6):
            new = rng.integers(0, v, b).astype(np.int32)
            active = np.array([True, True, step < 3])
            seq_next = seq.copy()
            for i in range(b):
                if active[i]:
                    seq_next[i, lens[i]] = new[i]
            counts = _update_counts_jit(counts, jnp.asarray(seq_next), jnp.asarray(new), jnp.asarray(lens),
                                   jnp.asarray(active), last_n)
            seq, lens = seq_next, lens + active
            np.testing.assert_array_equal(np.asarray(counts), ref(seq, lens), err_msg=f"{last_n=} {step=}")


# ---------------------------------------------------------------------------- distributions

LOGITS8 = np.array([1.5, 0.2, -0.3, 2.0, 0.9, -1.2, 0.0, 1.1], np.float32)


@pytest.mark.parametrize(
    "sampler",
    [
        Sampler(temperature=1.0),
        Sampler(temperature=0.6),
        Sampler(temperature=1.5, top_k=3),
        Sampler(temperature=0.8, top_p=0.7),
        Sampler(temperature=1.3, min_p=0.3),
        Sampler(temperature=0.9, top_k=6, top_p=0.85, min_p=0.2),
    ],
    ids=["T1", "T0.6", "topk3", "topp0.7", "minp0.3", "all"],
)
def test_distribution_matches_reference(sampler):
    expected = ref_probs(LOGITS8, sampler)
    assert_distribution(draw(LOGITS8, sampler, 20000, seed=3), expected)


def test_distribution_with_penalties():
    s = Sampler(temperature=0.9, repetition_penalty=1.8, presence_penalty=0.3, frequency_penalty=0.2)
    counts = np.array([2, 0, 1, 3, 0, 0, 1, 0], np.int32)
    expected = ref_probs(LOGITS8, s, counts)
    assert_distribution(draw(LOGITS8, s, 20000, seed=4, counts_row=counts), expected)
