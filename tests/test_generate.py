"""The generation loop against naive references.

The toy model below honours the forward/cache contract of docs/INTERFACES.md exactly (K/V of
the T new tokens written at positions start + arange(T); a query at position p sees slots
j <= p), with every size distinct.  It is a tiny 2-layer attention network with learned
positions, so its logits depend on every visible cached entry: a cache written at the wrong
slot, a stale or padded slot made visible, or an off-by-one position changes the tokens.
The reference decodes with a naive Python loop that recomputes the whole sequence from an
empty cache at every step.
"""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import GenerationError
from gptjax.generate import Generator, batch_bucket, cache_bucket, prompt_bucket
from gptjax.sampling import Greedy, Sampler

# --------------------------------------------------------------------------------- toy model


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 97
    d_model: int = 48
    n_layers: int = 2
    n_kv_heads: int = 1
    head_dim: int = 16
    context_length: int = 160


class ToyCache(NamedTuple):
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]


def toy_init_cache(config, batch, max_len, dtype=jnp.float32):
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return ToyCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


MAX_POS = 256


def toy_params(config, seed=0):
    rng = np.random.default_rng(seed)
    D, H, V = config.d_model, config.head_dim, config.vocab_size

    def w(*shape, scale=1.0):
        return jnp.asarray(rng.normal(0, scale / math.sqrt(shape[0]), shape), jnp.float32)

    return {
        "embed": jnp.asarray(rng.normal(0, 1, (V, D)), jnp.float32),
        "pos": jnp.asarray(rng.normal(0, 1, (MAX_POS, D)), jnp.float32),
        "layers": [
            {"wq": w(D, H, scale=3.0), "wk": w(D, H, scale=3.0), "wv": w(D, H), "wo": w(H, D, scale=2.0)}
            for _ in range(config.n_layers)
        ],
        "out": w(D, V, scale=4.0),
    }


def toy_forward(params, tokens, start, cache, config):
    B, T = tokens.shape
    S = cache.k.shape[3]
    pos = start[:, None] + jnp.arange(T)[None, :]                        # [B, T]
    x = params["embed"][tokens] + params["pos"][pos]                     # [B, T, D]
    rows = jnp.arange(B)[:, None]                                        # [B, 1]
    ks, vs = cache.k, cache.v
    visible = jnp.arange(S)[None, None, :] <= pos[:, :, None]            # [B, T, S]
    for layer, p in enumerate(params["layers"]):
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]                  # [B, T, H]
        ks = ks.at[layer, rows, 0, pos].set(k, mode="drop")
        vs = vs.at[layer, rows, 0, pos].set(v, mode="drop")
        scores = jnp.einsum("bth,bsh->bts", q, ks[layer, :, 0]) / math.sqrt(q.shape[-1])
        attn = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
        x = x + jnp.tanh(jnp.einsum("bts,bsh->bth", attn, vs[layer, :, 0]) @ p["wo"])
    return x @ params["out"], ToyCache(ks, vs)                           # [B, T, V]


CFG = ToyConfig()
PARAMS = toy_params(CFG)


@jax.jit
def _last_logits(params, seq, n):
    """Logits after the first n tokens of seq int32 [1, C] (C = context, one compilation),
    computed from an empty cache in one full-sequence call; the causal mask hides seq[n:]."""
    logits, _ = toy_forward(params, seq, jnp.zeros((1,), jnp.int32), toy_init_cache(CFG, 1, seq.shape[1]), CFG)
    return logits[0, n - 1]


def naive_decode(prompt, n, *, context=CFG.context_length, penalties=None, eos=()):
    """Greedy decoding that recomputes the full sequence every step (the reference).

    penalties: (repetition, presence, frequency, last_n) applied in numpy over the last
    `last_n` tokens of prompt + generated (-1: all).  Returns (ids, reason)."""
    seq, out = list(prompt), []
    for _ in range(n):
        padded = np.zeros((1, CFG.context_length), np.int32)
        padded[0, : len(seq)] = seq
        logits = np.asarray(_last_logits(PARAMS, padded, len(seq)), np.float64)
        if penalties is not None:
            rep, pres, freq, last_n = penalties
            hist = seq if last_n == -1 else seq[max(0, len(seq) - last_n):]
            for tok in set(hist):
                c = hist.count(tok)
                logits[tok] = logits[tok] / rep if logits[tok] > 0 else logits[tok] * rep
                logits[tok] -= c * freq + pres
        tok = int(np.argmax(logits))
        if tok in eos:
            return out, "eos"
        out.append(tok)
        seq.append(tok)
        if len(seq) >= context:
            return out, "context_full" if len(out) < n else "max_tokens"
    return out, "max_tokens"


