"""GPU benchmark: fused MXFP4 / Q8_0 Pallas matmuls vs the XLA reference path, gpt-oss-20b shapes.

Run on the device (one H100):  python benchmarks/matmul_kernels.py [--runs 10] [--sweep]
                                                                   [--quick] [--out FILE]

What is measured, per case (x bfloat16 [M, 2880], weights random in the ggml layouts):
* kernel: ``pallas_kernels`` with the weights repacked at load time (the recommended layout);
  for decode rows also the kernel reading the GGUF bytes directly (no repack), to price the repack;
* baseline: the XLA reference path ``gptjax.packed.linear`` on a ``PackedWeight`` (decode the
  blocks to bf16 inside jit, then ``dot_general`` with float32 accumulation), same inputs;
* MoE: ``mxfp4_moe_matmul`` (decode: 1 token x top-4 of 32 experts, "pairs"; prefill: 128 tokens
  x top-4 = 512 routed rows, "grouped") vs ``mxfp4_moe_matmul_ref`` (gather the routed experts'
  bytes, decode, batched dot = the model's ``experts_gather``) for decode; prefill is checked on 8
  tokens against the ref and reported against the roofline only.
Shapes: M = 1, 16 (decode) and 512 (prefill) rows x I = 2880 inputs -> O = 2880 (experts), 4096
(q), 512 (k/v), 201088 (output head), for MXFP4 and for Q8_0.

Timing: each timed call runs R kernel calls back to back inside one jitted function (R = 20 for
decode, 4 for prefill, 2 for the prefill head), each on its own x and with the weight passed
through ``lax.optimization_barrier`` so XLA cannot share work (e.g. the reference path's
dequantization) between calls; time per call = (median over ``--runs`` timed runs, after a
warm-up, inputs cycled from a pool of 3 fresh random draws, minus the measured dispatch floor of
a program of R trivial calls) / R.  ``jax.block_until_ready``.  Launch gaps between the R
kernels stay in (the model pays them too).

Reported: time per call, achieved bandwidth of the packed weight bytes (+ x and output) against
2.6 TB/s (decode rows) or TFLOP/s against 667 (prefill), speed-up over the baseline.  Checks
(before timing): kernel vs baseline on the same inputs, relative error norm ``||y - y_ref|| /
||y_ref||`` <= 1e-2 (bf16 x; observed values are printed: MXFP4 differs only by summation order,
Q8_0 GEMV by not rounding weights to bf16).  Exits 1 after the table if any check fails.

``--sweep``: also times alternative tilings (block_n, block_k, k_splits, num_warps, gemv vs dot)
for the decode shapes and prints the best per shape (to set the defaults in plan_dense).
``--quick``: M = 1 and 512 only, no ggml-layout rows (fits a tighter device budget).
``--out FILE``: append the markdown table to FILE (e.g. benchmarks/RESULTS.md).
``--cpu-smoke``: tiny shapes in Pallas interpret mode on CPU, to check this script's plumbing
(timings meaningless).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

# Run from a checkout: import this tree's gptjax / pallas_kernels, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from gptjax.packed import PackedWeight, linear  # noqa: E402
from pallas_kernels import mxfp4_matmul as mx  # noqa: E402
from pallas_kernels import q8_matmul as q8  # noqa: E402
from report import emit  # noqa: E402

PEAK_BW = 2.6e12        # bytes/s, read bandwidth measured on the card (PERFORMANCE.md)
PEAK_FLOPS = 667e12     # bf16 matmul through XLA on the card (PERFORMANCE.md)
REL_TOL = 1e-2          # bf16 x: relative error norm kernel vs reference
I_DIM = 2880
OUTS = [2880, 4096, 512, 201088]
N_EXPERTS = 32
INTERPRET = False       # --cpu-smoke
MXFP4, Q8_0 = 39, 8
BYTES_PER_BLOCK = {MXFP4: 17, Q8_0: 34}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def random_weights(key, t, o, i):
    """ggml bytes uint8 [O, I/32 * bytes]: random codes/quants; MXFP4 scale bytes 118..122,
    Q8_0 f16 scales +-(1..2) * 2^-8 (PERFORMANCE.md: synthetic weights of the real layout)."""
    g = i // 32
    k1, k2, k3 = jax.random.split(key, 3)
    b = jax.random.bits(k1, (o, g, BYTES_PER_BLOCK[t]), jnp.uint8)
    if t == MXFP4:
        b = b.at[..., 0].set(jax.random.randint(k2, (o, g), 118, 123).astype(jnp.uint8))
    else:
        d = (jax.random.uniform(k2, (o, g), minval=1, maxval=2) * 2.0 ** -8
             * jnp.where(jax.random.bernoulli(k3, 0.5, (o, g)), 1.0, -1.0)).astype(jnp.float16)
        u = lax.bitcast_convert_type(d, jnp.uint16)
        b = b.at[..., 0].set((u & 0xFF).astype(jnp.uint8))
        b = b.at[..., 1].set((u >> 8).astype(jnp.uint8))
    return b.reshape(o, g * BYTES_PER_BLOCK[t])


def x_pool(key, reps, m, i, n=3):
    return [jax.random.normal(k, (reps, m, i), jnp.float32).astype(jnp.bfloat16)
            for k in jax.random.split(key, n)]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _run_many(fn, pool, args, runs):
    """Median seconds of one jitted program that calls fn R times, and its compile time."""
    reps = pool[0].shape[0]

    def many(xs, *a):
        outs = []
        for r in range(reps):
            xr, ar = lax.optimization_barrier((xs[r], a))
            outs.append(fn(xr, *ar))
        return tuple(outs)

    f = jax.jit(many)
    t0 = time.perf_counter()
    jax.block_until_ready(f(pool[0], *args))
    compile_s = time.perf_counter() - t0
    ts = []
    for k in range(runs):
        xs = pool[(k + 1) % len(pool)]
        t0 = time.perf_counter()
        jax.block_until_ready(f(xs, *args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), compile_s


_FLOOR: dict = {}


def dispatch_floor(pool, runs):
    """Host dispatch + sync cost of a program with R trivial calls (same arguments), measured
    once per R: subtracted from every timing so that microsecond kernels are not dominated by it."""
    reps = pool[0].shape[0]
    if reps not in _FLOOR:
        _FLOOR[reps] = _run_many(lambda x: x[:, :8].astype(jnp.float32) * 2, pool, (),
                                 runs=max(runs, 10))[0]
    return _FLOOR[reps]


def timed(fn, pool, *args, runs):
    """Seconds per call of fn(x, *args): (median time of a program with R calls - the dispatch
    floor of such a program) / R.  Returns (seconds, compile seconds)."""
    total, compile_s = _run_many(fn, pool, args, runs)
    reps = pool[0].shape[0]
    return max(total - dispatch_floor(pool, runs), 1e-9) / reps, compile_s


def rel_err(y, y_ref):
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    return float(np.linalg.norm(y - y_ref) / max(np.linalg.norm(y_ref), 1e-300))


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def kernel_fn(t, **plan):
    if t == MXFP4:
        return lambda x, w: mx.mxfp4_matmul(x, w, interpret=INTERPRET, **plan)
    return lambda x, w: q8.q8_0_matmul(x, w, interpret=INTERPRET, **plan)


def repack(t, raw):
    return mx.repack_mxfp4(raw) if t == MXFP4 else q8.repack_q8_0(raw)


def ref_fn(t, o, i):
    def f(x, raw):
        return linear(x, PackedWeight(raw, t, (o, i), jnp.bfloat16), out_dtype=jnp.float32)
    return f


def metrics(t, m, o, i, sec):
    wbytes = o * i // 32 * BYTES_PER_BLOCK[t]
    moved = wbytes + m * i * 2 + m * o * 4
    flops = 2.0 * m * o * i
    if m <= 16:
        return f"{moved / sec / 1e12:.2f} TB/s ({100 * moved / sec / PEAK_BW:.0f}%)"
    return f"{flops / sec / 1e12:.0f} TFLOP/s ({100 * flops / sec / PEAK_FLOPS:.0f}%)"


def plan_str(t, m, o, i, **over):
    p = mx.plan_dense(m, o, i, **over)
    return (f"{p.mode} {p.block_m}x{p.block_n}x{p.block_k} s{p.k_splits} w{p.num_warps}"
            + (" prefetch" if p.prefetch else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs per case (median)")
    ap.add_argument("--sweep", action="store_true", help="also sweep tilings for decode shapes")
    ap.add_argument("--quick", action="store_true", help="M = 1 and 512 only, no ggml rows")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global I_DIM, OUTS, N_EXPERTS, INTERPRET
    if args.cpu_smoke:
        I_DIM, OUTS, N_EXPERTS, INTERPRET = 96, [40, 72], 5, True
        args.runs = 2
    elif jax.default_backend() != "gpu":
        print("needs a GPU backend (the kernels run in interpret mode only on CPU: see tests/)")
        return 2
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    key = jax.random.PRNGKey(0)
    rows_m = [1, 512] if args.quick else [1, 16, 512]
    table, failures = [], []

    def add(what, shape, t_k, t_b, m, o, i, t, err, note):
        ok = err is None or err <= REL_TOL
        if not ok:
            failures.append(f"{what} {shape}: rel err {err:.2e} > {REL_TOL}")
        table.append([what, shape, f"{t_k * 1e6:.1f}", "" if t_b is None else f"{t_b * 1e6:.1f}",
                      metrics(t, m, o, i, t_k), "" if t_b is None else metrics(t, m, o, i, t_b),
                      "" if t_b is None else f"{t_b / t_k:.2f}x",
                      "n/a" if err is None else f"{err:.1e}" + ("" if ok else " FAIL"), note])

    for t, tname in ((MXFP4, "MXFP4"), (Q8_0, "Q8_0")):
        for o in OUTS:
            key, kw, kx = jax.random.split(key, 3)
            raw = random_weights(kw, t, o, I_DIM)
            wk = repack(t, raw)
            for m in rows_m:
                reps = 20 if m <= 16 else (2 if o > 50000 else 4)
                pool = x_pool(kx, reps, m, I_DIM)
                kf, rf = kernel_fn(t), ref_fn(t, o, I_DIM)
                shape = f"{m}x{I_DIM}->{o}"
                try:
                    y_ref = jax.jit(rf)(pool[0][0], raw)
                    y = jax.jit(kf)(pool[0][0], wk)
                    err = rel_err(y, y_ref)
                    t_k, c_k = timed(kf, pool, wk, runs=args.runs)
                    t_b, _ = timed(rf, pool, raw, runs=args.runs)
                    add(f"{tname} kernel (repacked)", shape, t_k, t_b, m, o, I_DIM, t, err,
                        f"{plan_str(t, m, o, I_DIM)}; compile {c_k:.1f} s")
                    if m == 1 and not args.quick:
                        y = jax.jit(kf)(pool[0][0], raw)
                        err = rel_err(y, y_ref)
                        t_g, _ = timed(kf, pool, raw, runs=args.runs)
                        add(f"{tname} kernel (ggml bytes)", shape, t_g, t_b, m, o, I_DIM, t, err,
                            "no repack")
                except Exception as e:                             # report, keep going
                    failures.append(f"{tname} {shape}: {type(e).__name__}: {str(e)[:300]}")
                    table.append([f"{tname} kernel", shape] + ["error"] + [""] * 6)
                del pool
            del raw, wk

    # ---- MoE (gpt-oss-20b: 32 experts, top-4, 2880 -> 2880 per expert matrix)
    E, K = N_EXPERTS, 4
    key, kw = jax.random.split(key)
    raw = jnp.stack([random_weights(k, MXFP4, I_DIM, I_DIM) for k in jax.random.split(kw, E)])
    wk = mx.repack_mxfp4(raw)
    for T_tok in (1, 128):
        try:
            _moe_case(table, failures, key, wk, E, K, T_tok, args.runs)
        except Exception as e:                                     # report, keep going
            failures.append(f"MoE T={T_tok}: {type(e).__name__}: {str(e)[:300]}")
            table.append([f"MXFP4 MoE T={T_tok}", ""] + ["error"] + [""] * 6)
        key = jax.random.split(key)[0]
    del raw, wk
    return _report(args, card, table, failures)


def _moe_case(table, failures, key, wk, E, K, T_tok, runs):
    """One MoE row: decode (T = 1, "pairs", vs the gather reference) or prefill (T = 128,
    "grouped", checked on 8 tokens, roofline only)."""
    key, kx, ki = jax.random.split(key, 3)
    reps = 20 if T_tok == 1 else 4
    pool = x_pool(kx, reps, T_tok, I_DIM)
    ids = jnp.argsort(jax.random.uniform(ki, (T_tok, E)), axis=1)[:, :K].astype(jnp.int32)
    kf = lambda x, w: mx.mxfp4_moe_matmul(x, w, ids, interpret=INTERPRET)
    n = min(T_tok, 8)
    y = jax.jit(kf)(pool[0][0], wk)[:n]
    y_ref = jax.jit(lambda x, w: mx.mxfp4_moe_matmul_ref(x, w, ids[:n]))(pool[0][0][:n], wk)
    err = rel_err(y, y_ref)
    t_k, c_k = timed(kf, pool, wk, runs=runs)
    p = mx.plan_moe(T_tok, K, I_DIM, I_DIM)
    n_exp = int(np.unique(np.asarray(ids)).size)
    if T_tok == 1:   # bytes: the routed experts' packed weights
        t_b, _ = timed(lambda x, w: mx.mxfp4_moe_matmul_ref(x, w, ids), pool, wk, runs=runs)
        moved = n_exp * I_DIM * I_DIM // 32 * 17
        perf = f"{moved / t_k / 1e12:.2f} TB/s ({100 * moved / t_k / PEAK_BW:.0f}%)"
        perf_b = f"{moved / t_b / 1e12:.2f} TB/s ({100 * moved / t_b / PEAK_BW:.0f}%)"
    else:            # flops: all routed rows
        t_b, perf_b = None, ""
        fl = 2.0 * T_tok * K * I_DIM * I_DIM
        perf = f"{fl / t_k / 1e12:.0f} TFLOP/s ({100 * fl / t_k / PEAK_FLOPS:.0f}%)"
    ok = err <= REL_TOL
    if not ok:
        failures.append(f"MoE T={T_tok}: rel err {err:.2e}")
    table.append([f"MXFP4 MoE {p.mode}", f"{T_tok} tok x top-{K} of {E}, {I_DIM}->{I_DIM}",
                  f"{t_k * 1e6:.1f}", "" if t_b is None else f"{t_b * 1e6:.1f}", perf, perf_b,
                  "" if t_b is None else f"{t_b / t_k:.2f}x",
                  f"{err:.1e}" + ("" if ok else " FAIL"),
                  f"{p.mode} {p.block_m}x{p.block_n}x{p.block_k} s{p.k_splits}; "
                  f"{n_exp} distinct experts; compile {c_k:.1f} s"
                  + ("" if T_tok == 1 else "; checked on 8 tokens; baseline n/a (the gather "
                     "reference would materialise 8.5 GB)")])


def _report(args, card, table, failures) -> int:
    head = (f"\n## Fused MXFP4 / Q8_0 matmul kernels vs XLA reference path "
            f"(benchmarks/matmul_kernels.py), {time.strftime('%Y-%m-%d')}\n\n"
            f"{card}, jax {jax.__version__}, backend {jax.default_backend()}; x bfloat16, "
            f"I = {I_DIM}; median of {args.runs} runs after warm-up, R calls per program "
            f"(decode 20, prefill 4, prefill head 2) minus the dispatch floor "
            f"({', '.join(f'R={r}: {v * 1e6:.0f} µs' for r, v in sorted(_FLOOR.items()))}); "
            f"bandwidth counts packed weight bytes + x + output vs {PEAK_BW / 1e12:.1f} TB/s "
            f"(decode), TFLOP/s vs {PEAK_FLOPS / 1e12:.0f} (prefill).  Baseline: "
            f"gptjax.packed.linear (dequantize to bf16 inside jit, then dot)."
            "\n\n| kernel | shape | µs | baseline µs | kernel perf | baseline perf | speed-up "
            "| rel err vs baseline | notes |\n|---|---|---|---|---|---|---|---|---|\n")
    out = head + "\n".join("| " + " | ".join(r) + " |" for r in table) + "\n"
    if args.sweep:
        out += sweep(args.runs, OUTS if args.cpu_smoke else [2880, 201088])
    emit(out, args.out)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


SWEEP = [
    dict(mode="gemv", block_n=32, block_k=256, prefetch=True),
    dict(mode="gemv", block_n=32, block_k=256, prefetch=False),
    dict(mode="gemv", block_n=16, block_k=256, prefetch=True),
    dict(mode="gemv", block_n=64, block_k=256, prefetch=False),
    dict(mode="gemv", block_n=32, block_k=512, prefetch=False),
    dict(mode="gemv", block_n=32, block_k=256, num_warps=8, prefetch=True),
    dict(mode="gemv", block_n=32, block_k=128, k_splits=8, prefetch=True),
    dict(mode="dot", block_m=16, block_n=32, block_k=128),
    dict(mode="dot", block_m=16, block_n=64, block_k=128),
    dict(mode="dot", block_m=16, block_n=32, block_k=256, num_warps=8),
]


def sweep(runs, outs) -> str:
    """Alternative tilings for decode (M = 1, 4, 16) at O = 2880 and 201088; best per shape."""
    key = jax.random.PRNGKey(1)
    lines = ["\n### Tiling sweep (decode rows; µs per call, repacked weights)\n",
             "| type | shape | " + " | ".join(_cfg_name(c) for c in SWEEP) + " | best |",
             "|---|---|" + "---|" * (len(SWEEP) + 1)]
    for t, tname in ((MXFP4, "MXFP4"), (Q8_0, "Q8_0")):
        for o in outs:
            key, kw, kx = jax.random.split(key, 3)
            wk = repack(t, random_weights(kw, t, o, I_DIM))
            for m in (1, 4, 16):
                pool = x_pool(kx, 20, m, I_DIM)
                cells, best = [], (math.inf, "")
                for c in SWEEP:
                    if c["mode"] == "gemv" and m > 8:
                        cells.append("")
                        continue
                    try:
                        s, _ = timed(kernel_fn(t, **c), pool, wk, runs=max(5, runs // 2))
                        cells.append(f"{s * 1e6:.1f}")
                        best = min(best, (s, _cfg_name(c)))
                    except Exception as e:                     # report, keep sweeping
                        cells.append(f"err {type(e).__name__}")
                lines.append(f"| {tname} | {m}x{I_DIM}->{o} | " + " | ".join(cells)
                             + f" | {best[1]} ({best[0] * 1e6:.1f}) |")
    return "\n".join(lines) + "\n"


def _cfg_name(c):
    short = {"block_m": "m", "block_n": "n", "block_k": "k", "k_splits": "s", "num_warps": "w"}
    parts = [f"{short[k]}{v}" for k, v in c.items() if k in short]
    parts += ["pf"] if c.get("prefetch") else []
    return c["mode"] + " " + ",".join(parts)


if __name__ == "__main__":
    sys.exit(main())
