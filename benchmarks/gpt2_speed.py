"""GPT-2 124M speed: batch-1 decode (tg128) and prefill of 512 tokens (pp512), random weights.

Run on the device (bf16 on the GPU):  python benchmarks/gpt2_speed.py [--dtype bfloat16] [--out FILE]

What is measured (median of >= 10 timed runs after warm-up, fresh random tokens each run):
* pp512: one jitted forward over [1, 512] tokens into an empty cache, hidden states for every
  position and logits for the last one (what generate's prefill does); tokens/s = 512 / time.
* tg128: gptjax.generate.Generator, greedy, 128 new tokens after a 1-token prompt, no EOS;
  decode tokens/s from the generator's own stats (one device while_loop, cache donated).
* baseline "naive loop": the same jitted one-token forward called from Python once per token
  with argmax on the device (one host round-trip per token) = the XLA path without the
  compiled loop.
* first-call compile time of prefill and of the decode loop.
Ratios are against llama.cpp's numbers on the same card (PERFORMANCE.md: tg128 1,522 tok/s,
pp512 104,134 tok/s) and against the naive loop measured in this process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.cache import init_cache
from gptjax.config import ModelConfig
from gptjax.generate import Generator
from gptjax.models import gpt2
from gptjax.models.layers import F32
from report import emit  # noqa: E402

LLAMA_CPP = {"tg128": 1522.0, "pp512": 104134.0}


def gpt2_124m_config() -> ModelConfig:
    md = {
        "general.architecture": "gpt2",
        "gpt2.block_count": 12, "gpt2.context_length": 1024, "gpt2.embedding_length": 768,
        "gpt2.feed_forward_length": 3072, "gpt2.attention.head_count": 12,
        "gpt2.attention.layer_norm_epsilon": 1e-5, "gpt2.vocab_size": 50257,
    }
    return ModelConfig.from_gguf_metadata(md, source="gpt2-124m (synthetic)")


def random_params(config, dtype, seed=0):
    """Random weights in the loader's dtypes: matrices in `dtype`, norms and biases float32."""
    rng = np.random.default_rng(seed)
    tree: dict = {"blocks": [dict() for _ in range(config.n_layers)]}
    for path, shape in gpt2.param_shapes(config).items():
        parts = path.split(".")
        is_matrix = len(shape) == 2
        val = rng.standard_normal(shape, dtype=np.float32) * (0.02 if is_matrix else 0.1)
        if parts[-1] == "weight" and not is_matrix:
            val = val + 1.0
        arr = jnp.asarray(val, dtype if is_matrix else jnp.float32)
        if parts[0] == "blocks":
            node = tree["blocks"][int(parts[1])].setdefault(parts[2], {})
        else:
            node = tree.setdefault(parts[0], {})
        node[parts[-1]] = arr
    return tree


def median_time(fn, n=15):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16" if jax.default_backend() != "cpu" else "float32")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    cfg = gpt2_124m_config()
    params = random_params(cfg, dtype)
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    rng = np.random.default_rng(1)
    rows = []

    # ---- pp512: prefill forward (hidden for all positions, logits for the last one)
    T = args.prefill

    def prefill_fn(params, tokens):
        cache = init_cache(cfg, 1, T, dtype)
        h, cache = gpt2.forward(params, tokens, jnp.zeros((1,), jnp.int32), cache, cfg, return_hidden=True)
        return gpt2.unembed(params, h[:, -1:]), cache

    prefill = jax.jit(prefill_fn)
    toks = lambda: jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(prefill(params, toks()))
    compile_prefill = time.perf_counter() - t0
    batches = [toks() for _ in range(args.runs)]
    it = iter(batches)
    med, _ = median_time(lambda: jax.block_until_ready(prefill(params, next(it))), n=args.runs)
    pp = T / med
    rows.append(("pp512 (prefill forward)", f"{pp:,.0f} tok/s", f"{med * 1e3:.2f} ms",
                 f"{pp / LLAMA_CPP['pp512']:.2f}x", "", f"compile {compile_prefill:.1f} s"))

    # ---- tg128 through the compiled loop
    gen = Generator(gpt2.forward, params, cfg, eos_ids=(), cache_dtype=dtype, unembed_fn=gpt2.unembed)
    prompt = [int(rng.integers(0, cfg.vocab_size))]
    t0 = time.perf_counter()
    first = gen.generate([prompt], max_new_tokens=args.new)
    compile_decode = time.perf_counter() - t0
    assert len(first.completions[0].token_ids) == args.new, first.completions[0]
    decode_rates = []
    for _ in range(args.runs):
        prompt = [int(rng.integers(0, cfg.vocab_size))]
        r = gen.generate([prompt], max_new_tokens=args.new)
        decode_rates.append(r.stats.decode_tokens_per_s)
    tg = statistics.median(decode_rates)

    # ---- baseline: naive host loop, one jitted step per token
    S = first.stats.cache_length

    @jax.jit
    def step(params, tok, pos, cache):
        logits, cache = gpt2.forward(params, tok, pos, cache, cfg)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    def naive(n):
        cache = init_cache(cfg, 1, S, dtype)
        tok = jnp.asarray([[prompt[0]]], jnp.int32)
        out = []
        for i in range(n):
            tok, cache = step(params, tok, jnp.asarray([i], jnp.int32), cache)
            out.append(tok)
        return jax.block_until_ready(out[-1])

    naive(4)
    med_naive, _ = median_time(lambda: naive(args.new), n=max(5, args.runs // 3))
    naive_rate = args.new / med_naive
    # Same tokens? (greedy on identical weights and prompt: the loop must equal the naive path)
    check = gen.generate([prompt], max_new_tokens=16).completions[0].token_ids
    cache = init_cache(cfg, 1, S, dtype)
    tok = jnp.asarray([[prompt[0]]], jnp.int32)
    naive_ids = []
    for i in range(16):
        tok, cache = step(params, tok, jnp.asarray([i], jnp.int32), cache)
        naive_ids.append(int(tok[0, 0]))
    agree = sum(a == b for a, b in zip(check, naive_ids))

    rows.append(("tg128 (decode, compiled while_loop)", f"{tg:,.0f} tok/s", f"{1e3 / tg:.3f} ms/token",
                 f"{tg / LLAMA_CPP['tg128']:.2f}x", f"{tg / naive_rate:.2f}x",
                 f"compile (prefill+loop) {compile_decode:.1f} s"))
    rows.append(("tg128 baseline: naive host loop", f"{naive_rate:,.0f} tok/s", f"{1e3 / naive_rate:.3f} ms/token",
                 f"{naive_rate / LLAMA_CPP['tg128']:.2f}x", "1.00x", f"greedy ids agree {agree}/16"))

    head = (f"\n## GPT-2 124M, random weights, {args.dtype}, batch 1 (benchmarks/gpt2_speed.py), "
            f"{time.strftime('%Y-%m-%d')}\n\n{card}, jax {jax.__version__}, backend {jax.default_backend()}; "
            f"median of {args.runs} runs after warm-up.\n\n"
            "| test | rate | time | vs llama.cpp (same card) | vs naive loop | notes |\n|---|---|---|---|---|---|\n")
    table = head + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    emit(table, args.out)


if __name__ == "__main__":
    main()
