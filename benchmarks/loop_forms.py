"""What the decode loop's form costs on gpt-oss-20b (synthetic weights, ggml layout): decode
tokens/s of the same request run as fixed-length chunks (static trip count: asynchronous), as one
early-exiting ``while_loop`` (a device-to-host copy of the loop predicate every step), and the
generator's default mix (fixed chunks of 16, the remainder as a while_loop), in one process.

    python benchmarks/loop_forms.py [--runs 3] [--long 4096]

Each row: median decode tokens/s of --runs calls after one warm-up call (compiles excluded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gptjax  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--long", type=int, default=4096)
    args = ap.parse_args()
    import synthetic_gguf

    m = gptjax.load(synthetic_gguf.cached("gpt-oss-20b"))
    gen = m._generator
    V = m.config.vocab_size
    prompt = synthetic_gguf.random_prompt(m)

    def rate(n_prompt, new, **kw):
        def once():
            r = gen.generate([prompt(n_prompt)], max_new_tokens=new, **kw)
            s = r.stats
            return s.decode_tokens_per_s, s.generated_tokens, s.decode_calls
        once()
        got = [once() for _ in range(args.runs)]
        return statistics.median(g[0] for g in got), got[0][1], got[0][2]

    rows = [
        ("b1, 128 new, EOS off: chunks of 32 + remainder 31 in a while_loop", 16, 128,
         dict(eos_ids=(), chunk_size=32)),
        ("b1, 129 new, EOS off: 4 chunks of 32, no remainder", 16, 129,
         dict(eos_ids=(), chunk_size=32)),
        ("b1, 128 new: one fixed loop of 127 steps", 16, 128, dict(eos_ids=(), chunk_size=127)),
        ("b1, 128 new, an EOS set that never fires: one while_loop of 127 steps", 16, 128,
         dict(eos_ids=(V - 1,))),
        ("b1, 128 new, EOS off, chunks of 16 (remainder 15 in a while_loop; default)", 16, 128,
         dict(eos_ids=())),
        ("b1, 128 new, EOS off, chunks of 8 (remainder 7 in a while_loop)", 16, 128,
         dict(eos_ids=(), chunk_size=8)),
        (f"{args.long}-token prompt, 64 new, EOS off: 32 fixed + 31 while", args.long, 64,
         dict(eos_ids=(), chunk_size=32)),
        (f"{args.long}-token prompt, 64 new, EOS off, chunks of 16 (default)", args.long, 64,
         dict(eos_ids=())),
        (f"{args.long}-token prompt, 64 new, EOS off, chunks of 8", args.long, 64,
         dict(eos_ids=(), chunk_size=8)),
        (f"{args.long}-token prompt, 65 new, EOS off: 2 chunks of 32", args.long, 65,
         dict(eos_ids=(), chunk_size=32)),
    ]
    print("| loop form | decode tok/s | generated | decode calls |\n|---|---|---|---|")
    for label, n_prompt, new, kw in rows:
        r, n, c = rate(n_prompt, new, **kw)
        print(f"| {label} | {r:.1f} | {n} | {c} |", flush=True)


if __name__ == "__main__":
    main()
