"""Where a decode step's time goes on the GPU: a profiler trace of real generate calls, summed
per kernel.

    python benchmarks/profile_decode.py --synthetic gpt-oss-20b [--batch 1] [--new 32]
    python benchmarks/profile_decode.py --gpt2

One warm-up generate call (compiles), then one traced call of --new tokens through
gptjax.generate.Generator (the real decode loop, not a stage cut out of it).  The trace
(``jax.profiler.trace``) is read back with ``jax.profiler.ProfileData`` and, for every line of
the GPU plane (streams, "XLA Ops", ...), the events are summed by name.  Printed per line: the
busy time per decoded step and the top kernels by total time (calls per step, µs per call,
µs per step, share).  Against the wall time per step the gap shows launch / idle time.

``--dump-names`` prints every distinct event name of the kernel line (to map Triton kernel
names to model stages).  CPU runs work (host planes only) to check the plumbing.
"""
from __future__ import annotations

import argparse
import collections
import glob
import importlib
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.api import ARCHITECTURES  # noqa: E402
from gptjax.generate import Generator  # noqa: E402
from gptjax.weights import default_dtype  # noqa: E402


def load_model(args, dtype):
    if args.gpt2:
        from gpt2_speed import gpt2_124m_config, random_params

        config = gpt2_124m_config()
        return config, random_params(config, dtype)
    import synthetic_gguf
    from gptjax.config import ModelConfig
    from gptjax.formats.gguf import read_gguf
    from gptjax.weights import load_params_gguf

    gf = read_gguf(synthetic_gguf.cached(args.synthetic))
    config = ModelConfig.from_gguf(gf)
    return config, load_params_gguf(gf, config, dtype)


def hlo_index(dump_dir: str | None) -> dict[str, str]:
    """Kernel name (dots as underscores) -> "shape op_name" of the instruction that launches
    it, from the optimized HLO modules dumped (names can repeat across modules: the last two
    distinct entries are kept, the largest module's last)."""
    if not dump_dir:
        return {}
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), key=os.path.getsize)
    index = {}
    for path in files:                       # largest last: its names win
        for line in open(path):
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
            if not m:
                continue
            op = re.search(r'op_name="([^"]*)"', line)
            entry = f"{m.group(2)[:40]} {op.group(1)[-110:] if op else ''}"
            seen = index.setdefault(_key(m.group(1)), [])
            if entry not in seen:
                seen.append(entry)
    return {k: " // ".join(v[-2:]) for k, v in index.items()}


def _key(name: str) -> str:
    return re.sub(r"[.\-]", "_", name)


def summarize(trace_dir: str, steps: int, wall_s: float, top: int, dump_names: bool,
              plane_prefix: str = "/device:", hlo: dict | None = None, module: str = "",
              sequence: int = 0, gaps: int = 0) -> None:
    hlo = hlo or {}
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        print("no xplane.pb written")
        return
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    print(f"\nwall time per step {wall_s / steps * 1e6:,.1f} µs ({steps} steps traced)")
    for plane in data.planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            agg = collections.defaultdict(lambda: [0, 0])
            spans = []
            for ev in line.events:
                if module and module not in str(dict(ev.stats).get("hlo_module", "")):
                    continue
                a = agg[ev.name]
                a[0] += 1
                a[1] += ev.duration_ns
                spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
            if not spans:
                continue
            spans.sort()
            busy, end = 0, -1
            for s, e in spans:                       # union of the intervals
                if e > end:
                    busy += e - max(s, end)
                    end = e
            total = sum(a[1] for a in agg.values())
            print(f"\n### {plane.name} / {line.name}: {len(spans)} events, busy {busy / steps / 1e3:,.1f} "
                  f"µs per step ({busy / 1e9 / wall_s:.0%} of wall), {len(agg)} distinct names")
            print("| name | calls/step | µs/call | µs/step | share | HLO shape, op_name |\n|---|---|---|---|---|---|")
            for name, (n, ns) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
                print(f"| {name[:90]} | {n / steps:.1f} | {ns / n / 1e3:.2f} | {ns / steps / 1e3:.1f} | "
                      f"{ns / total:.1%} | {hlo.get(_key(name), '')} |")
            if dump_names:
                print("names:", sorted(agg))
            if sequence:
                print_sequence(line, module, sequence, hlo)
            if gaps:
                print_gaps(line, gaps)


