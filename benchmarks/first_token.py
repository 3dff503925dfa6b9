"""Where a request's time goes around prefill, on gpt-oss-20b (synthetic weights, ggml layout):
``gptjax.generate.EARLY_FIRST_CHUNK`` (the first fixed-length decode chunk queued behind prefill
before prefill's result is read) on and off, in one process.

Per case and setting, medians of ``--runs`` calls after a warm-up: the whole call's wall time,
``stats.prefill_s`` (prefill until its result, the first token, is on the host: the time to first
token), ``stats.decode_s`` and the decode tokens/s the stats report.  A switch that only moves
time from decode to prefill leaves the wall time alone and raises the time to first token.

Eighth session, H100 (RESULTS.md): with a while_loop inside the decode step (``jnp.searchsorted``
in the batch-64 MoE routing, since removed) the early chunk's dispatch ran synchronously and the
first token waited for the whole chunk (batch 64: prefill_s 44 -> 228 ms, wall unchanged, the
stats' decode rate inflated by a third).  Without it: batch 1 wall -2.5..-7 ms, prefill_s
unchanged; batch 64 unchanged; 4096-token prompt wall unchanged within noise, about half of the
3 ms drop in decode_s moved into prefill_s.  A second switch, starting every summary's
device-to-host copy when its call is queued (``Array.copy_to_host_async``), changed nothing
measurable and was removed.

    python benchmarks/first_token.py [--runs 5]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gptjax  # noqa: E402
from gptjax import generate as G  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import synthetic_gguf

    m = gptjax.load(synthetic_gguf.cached("gpt-oss-20b"))
    gen = m._generator
    prompt = synthetic_gguf.random_prompt(m)

    def call(batch, n_prompt, new):
        prompts = [prompt(n_prompt) for _ in range(batch)]
        t0 = time.perf_counter()
        s = gen.generate(prompts, max_new_tokens=new, eos_ids=()).stats
        return time.perf_counter() - t0, s.prefill_s, s.decode_s, s.decode_tokens_per_s

    cases = [("b1, 16-token prompt, 128 new", 1, 16, 128), ("b64, 16-token prompts, 64 new", 64, 16, 64),
             ("b1, 4096-token prompt, 64 new", 1, 4096, 64)]
    print("| case | early first chunk | wall ms | prefill_s ms | decode_s ms | decode tok/s (stats) |"
          "\n|---|---|---|---|---|---|")
    for (label, b, n, new), early in itertools.product(cases, [False, True, False, True]):
        G.EARLY_FIRST_CHUNK = early
        call(b, n, new)
        got = [call(b, n, new) for _ in range(args.runs)]
        med = [statistics.median(g[i] for g in got) for i in range(4)]
        print(f"| {label} | {early} | {med[0] * 1e3:.1f} | {med[1] * 1e3:.1f} | "
              f"{med[2] * 1e3:.1f} | {med[3]:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
