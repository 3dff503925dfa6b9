"""Per-token decode time broken down by stage, and the kernel count of one decode step.

    python benchmarks/decode_breakdown.py --model gpt2-124m
    python benchmarks/decode_breakdown.py --model gpt-oss-20b      # writes the synthetic file first

Stages are timed as separate jitted functions on the model's real parameters at batch 1 with a
cache of --context positions (median of --runs calls after warm-up, block_until_ready):
embedding, one block (each distinct layer kind: full / sliding), the final norm + head, greedy
sampling, and the whole step; "blocks total" scales the per-block times by the layer count.
The sum of the stages against the whole step shows what fusion across stages saves and what
launch gaps cost.  With --dump DIR the whole step's optimized HLO is written there and its
kernel-launching instructions (fusions, custom calls, library GEMMs) are counted: on a GPU,
each is at least one launch per decoded token.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptjax.api import ARCHITECTURES  # noqa: E402
from gptjax.cache import init_cache  # noqa: E402
from gptjax.weights import default_dtype  # noqa: E402


def timed(fn, *args, runs):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load(model: str, dtype):
    if model == "gpt2-124m":
        from gpt2_speed import gpt2_124m_config, random_params

        config = gpt2_124m_config()
        return config, random_params(config, dtype)
    import synthetic_gguf
    from gptjax.config import ModelConfig
    from gptjax.formats.gguf import read_gguf
    from gptjax.weights import load_params_gguf

    gf = read_gguf(synthetic_gguf.cached(model))
    config = ModelConfig.from_gguf(gf)
    return config, load_params_gguf(gf, config, dtype)


def count_launches(dump_dir: str) -> dict[str, int]:
    """Kernel-launching instructions in the entry computation and loop bodies of the optimized
    HLO of the largest module dumped (the decode step)."""
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), key=os.path.getsize)
    if not files:
        return {}
    text = open(files[-1]).read()
    kinds = {"fusion": r"= \S+ fusion\(", "custom-call": r"= \S+ custom-call\(",
             "dot (unfused)": r"= \S+ dot\(", "while": r"= \S+ while\("}
    return {k: len(re.findall(p, text)) for k, p in kinds.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-124m", choices=["gpt2-124m", "smollm2", "gpt-oss-20b", "gpt-oss-toy"])
    ap.add_argument("--context", type=int, default=256, help="cache positions (the query sits at the last)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--dump", default=None, help="directory for the optimized HLO of one decode step")
    args = ap.parse_args()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump}"
    dtype = jnp.dtype(args.dtype) if args.dtype else jnp.dtype(default_dtype())
    config, params = load(args.model, dtype)
    mod = importlib.import_module(ARCHITECTURES[config.arch])
    S = args.context
    pos = jnp.asarray([S - 1], jnp.int32)
    tok = jnp.asarray([[7]], jnp.int32)
    cache = init_cache(config, 1, S, dtype)
    rows = []

    step = jax.jit(lambda p, t, s, c: mod.forward(p, t, s, c, config))
    full = timed(step, params, tok, pos, cache, runs=args.runs)

    # Blocks: the forward loops over params["blocks"] with the layer index deciding the kind
    # (gpt-oss: even = sliding, odd = full), so time the model cut to its first n blocks, n = 0,
    # 1, 2 (hidden states only): block 0 = t1 - t0, block 1 = t2 - t1.
    from gptjax.models import layers as L

    hidden = jax.jit(lambda p, t, s, c: mod.forward(p, t, s, c, config, return_hidden=True))
    t_n = []
    for n in range(min(3, config.n_layers + 1)):
        cut = dict(params)
        cut["blocks"] = params["blocks"][:n]
        t_n.append(timed(hidden, cut, tok, pos, cache, runs=args.runs))
    kind = lambda i: "sliding" if (config.sliding_window and config.sliding_window_pattern[i]) else "full"
    per_layer = [t_n[i + 1] - t_n[i] for i in range(len(t_n) - 1)]
    blocks_total = sum(per_layer[i % len(per_layer)] for i in range(config.n_layers))
    for i, t in enumerate(per_layer):
        rows.append((f"block {i} ({kind(i)})", t))
    rows.append(("embedding + final norm (no blocks)", t_n[0]))
    h = jnp.ones((1, 1, config.d_model), jnp.float32)
    unembed = getattr(mod, "unembed", L.unembed)
    rows.append(("head (unembed of one row)", timed(jax.jit(lambda p, h: unembed(p, h)), params, h, runs=args.runs)))
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, config.vocab_size)), jnp.float32)
    rows.append(("greedy sampling (argmax over V)", timed(jax.jit(lambda x: jnp.argmax(x, axis=-1)), logits,
                                                         runs=args.runs)))
    rows.append((f"blocks total (per-block times x {config.n_layers} layers)", blocks_total))
    rows.append(("whole decode step (one jitted forward)", full))
    dev = jax.devices()[0]
    print(f"\n## Decode breakdown: {args.model}, batch 1, context {S}, {dtype.name} "
          f"({getattr(dev, 'device_kind', dev)}, jax {jax.__version__}; benchmarks/decode_breakdown.py)\n")
    print("| stage | ms | share of the step |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.3f} | {t / full:.0%} |")
    print(f"\nsteps/s from the whole step: {1 / full:,.1f}")
    if args.dump:
        print("kernel-launching instructions in the step's optimized HLO:", count_launches(args.dump))


if __name__ == "__main__":
    main()