def print_gaps(line, n: int) -> None:
    """The ``n`` longest idle stretches of the line over the whole traced call (kernels of every
    HLO module: prefill, each decode call), with the events on either side and when they start
    (ms after the line's first event): where a request loses time between kernels."""
    evs = sorted((ev.start_ns, ev.duration_ns, ev.name, str(dict(ev.stats).get("hlo_module", "")))
                 for ev in line.events)
    if len(evs) < 2:
        return
    t0, end, rows, idle = evs[0][0], evs[0][0] + evs[0][1], [], 0
    for (s0, d0, n0, m0), (s1, d1, n1, m1) in zip(evs, evs[1:]):
        end = max(end, s0 + d0)
        gap = s1 - end
        if gap > 0:
            idle += gap
            rows.append((gap, (end - t0) / 1e6, f"{n0[:40]} ({m0[:30]})", f"{n1[:40]} ({m1[:30]})"))
    span = (max(s + d for s, d, *_ in evs) - t0) / 1e6
    print(f"\nidle gaps: {idle / 1e6:.2f} ms of {span:.2f} ms from first to last event; the "
          f"{n} longest:\n| gap µs | at ms | after | before |\n|---|---|---|---|")
    for gap, at, a, b in sorted(rows, reverse=True)[:n]:
        print(f"| {gap / 1e3:,.1f} | {at:.2f} | {a} | {b} |")


def print_sequence(line, module: str, n: int, hlo: dict) -> None:
    """The kernels of one stretch of a decode step in launch order: from the middle of the trace,
    ``n`` events starting after a "moe_down_combine" (a layer boundary on gpt-oss), each with
    its duration and the idle gap before it (launch overhead inside the device loop)."""
    evs = sorted((ev.start_ns, ev.duration_ns, ev.name) for ev in line.events
                 if not module or module in str(dict(ev.stats).get("hlo_module", "")))
    mid = len(evs) // 2
    start = next((i + 1 for i in range(mid, len(evs)) if "moe_down_combine" in evs[i][2]), mid)
    print(f"\nkernel sequence ({n} events from event {start}):\n| kernel | µs | gap before µs | "
          f"HLO |\n|---|---|---|---|")
    gaps = 0.0
    for (s0, d0, _), (s1, d1, name) in zip(evs[start - 1:start + n - 1], evs[start:start + n]):
        gap = (s1 - s0 - d0) / 1e3
        gaps += max(gap, 0.0)
        print(f"| {name[:60]} | {d1 / 1e3:.2f} | {gap:.2f} | {hlo.get(_key(name), '')[:80]} |")
    print(f"gaps in these {n} events: {gaps:.1f} µs")


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=["smollm2", "gpt-oss-20b", "gpt-oss-toy"])
    src.add_argument("--gpt2", action="store_true", help="GPT-2 124M, random weights")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dump-names", action="store_true")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--plane", default="/device:", help="summarise planes whose name starts with this")
    ap.add_argument("--module", default="_decode_impl",
                    help="count only kernels of HLO modules whose name contains this ('' = all)")
    ap.add_argument("--hlo-dump", default=None, help="dump optimized HLO here and map kernel names to op_names")
    ap.add_argument("--sequence", type=int, default=0,
                    help="also print this many kernels of one stretch in launch order, with gaps")
    ap.add_argument("--gaps", type=int, default=0,
                    help="also print the largest idle gaps of the whole traced call (every module)")
    args = ap.parse_args()
    if args.hlo_dump:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.hlo_dump}"
    dtype = jnp.dtype(default_dtype())
    config, params = load_model(args, dtype)
    mod = importlib.import_module(ARCHITECTURES[config.arch])
    gen = Generator(mod.forward, params, config, eos_ids=(), cache_dtype=dtype,
                    unembed_fn=getattr(mod, "unembed"))
    rng = np.random.default_rng(0)
    prompts = lambda: [list(rng.integers(0, config.vocab_size, args.prompt_len)) for _ in range(args.batch)]
    gen.generate(prompts(), max_new_tokens=args.new)                      # compile
    res = gen.generate(prompts(), max_new_tokens=args.new)
    print(f"untraced: decode {res.stats.decode_tokens_per_s:,.1f} tok/s", flush=True)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="gptjax-trace-")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        res = gen.generate(prompts(), max_new_tokens=args.new)
        wall = time.perf_counter() - t0
    steps = args.new
    print(f"traced: decode {res.stats.decode_tokens_per_s:,.1f} tok/s (whole call {wall * 1e3:.1f} ms incl. prefill)")
    summarize(trace_dir, steps, wall, args.top, args.dump_names, args.plane, hlo_index(args.hlo_dump),
              args.module, args.sequence, args.gaps)


if __name__ == "__main__":
    main()
