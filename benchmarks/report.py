"""Shared output of the benchmark scripts: print a markdown table, and append it to --out."""
from __future__ import annotations


def emit(table: str, out: str | None) -> None:
    """Print ``table``; append it to the file ``out`` too when given (e.g. a RESULTS.md draft)."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(table)


#: Filled by :func:`device_us_per_call`: {fn name: {kernel name: µs per call}}.
BY_KERNEL: dict = {}


def device_us_per_call(fns: dict, reps: int = 20) -> dict:
    """Device time per call (µs) of jitted functions, from one profiler trace: the sum of the
    durations of every GPU kernel each function's module launches (so a Pallas kernel plus any
    XLA ops around it), without launch gaps or host time.

    fns: {unique name: (jitted fn, args tuple)}; each fn's ``__name__`` must be its key (it
    names the HLO module).  Every fn must have run once already (compiled)."""
    import collections
    import glob
    import os
    import tempfile

    import jax

    with jax.profiler.trace(tempfile.mkdtemp(prefix="devtime-warm-")):   # profiler start-up
        fn, args = next(iter(fns.values()))
        jax.block_until_ready(fn(*args))
    trace_dir = tempfile.mkdtemp(prefix="devtime-")
    with jax.profiler.trace(trace_dir):
        for fn, args in fns.values():
            for _ in range(reps):
                fn(*args)
            jax.block_until_ready(fn(*args))
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    per_module = collections.defaultdict(int)
    per_kernel = collections.defaultdict(lambda: collections.defaultdict(int))
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            for ev in line.events:
                module = str(dict(ev.stats).get("hlo_module", ""))
                per_module[module] += ev.duration_ns
                per_kernel[module][ev.name] += ev.duration_ns
    # jit names the module "jit_<fn name>" (a trailing underscore is dropped): match it exactly,
    # so that "f_1" does not also collect "f_10".
    out = {name: per_module.get(f"jit_{name.rstrip('_')}", 0) / (reps + 1) / 1e3 for name in fns}
    BY_KERNEL.clear()
    for name in fns:
        ks = per_kernel.get(f"jit_{name.rstrip('_')}", {})
        BY_KERNEL[name] = {k: v / (reps + 1) / 1e3 for k, v in ks.items()}
    if not any(out.values()):
        print(f"device_us_per_call: no kernel matched; modules in the trace: "
              f"{sorted(per_module)[:20]}")
    return out


def add_candidate(fns: dict, label: str, f, args: tuple, want=None, rtol: float = 1e-2,
                  prefix: str = "c", fresh: bool = False):
    """Jit ``f`` under a unique module name, run it on ``args`` (compiles), check the result
    against ``want`` (max |error| / max |want| <= rtol) and register it in ``fns`` for
    :func:`device_us_per_call`.  Returns (name, float32 result), or (None, None) after printing
    why when it does not build or is wrong.  Weights belong in ``args``: arrays a function
    closes over become HLO constants, and the profiler serialises every module.  ``fresh``:
    clear JAX's caches and keep an AOT-compiled executable (for candidates that differ only in
    environment switches or module globals read at trace time)."""
    import jax
    import numpy as np

    name = f"{prefix}{len(fns)}z"          # module names lose a trailing underscore

    def fn(*a):
        return f(*a)
    fn.__name__ = name
    try:
        if fresh:
            # Trace anew (the kernels' own jit caches ignore environment switches) and keep the
            # compiled executable, which a later retrace cannot replace.
            jax.clear_caches()
            jf = jax.jit(fn).lower(*args).compile()
        else:
            jf = jax.jit(fn)
        y = np.asarray(jax.block_until_ready(jf(*args)), np.float32)
    except Exception as e:                                                   # report, go on
        print(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        return None, None
    if want is not None:
        err = float(np.max(np.abs(y - want)) / np.max(np.abs(want)))
        if err > rtol:
            print(f"{label}: WRONG, rel err {err:.2e}")
            return None, None
    fns[name] = (jf, args)
    return name, y


def print_ranked(times: dict, meta: dict, base_label: str, top: int = 8, keep=()) -> None:
    """Markdown tables of :func:`device_us_per_call` results grouped by case, fastest first,
    against the ``base_label`` row of each case.  meta: {name: (case, label, bytes read)}.  The
    ``top`` fastest rows are printed, and the base row and the ``keep`` labels wherever they
    rank."""
    by: dict = {}
    for name, us in times.items():
        if us > 0:
            by.setdefault(meta[name][0], []).append((us, meta[name][1], meta[name][2]))
    for case, rs in by.items():
        base = next((us for us, lab, _ in rs if lab == base_label), float("nan"))
        rs.sort()
        print(f"\n### {case}: {base_label} {base:.2f} µs")
        print(f"| µs | vs {base_label} | TB/s | config |\n|---|---|---|---|")
        for us, lab, nb in rs[:top] + [r for r in rs[top:] if r[1] in (base_label, *keep)]:
            print(f"| {us:.2f} | {base / us:.2f}x | {nb / (us * 1e-6) / 1e12:.2f} | {lab} |")


#: gpt-oss-20b's Q8_0 projections, (O, I): the fused q/k/v and the attention output.
GPT_OSS_Q8_SHAPES = {"qkv 5120x2880": (5120, 2880), "out 2880x4096": (2880, 4096)}
#: ... and its vocab head.
GPT_OSS_HEAD_SHAPE = {"head 201088x2880": (201088, 2880)}


def gpt_oss_q8_shapes(head: bool) -> dict:
    """{label: (O, I)} of the gpt-oss-20b Q8_0 matmuls the row benchmarks time (a new dict)."""
    return {**GPT_OSS_Q8_SHAPES, **(GPT_OSS_HEAD_SHAPE if head else {})}


def random_mxfp4(rng, *shape):
    """Random MXFP4 weights of logical shape ``[..., O, I]`` in the kernel layout (random code
    bytes, scale bytes 118..127): ``pallas_kernels.mxfp4_matmul.Mxfp4Weights``."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import mxfp4_matmul as mx

    b = rng.integers(0, 256, (*shape[:-1], shape[-1] // 32, 17), dtype=np.uint8)
    b[..., 0] = rng.integers(118, 128, b.shape[:-1])
    return mx.repack_mxfp4(jnp.asarray(b.reshape(*shape[:-1], -1)))