# ----------------------------------------------------------------------------- toy tokenizer


def _piece(i):
    """Byte string of token i: letters, spaces, and UTF-8 fragments that only make a valid
    character ("é" = C3 A9, "€" = E2 82 AC) when the right tokens follow each other."""
    table = [b"a", b"b", b"c", b"d", b"e", b" ", b"th", b"\n", b"xy", b"\xc3", b"\xa9", b"\xe2", b"\x82\xac"]
    return table[i % len(table)]


class ToyTokenizer:
    vocab_size = CFG.vocab_size
    eos_id = None
    eog_ids = frozenset()

    def decode(self, ids):
        return b"".join(_piece(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return _ToyStream()


class _ToyStream:
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._dec.decode(_piece(token_id))

    def flush(self):
        return self._dec.decode(b"", final=True)


TOK = ToyTokenizer()


@pytest.fixture(scope="module")
def gen():
    return Generator(toy_forward, PARAMS, CFG, tokenizer=TOK, init_cache_fn=toy_init_cache)


def _prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, CFG.vocab_size, n)]


# ------------------------------------------------------------------------------------ tests


def test_buckets():
    assert [prompt_bucket(n, 4096) for n in (1, 16, 17, 100, 1024, 1025, 1600)] == [16, 16, 32, 128, 1024, 1536, 2048]
    assert prompt_bucket(40, 24) == 24
    assert cache_bucket(32, 10, 4096) == 128 and cache_bucket(32, 100, 4096) == 256
    assert cache_bucket(32, 100, 100) == 100
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_greedy_matches_naive_loop(gen):
    prompt = _prompt(1, 9)
    ref, reason = naive_decode(prompt, 24)
    assert len(set(ref)) > 4, "toy model degenerate: the test would prove little"
    res = gen.generate([prompt], max_new_tokens=24)
    c = res.completions[0]
    assert list(c.token_ids) == ref
    assert c.stop_reason == reason == "max_tokens"
    assert c.text == TOK.decode(ref)
    assert res.stats.generated_tokens == 24 and res.stats.decode_steps == 23


def test_batch_equals_one_by_one(gen):
    prompts = [_prompt(10 + i, n) for i, n in enumerate((3, 12, 1, 30, 7))]
    batched = gen.generate(prompts, max_new_tokens=12).completions
    for p, c in zip(prompts, batched):
        single = gen.generate([p], max_new_tokens=12).completions[0]
        assert c.token_ids == single.token_ids
        assert list(c.token_ids) == naive_decode(p, 12)[0]


def test_penalties_in_loop_match_naive(gen):
    # A window shorter than the first prompt: counts start from the prompt's tail and tokens
    # leave the window as generation proceeds (the whole-sequence case is in test_sampling).
    prompts = [_prompt(22, 11), _prompt(20, 4)]
    pen = (1.6, 0.5, 0.3)
    refs = [naive_decode(p, 20, penalties=(*pen, 6))[0] for p in prompts]
    # The test can tell a window of 6 from 5 or 7, and penalties from none.
    for other in ((*pen, 5), (*pen, 7), None):
        assert refs != [naive_decode(p, 20, penalties=other)[0] for p in prompts], other
    g = Greedy(repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.3, penalty_last_n=6)
    got = gen.generate(prompts, max_new_tokens=20, sampler=g, chunk_size=7).completions
    assert [list(c.token_ids) for c in got] == refs


def test_stop_on_eos(gen):
    prompts = [_prompt(30, 6), _prompt(31, 13)]
    ref0 = naive_decode(prompts[0], 30)[0]
    k = next(i for i in range(3, 30) if ref0[i] not in ref0[:i])
    eos = ref0[k]
    got = gen.generate(prompts, max_new_tokens=30, eos_ids=[eos, 96]).completions
    for p, c in zip(prompts, got):
        ids, reason = naive_decode(p, 30, eos={eos, 96})
        assert list(c.token_ids) == ids and c.stop_reason == reason
        assert c.stop_token == (None if reason != "eos" else next(t for t in naive_decode(p, 30)[0] if t in {eos, 96}))
    assert got[0].stop_reason == "eos" and len(got[0].token_ids) == k and got[0].stop_token == eos


