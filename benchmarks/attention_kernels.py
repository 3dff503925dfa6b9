"""Attention kernels on the GPU: check each Pallas kernel against its XLA twin, then time both.

Run on the device:  python benchmarks/attention_kernels.py [--runs 20] [--sweep] [--out FILE]

For every case (model-sized shapes, bfloat16 inputs and cache, random values):
1. build the kernel and its ``_ref`` (plain jnp, compiled by XLA) — the path the model uses today;
2. check: relative error ||kernel - ref|| / ||ref|| < 2e-2 (bf16) and all finite; a mismatch or a
   failure to build marks the case FAIL and the script exits 1 after the table;
3. time: median of ``--runs`` calls after 2 warm-up calls, each ``jax.block_until_ready``,
   cycling through 3 freshly drawn input sets.
Columns: kernel and XLA medians, speed-up (XLA / kernel), and the kernel's rate: for decode the
K/V bytes it must read (visible keys only) per second and the fraction of the card's measured
2.6 TB/s read bandwidth (PERFORMANCE.md); for prefill the useful attention FLOP/s
(4 * H * visible (query, key) pairs per query head).
``--sweep`` also times a grid of tiling parameters on one decode and one prefill case.
The decode "layer stack" rows compare reading layer l of the [L, B, K, S, H] stack in place
(``layer=l``) with slicing ``k[l]`` before the call inside the same jit.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import decode_attention, decode_attention_ref
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_ref

BF16_RTOL = 2e-2
KERNEL_KW: dict = {}        # {"interpret": True} under --smoke (CPU)
READ_BW = 2.6e12            # bytes/s, H100 read-only bandwidth measured through JAX

# name, B, N, K, H, S, lengths per row, window, sinks
DECODE = [
    ("gpt-oss-20b full layer, ctx 4096", 1, 64, 8, 64, 4096, [4096], None, True),
    ("gpt-oss-20b sliding layer (128), ctx 4096", 1, 64, 8, 64, 4096, [4096], 128, True),
    ("gpt-oss-20b full layer, ctx 16384", 1, 64, 8, 64, 16384, [16384], None, True),
    ("gpt-oss-20b full layer, batch 8 mixed", 8, 64, 8, 64, 4096,
     [4096, 3001, 2048, 1500, 1024, 700, 130, 17], None, True),
    ("SmolLM2-135M (G=3), ctx 2048", 1, 9, 3, 64, 2048, [2048], None, False),
    ("GPT-2 124M (G=1), ctx 1024", 1, 12, 12, 64, 1024, [1024], None, False),
    ("GPT-2 124M (G=1), batch 32, ctx 1024", 32, 12, 12, 64, 1024, [1024] * 32, None, False),
]

# name, B, T, N, K, H, S, q_start per row, window, sinks
PREFILL = [
    ("gpt-oss-20b full layer, T=512 into S=4096", 1, 512, 64, 8, 64, 4096, [0], None, True),
    ("gpt-oss-20b sliding (128), T=2048 into S=4096", 1, 2048, 64, 8, 64, 4096, [0], 128, True),
    ("gpt-oss-20b full layer, T=2048 into S=4096", 1, 2048, 64, 8, 64, 4096, [0], None, True),
    ("gpt-oss-20b full layer, batch 4, T=512", 4, 512, 64, 8, 64, 4096, [0, 0, 512, 1024], None,
     True),
    ("SmolLM2-135M (G=3), T=512 into S=2048", 1, 512, 9, 3, 64, 2048, [0], None, False),
    ("GPT-2 124M (G=1), T=512 into S=1024", 1, 512, 12, 12, 64, 1024, [0], None, False),
]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_time(fn, input_sets, runs):
    for i in range(2):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    times = []
    for i in range(runs):
        args = input_sets[i % len(input_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def draw(key, shapes, dtype=jnp.bfloat16):
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def visible(pos, S, window):
    lo = 0 if window is None else max(0, pos - window + 1)
    return max(0, min(pos + 1, S) - lo)


def decode_inputs(case, n_sets, L=None):
    _, B, N, K, H, S, lengths, window, sinks = case
    cache = (B, K, S, H) if L is None else (L, B, K, S, H)
    sets = []
    for i in range(n_sets):
        q, k, v = draw(jax.random.PRNGKey(100 + i), [(B, N, H), cache, cache])
        s = jax.random.normal(jax.random.PRNGKey(200 + i), (N,), jnp.float32) if sinks else None
        sets.append((q, k, v, jnp.asarray(lengths, jnp.int32), s))
    return sets


def prefill_inputs(case, n_sets):
    _, B, T, N, K, H, S, q_start, window, sinks = case
    sets = []
    for i in range(n_sets):
        q, k, v = draw(jax.random.PRNGKey(300 + i), [(B, T, N, H), (B, K, S, H), (B, K, S, H)])
        s = jax.random.normal(jax.random.PRNGKey(400 + i), (N,), jnp.float32) if sinks else None
        sets.append((q, k, v, jnp.asarray(q_start, jnp.int32), s))
    return sets


def run_pair(kernel_fn, ref_fn, sets, runs):
    """Check kernel vs ref on sets[0], then time both. Returns (err, t_kernel, t_ref)."""
    got = jax.block_until_ready(kernel_fn(*sets[0]))
    want = jax.block_until_ready(ref_fn(*sets[0]))
    finite = bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    err = rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) if finite else float("inf")
    return err, median_time(kernel_fn, sets, runs), median_time(ref_fn, sets, runs)


def decode_row(case, runs, tiling=None, label=None):
    name, B, N, K, H, S, lengths, window, sinks = case
    tiling = tiling or {}
    scale = H ** -0.5

    def kern(q, k, v, lens, s):
        return decode_attention(q, k, v, lens, window=window, sinks=s, scale=scale, **tiling,
                                **KERNEL_KW)

    def ref(q, k, v, lens, s):
        return decode_attention_ref(q, k, v, lens, window=window, sinks=s, scale=scale)

    err, tk, tr = run_pair(kern, ref, decode_inputs(case, 3), runs)
    nbytes = 2 * K * H * 2 * sum(visible(n - 1, S, window) for n in lengths)
    return dict(kind="decode", case=label or name, tiling=tiling, err=err, tk=tk, tr=tr,
                rate=f"{nbytes / tk / 1e9:,.0f} GB/s ({nbytes / tk / READ_BW:.0%} of 2.6 TB/s)")


def decode_stack_rows(case, runs, L=4, layer=2):
    """Kernel reading layer ``layer`` of the stack in place vs slicing it first (same jit)."""
    name, B, N, K, H, S, lengths, window, sinks = case
    scale = H ** -0.5
    sets = decode_inputs(case, 3, L=L)
    kw = dict(window=window, scale=scale)

    in_place = jax.jit(lambda q, k, v, n, s: decode_attention(q, k, v, n, sinks=s, layer=layer,
                                                              **kw, **KERNEL_KW))
    sliced = jax.jit(lambda q, k, v, n, s: decode_attention(q, k[layer], v[layer], n, sinks=s,
                                                            **kw, **KERNEL_KW))
    ref = jax.jit(lambda q, k, v, n, s: decode_attention_ref(q, k[layer], v[layer], n, sinks=s,
                                                             **kw))
    rows = []
    for label, fn in ((f"{name}: layer stack L={L}, layer= in place", in_place),
                      (f"{name}: layer stack L={L}, k[l] sliced then kernel", sliced)):
        err, tk, tr = run_pair(fn, ref, sets, runs)
        rows.append(dict(kind="decode", case=label, tiling={}, err=err, tk=tk, tr=tr, rate=""))
    return rows


def prefill_row(case, runs, tiling=None, label=None):
    name, B, T, N, K, H, S, q_start, window, sinks = case
    tiling = tiling or {}
    scale = H ** -0.5

    def kern(q, k, v, qs, s):
        return prefill_attention(q, k, v, qs, window=window, sinks=s, scale=scale, **tiling,
                                 **KERNEL_KW)

    def ref(q, k, v, qs, s):
        return prefill_attention_ref(q, k, v, qs, window=window, sinks=s, scale=scale)

    err, tk, tr = run_pair(kern, ref, prefill_inputs(case, 3), runs)
    pairs = sum(visible(p0 + t, S, window) for p0 in q_start for t in range(T))
    flops = 4 * N * H * pairs
    return dict(kind="prefill", case=label or name, tiling=tiling, err=err, tk=tk, tr=tr,
                rate=f"{flops / tk / 1e12:,.1f} TFLOP/s")


def sweep_jobs(decode_case, prefill_case, runs, decode_only=False):
    """(label, thunk) pairs timing a grid of tilings."""
    jobs = []
    for bk, ns, nw in itertools.product((32, 64, 128), (8, 16, 32, 64), (2, 4)):
        t = dict(block_k=bk, num_splits=ns, num_warps=nw)
        jobs.append((f"sweep {t}", functools.partial(decode_row, decode_case, runs, t,
                                                     label=f"sweep: {decode_case[0]}")))
    if decode_only:
        return jobs
    for bq, bk, nw, st in itertools.product((8, 16, 32), (32, 64, 128), (4, 8), (2, 3)):
        t = dict(block_q=bq, block_k=bk, num_warps=nw, num_stages=st)
        jobs.append((f"sweep {t}", functools.partial(prefill_row, prefill_case, runs, t,
                                                     label=f"sweep: {prefill_case[0]}")))
    return jobs


# --smoke: the same script on CPU in interpret mode with tiny shapes (checks the script only)
SMOKE_DECODE = [("smoke decode G=8 sinks", 2, 16, 2, 64, 96, [96, 17], None, True),
                ("smoke decode G=3 window", 1, 6, 2, 16, 64, [50], 16, False)]
SMOKE_PREFILL = [("smoke prefill G=8 sinks", 1, 20, 16, 2, 64, 64, [3], None, True),
                 ("smoke prefill G=1 window", 2, 17, 2, 2, 16, 48, [0, 30], 8, False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed calls per measurement (median)")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile sizes")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="only the decode cases and the decode tile grid")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes in interpret mode on CPU: checks that the script runs")
    args = ap.parse_args(argv)
    decode_cases, prefill_cases = (SMOKE_DECODE, SMOKE_PREFILL) if args.smoke else (DECODE,
                                                                                     PREFILL)
    if args.smoke:
        KERNEL_KW["interpret"] = True

    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    if jax.default_backend() != "gpu" and not args.smoke:
        print(f"warning: backend {jax.default_backend()!r}: the Pallas kernels need a GPU "
              f"(interpret mode is for tests, not timings)", file=sys.stderr)

    jobs = [(c[0], functools.partial(decode_row, c, args.runs)) for c in decode_cases]
    jobs.append((f"{decode_cases[0][0]} (layer stack)",
                 functools.partial(decode_stack_rows, decode_cases[0], args.runs)))
    if not args.decode_sweep:
        jobs += [(c[0], functools.partial(prefill_row, c, args.runs)) for c in prefill_cases]
    if args.sweep or args.decode_sweep:
        jobs += sweep_jobs(decode_cases[0], prefill_cases[-1 if args.smoke else 2], args.runs,
                           decode_only=args.decode_sweep)

    rows, failures = [], []
    for label, job in jobs:
        try:
            out = job()
        except Exception as e:                                        # report, keep going
            failures.append(f"{label}: {type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc()
            continue
        for r in out if isinstance(out, list) else [out]:
            ok = r["err"] < BF16_RTOL
            if not ok:
                failures.append(f"{r['case']} {r['tiling']}: rel err {r['err']:.3g}")
            rows.append(r)
            print(f"{'ok  ' if ok else 'FAIL'} {r['kind']:7s} {r['case']} {r['tiling'] or ''}: "
                  f"kernel {r['tk'] * 1e3:.3f} ms, XLA {r['tr'] * 1e3:.3f} ms, "
                  f"err {r['err']:.2e}", flush=True)

    date = datetime.date.today().isoformat()
    lines = [f"## Attention kernels vs XLA reference (benchmarks/attention_kernels.py), {date}", "",
             f"{card}, jax {jax.__version__}, backend {jax.default_backend()}; bfloat16; median "
             f"of {args.runs} runs after warm-up; error = ||kernel - ref|| / ||ref||.", "",
             "| kernel | case | tiling | kernel ms | XLA ref ms | speed-up | kernel rate "
             "| rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiling = ", ".join(f"{k}={v}" for k, v in r["tiling"].items()) or "default"
        lines.append(f"| {r['kind']} | {r['case']} | {tiling} | {r['tk'] * 1e3:.3f} | "
                     f"{r['tr'] * 1e3:.3f} | {r['tr'] / r['tk']:.2f}x | {r['rate']} | "
                     f"{r['err']:.1e}{'' if r['err'] < BF16_RTOL else ' FAIL'} |")
    table = "\n".join(lines)
    print()
    print(table)
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures), file=sys.stderr)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n\n" + table + ("\n\nFailures: " + "; ".join(failures) if failures else "")
                    + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
