"""Decode and prefill speed of a GGUF model, packed quantized weights vs dequantized at load.

    python benchmarks/decode_speed.py --synthetic smollm2 [--batches 1,32] [--out RESULTS.md]
    python benchmarks/decode_speed.py --file model.gguf

For each weight mode (packed: the file's bytes on the device, decoded inside every matmul by the
XLA reference path; dense: decoded once at load to the compute dtype) it measures:
* decode tokens/s (aggregate over the batch) through gptjax.generate.Generator, greedy, 128 new
  tokens after 16-token random prompts, no EOS; median of --runs calls after a warm-up call;
* pp512: one prefill forward over [1, 512] tokens (hidden states, logits of the last row);
* weight bytes resident on the device and the device's peak memory (where the backend reports it).
Ratios: packed / dense in the same process.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.api import ARCHITECTURES
from gptjax.cache import init_cache
from gptjax.config import ModelConfig
from gptjax.formats.gguf import read_gguf
from gptjax.generate import Generator
from gptjax.weights import default_dtype, load_params_gguf
from report import emit  # noqa: E402


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree))


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(gf, config, mode: str, dtype, batches, runs, new_tokens, rng, prompt_len=16, prefill=True):
    mod = importlib.import_module(ARCHITECTURES[config.arch])
    t0 = time.perf_counter()
    params = load_params_gguf(gf, config, dtype, dequantize_at_load=(mode == "dense"))
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    out = {"mode": mode, "load_s": load_s, "weight_bytes": tree_bytes(params)}
    unembed = getattr(mod, "unembed")
    gen = Generator(mod.forward, params, config, eos_ids=(), cache_dtype=dtype, unembed_fn=unembed)
    for b in batches:
        prompts = lambda: [list(rng.integers(0, config.vocab_size, prompt_len)) for _ in range(b)]
        t0 = time.perf_counter()
        gen.generate(prompts(), max_new_tokens=new_tokens)
        compile_s = time.perf_counter() - t0
        rates = [gen.generate(prompts(), max_new_tokens=new_tokens).stats.decode_tokens_per_s for _ in range(runs)]
        out[f"decode_b{b}"] = statistics.median(rates)
        out[f"compile_b{b}"] = compile_s
        print(f"[{mode}] batch {b}: first call (compile + run) {compile_s:.1f} s, decode "
              f"{out[f'decode_b{b}']:,.1f} tok/s, weights {out['weight_bytes'] / 2**30:.2f} GiB, "
              f"load {load_s:.1f} s, peak {peak_bytes()}", flush=True)

    out["pp512"] = float("nan")
    out["peak_bytes"] = peak_bytes()
    if not prefill:
        return out
    T = 512

    def prefill_fn(params, tokens):
        cache = init_cache(config, 1, T, dtype)
        h, cache = mod.forward(params, tokens, jnp.zeros((1,), jnp.int32), cache, config, return_hidden=True)
        return unembed(params, h[:, -1:]), cache

    prefill = jax.jit(prefill_fn)
    toks = [jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32) for _ in range(runs + 1)]
    t0 = time.perf_counter()
    jax.block_until_ready(prefill(params, toks[0]))
    print(f"[{mode}] pp512 compile + first run {time.perf_counter() - t0:.1f} s", flush=True)
    times = []
    for t in toks[1:]:
        t0 = time.perf_counter()
        jax.block_until_ready(prefill(params, t))
        times.append(time.perf_counter() - t0)
    out["pp512"] = T / statistics.median(times)
    out["peak_bytes"] = peak_bytes()
    del gen, params, prefill
    return out


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--file")
    src.add_argument("--synthetic", choices=["smollm2", "gpt-oss-20b", "gpt-oss-toy"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--modes", default="packed,dense")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--no-prefill", action="store_true", help="skip the pp512 measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = args.file
    if args.synthetic:
        import synthetic_gguf

        path = synthetic_gguf.cached(args.synthetic)
    t0 = time.perf_counter()
    gf = read_gguf(path)
    config = ModelConfig.from_gguf(gf)
    print(f"metadata + config: {time.perf_counter() - t0:.2f} s ({len(gf.tensors)} tensors)", flush=True)
    dtype = jnp.dtype(args.dtype) if args.dtype else jnp.dtype(default_dtype())
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    results = [measure(gf, config, mode, dtype, batches, args.runs, args.new, rng, args.prompt_len,
                       not args.no_prefill) for mode in args.modes.split(",")]

    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    name = args.synthetic or os.path.basename(path)
    lines = [f"\n## {name}: decode and prefill, packed vs dequantized at load (benchmarks/decode_speed.py), "
             f"{time.strftime('%Y-%m-%d')}\n",
             f"{card}, jax {jax.__version__}, compute dtype {dtype.name}; greedy, {args.prompt_len}-token prompts, "
             f"{args.new} new tokens, median of {args.runs} calls.\n",
             "| weights | " + " | ".join(f"decode b{b} tok/s" for b in batches)
             + " | pp512 tok/s | weights on device | peak device memory | load s |",
             "|---|" + "---|" * (len(batches) + 4)]
    for r in results:
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB" if r["peak_bytes"] else "n/a"
        lines.append(f"| {r['mode']} | " + " | ".join(f"{r[f'decode_b{b}']:,.1f}" for b in batches)
                     + f" | {r['pp512']:,.0f} | {r['weight_bytes'] / 2**20:.1f} MiB | {peak} | {r['load_s']:.2f} |")
    if len(results) == 2:
        a, b = results
        lines.append(f"| ratio {a['mode']}/{b['mode']} | "
                     + " | ".join(f"{a[f'decode_b{x}'] / b[f'decode_b{x}']:.2f}x" for x in batches)
                     + f" | {a['pp512'] / b['pp512']:.2f}x | {a['weight_bytes'] / b['weight_bytes']:.2f}x | | |")
    table = "\n".join(lines) + "\n"
    emit(table, args.out)


if __name__ == "__main__":
    main()