def test_stop_string_truncates(gen):
    prompt = _prompt(40, 5)
    full = gen.generate([prompt], max_new_tokens=40).completions[0]
    text = full.text
    # An ASCII-only stop string from the second half of the text.
    start = next(i for i in range(len(text) // 2, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].strip())
    stop = text[start:start + 3]
    cut = text.find(stop)
    n_ids = next(n for n in range(1, 41) if stop in TOK.decode(full.token_ids[:n]))
    for chunk in (None, 4):
        c = gen.generate([prompt], max_new_tokens=40, stop_strings=["@never@", stop], chunk_size=chunk).completions[0]
        assert c.stop_reason == "stop_string" and c.stop_string == stop
        assert c.text == text[:cut]
        assert c.token_ids == full.token_ids[:n_ids]
    # In a batch, the row that hit the stop string freezes and the others go on unchanged.
    other = _prompt(41, 9)
    other_full = gen.generate([other], max_new_tokens=40).completions[0]
    both = gen.generate([prompt, other], max_new_tokens=40, stop_strings=[stop], chunk_size=4).completions
    assert both[0].text == text[:cut] and both[0].token_ids == full.token_ids[:n_ids]
    if stop in other_full.text:
        assert both[1].stop_reason == "stop_string"
        assert both[1].text == other_full.text[: other_full.text.find(stop)]
    else:
        assert both[1].stop_reason == "max_tokens" and both[1].token_ids == other_full.token_ids


def test_stream_pieces_concatenate_to_text(gen):
    prompt = _prompt(50, 8)
    full = gen.generate([prompt], max_new_tokens=40).completions[0]
    assert "\ufffd" in full.text or "é" in full.text or "€" in full.text  # multi-byte fragments occur
    stream = gen.stream(prompt, max_new_tokens=40, chunk_size=3)
    pieces = list(stream)
    assert len(pieces) > 5
    assert "".join(pieces) == full.text
    assert stream.result.completions[0].token_ids == full.token_ids
    # With a stop string, nothing at or after it is ever shown.
    stop = full.text[20:23]
    stream = gen.stream(prompt, max_new_tokens=40, chunk_size=2, stop_strings=[stop])
    assert "".join(stream) == full.text[: full.text.find(stop)] == stream.result.completions[0].text


def test_context_full_is_reported():
    cfg = ToyConfig(context_length=24)
    g = Generator(toy_forward, PARAMS, cfg, tokenizer=TOK, init_cache_fn=toy_init_cache)
    prompt = _prompt(60, 20)
    res = g.generate([prompt, prompt[:5]], max_new_tokens=10)
    c0, c1 = res.completions
    assert c0.stop_reason == "context_full" and len(c0.token_ids) == 4
    assert list(c0.token_ids) == naive_decode(prompt, 4)[0]
    assert c1.stop_reason == "max_tokens" and list(c1.token_ids) == naive_decode(prompt[:5], 10)[0]
    assert res.stats.cache_length == 24
    c = g.generate([_prompt(61, 23), [1]], max_new_tokens=5).completions[0]
    assert c.stop_reason == "context_full" and len(c.token_ids) == 1
    with pytest.raises(GenerationError, match="prompt 0 has 24 tokens"):
        g.generate([_prompt(62, 24)], max_new_tokens=1)


def test_chunked_equals_one_shot_and_seeds(gen):
    prompts = [_prompt(70, 5), _prompt(71, 17)]
    s = Sampler(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2, penalty_last_n=8)
    chunked = gen.generate(prompts, max_new_tokens=25, sampler=s, seed=7, chunk_size=3)
    # With an EOS id, the one-shot call is one early-exiting while_loop (chunk_size=3 runs 8
    # fixed-length chunks).  The id is one the chunked run never drew, so if both runs draw the
    # same streams no row stops early.
    unused = min(set(range(CFG.vocab_size)) - {t for c in chunked.completions for t in c.token_ids})
    one = gen.generate(prompts, max_new_tokens=25, sampler=s, seed=7, eos_ids=[unused])
    assert one.stats.decode_calls == 1 and chunked.stats.decode_calls == 8
    assert [c.token_ids for c in one.completions] == [c.token_ids for c in chunked.completions]
    other = gen.generate(prompts, max_new_tokens=25, sampler=s, seed=8)
    assert [c.token_ids for c in one.completions] != [c.token_ids for c in other.completions]


def test_first_token_ends_every_row_in_chunk_mode(gen):
    """Fixed-length chunks: the first decode chunk is queued before prefill's result is read; a
    first token that ends every row (an EOS here) still gives the right completion, and the
    queued chunk is neither read nor counted."""
    prompt = _prompt(95, 7)
    first = naive_decode(prompt, 1)[0][0]
    res = gen.generate([prompt], max_new_tokens=20, eos_ids=[first], chunk_size=4)
    c = res.completions[0]
    assert (c.token_ids, c.stop_reason, c.stop_token) == ((), "eos", first)
    assert res.stats.decode_calls == 0 and res.stats.decode_steps == 0
    # and the generator is still usable afterwards (the unread chunk donated nothing we keep)
    again = gen.generate([prompt], max_new_tokens=6, chunk_size=4).completions[0]
    assert list(again.token_ids) == naive_decode(prompt, 6)[0]


def test_bucketing_avoids_retrace():
    g = Generator(toy_forward, PARAMS, CFG, init_cache_fn=toy_init_cache)
    r1 = g.generate([_prompt(80, 5)], max_new_tokens=8)
    r2 = g.generate([_prompt(81, 9)], max_new_tokens=8)            # same bucket (16)
    assert g.trace_counts == {"prefill": 1, "decode": 1}
    assert r1.stats.compiled and not r2.stats.compiled
    g.generate([_prompt(82, 20)], max_new_tokens=12)                # T_pad 32, same S = 128
    assert g.trace_counts == {"prefill": 2, "decode": 1}
    # Sampler floats are traced: a new temperature or top_p reuses the compiled functions.
    g.generate([_prompt(83, 5)], max_new_tokens=8, sampler=Sampler(temperature=0.7, top_p=0.9), seed=1)
    g.generate([_prompt(84, 5)], max_new_tokens=8, sampler=Sampler(temperature=1.1, top_p=0.5), seed=1)
    assert g.trace_counts == {"prefill": 3, "decode": 2}


def test_stats(gen):
    res = gen.generate([_prompt(90, 6), _prompt(91, 3)], max_new_tokens=10)
    st = res.stats
    assert st.batch == 2 and st.prompt_tokens == 9 and st.prefill_length == 16 and st.cache_length == 128
    assert st.generated_tokens == 20 and st.decode_steps == 9
    assert st.prefill_s > 0 and st.decode_s > 0 and st.decode_tokens_per_s > 0


def test_bad_requests(gen):
    with pytest.raises(GenerationError, match="prompt 1 has 160 tokens"):
        gen.generate([[1, 2], [3] * 160], max_new_tokens=4)
    with pytest.raises(GenerationError, match="prompt 0: expected a non-empty"):
        gen.generate([[]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="token id 97 is outside"):
        gen.generate([[1, 97]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="wrap one prompt"):
        gen.generate([1, 2, 3], max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        gen.generate([[1]], max_new_tokens=0)
    with pytest.raises(GenerationError, match="eos_ids"):
        gen.generate([[1]], max_new_tokens=2, eos_ids=[500])
    with pytest.raises(GenerationError, match="stop_strings"):
        gen.generate([[1]], max_new_tokens=2, stop_strings=[""])
    no_tok = Generator(toy_forward, PARAMS, CFG, init_cache_fn=toy_init_cache)
    with pytest.raises(GenerationError, match="need a tokenizer"):
        no_tok.generate([[1]], max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(GenerationError, match="needs a tokenizer"):
        no_tok.stream([1], max_new_tokens=2)
    assert no_tok.trace_counts == {"prefill": 0, "decode": 0}


# ------------------------------------------------------------------ real GPT-2 vs transformers


@pytest.fixture(scope="module")
def tiny_gpt2_pair(tmp_path_factory):
    """A random tiny transformers GPT2LMHeadModel and the same weights loaded by gptjax."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import json

    from tiny_models import save_hf_dir, tiny_gpt2

    from gptjax.config import ModelConfig
    from gptjax.weights import load_params_hf

    model = tiny_gpt2(tied=True, seed=1)   # seed 1: varied greedy output (others repeat one token)
    d = save_hf_dir(model, tmp_path_factory.mktemp("gen_gpt2"))
    config = ModelConfig.from_hf(json.loads((d / "config.json").read_text()), source=str(d))
    return model, config, load_params_hf(d, config, jnp.float32)


def _hf_greedy(model, prompt, n):
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=gc)
    return out[0, len(prompt):].tolist()


def test_gpt2_greedy_matches_transformers_generate(tiny_gpt2_pair):
    from gptjax.models import gpt2

    model, config, params = tiny_gpt2_pair
    prompts = [_prompt(100, 7), _prompt(101, 13)]
    refs = [_hf_greedy(model, p, 32) for p in prompts]
    assert all(len(set(r)) > 4 for r in refs), "tiny model degenerate: the test would prove little"
    g = Generator(gpt2.forward, params, config, eos_ids=[], unembed_fn=gpt2.unembed)
    got = g.generate(prompts, max_new_tokens=32).completions
    assert [list(c.token_ids) for c in got] == refs
