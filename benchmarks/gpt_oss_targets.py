"""gpt-oss-20b (synthetic weights, ggml layout) against the speed targets of issues #5 and #6, in one
process: load to first token (broken down), batch-1 decode, decode after a long context, pp512,
batch-64 decode, resident weights, peak memory and memory across 100 generate calls.

    python benchmarks/gpt_oss_targets.py [--model gpt-oss-20b] [--skip b64,long,...] [--out FILE]

Everything goes through the public path (``gptjax.load`` then ``Model.complete``: the real
generate loop), greedy, EOS disabled, random token prompts.  The kernel path is what the
environment says (GPTJAX_KERNELS; unset = Pallas kernels on a GPU); run once with
GPTJAX_KERNELS=ref for the reference-path baseline.

Measured:
* load: ``gptjax.load`` (metadata + tokenizer, weights to the device incl. fusion and kernel
  repack), then the first ``complete`` of a 16-token prompt with one new token (prefill compile +
  run = time to first token), then the first decode call (decode-loop compile).  A fresh process
  with an empty persistent compile cache (this script does not enable it).
* decode b1: 16-token prompt, 128 new tokens, median of --runs calls (decode tokens/s from the
  generator's own timing: device loop only, prefill excluded).
* decode after long context: a --long-token prompt (default 4096), then 64 new tokens.
* pp512: prefill tokens/s of a 512-token prompt (first token included), median of --runs.
* decode b64: 64 prompts of 16 tokens, 64 new tokens each, aggregate tokens/s.
* memory: bytes of the parameter tree; the device's peak; bytes in use after each of --calls
  generate calls (flat = no growth after the first).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import gptjax  # noqa: E402
from report import emit  # noqa: E402

LLAMA_CPP = {"decode": 307.6, "decode_4096": 300.7, "pp512": 9928.0}


def mem():
    s = jax.devices()[0].memory_stats() or {}
    return s.get("bytes_in_use"), s.get("peak_bytes_in_use")


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt-oss-20b", choices=["gpt-oss-20b", "gpt-oss-toy"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma list of: b1,long,pp512,b64,memory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import synthetic_gguf

    path = synthetic_gguf.cached(args.model)
    kernels = os.environ.get("GPTJAX_KERNELS", "auto")
    rows = []

    def row(name, value, target=None, note=""):
        rows.append((name, value, target, note))
        print(f"{name}: {value} {note}", flush=True)

    t0 = time.perf_counter()
    m = gptjax.load(path)
    t_load = time.perf_counter() - t0
    prompt = synthetic_gguf.random_prompt(m)
    t1 = time.perf_counter()
    m.complete([prompt(16)], max_new_tokens=1, eos_ids=())
    t_first = time.perf_counter() - t1
    t2 = time.perf_counter()
    m.complete([prompt(16)], max_new_tokens=8, eos_ids=())
    t_decode_compile = time.perf_counter() - t2
    lt = m.load_timings
    row("load to first token", f"{t_load + t_first:.1f} s", "<= 30 s",
        f"(metadata + tokenizer {lt.get('metadata_s', 0):.2f} s, weights {lt.get('weights_s', 0):.1f} s, "
        f"first prefill incl. compile {t_first:.1f} s; first decode call incl. its compile {t_decode_compile:.1f} s)")
    weights = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(m.params))
    row("weights on device", gib(weights), "<= 13 GiB")

    def decode_rate(prompts, new):
        r = m.complete(prompts, max_new_tokens=new, eos_ids=())
        return r.stats

    if "b1" not in skip:
        decode_rate([prompt(16)], 128)
        rates = [decode_rate([prompt(16)], 128).decode_tokens_per_s for _ in range(args.runs)]
        d = statistics.median(rates)
        row("decode b1", f"{d:,.1f} tok/s", ">= 615", f"({d / LLAMA_CPP['decode']:.2f}x llama.cpp 307.6)")
    if "pp512" not in skip:
        decode_rate([prompt(512)], 1)
        pp = statistics.median(decode_rate([prompt(512)], 1).prefill_tokens_per_s for _ in range(args.runs))
        row("pp512", f"{pp:,.0f} tok/s", ">= 15,000", f"({pp / LLAMA_CPP['pp512']:.2f}x llama.cpp 9,928)")
    if "long" not in skip:
        t3 = time.perf_counter()
        s = decode_rate([prompt(args.long)], 64)
        first = time.perf_counter() - t3
        s = decode_rate([prompt(args.long)], 64)
        row(f"decode b1 after {args.long} tokens", f"{s.decode_tokens_per_s:,.1f} tok/s", ">= 550",
            f"({s.decode_tokens_per_s / LLAMA_CPP['decode_4096']:.2f}x llama.cpp 300.7; prefill "
            f"{s.prefill_tokens_per_s:,.0f} tok/s; first call incl. compile {first:.1f} s)")
    if "b64" not in skip:
        t4 = time.perf_counter()
        decode_rate([prompt(16) for _ in range(64)], 64)
        first = time.perf_counter() - t4
        s = decode_rate([prompt(16) for _ in range(64)], 64)
        row("decode b64 (aggregate)", f"{s.decode_tokens_per_s:,.0f} tok/s", ">= 7,000",
            f"(first call incl. compile {first:.1f} s)")
    used0, peak = mem()
    row("peak device memory so far", gib(peak))
    if "memory" not in skip and used0 is not None:
        used = []
        for _ in range(args.calls):
            m.complete([prompt(16)], max_new_tokens=8, eos_ids=())
            used.append(mem()[0])
        row(f"bytes in use over {args.calls} generate calls", f"first {gib(used[0])}, last {gib(used[-1])}, "
            f"max {gib(max(used))}", "flat", f"(growth {(used[-1] - used[0]) / 2**20:+.1f} MiB)")

    dev = jax.devices()[0]
    lines = [f"\n## {args.model} targets (benchmarks/gpt_oss_targets.py), {time.strftime('%Y-%m-%d')}, "
             f"GPTJAX_KERNELS={kernels}\n",
             f"{getattr(dev, 'device_kind', dev)}, jax {jax.__version__}; synthetic weights in the ggml layout; "
             f"greedy, EOS off; medians of {args.runs} calls.\n",
             "| measure | result | target | notes |", "|---|---|---|---|"]
    lines += [f"| {n} | {v} | {t or ''} | {note} |" for n, v, t, note in rows]
    table = "\n".join(lines) + "\n"
    emit(table, args.out)


if __name__ == "__main__":
    main()
