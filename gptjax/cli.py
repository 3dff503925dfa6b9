"""The `gptjax` command line: a thin shell over the Python API.

    gptjax inspect FILE                 architecture, config, tensor types, memory, tokenizer facts

Every user error prints one line (``gptjax: error: ...``) on stderr and exits with status 2; no
traceback.  Imports of JAX and the model code are lazy so that ``--help`` and ``inspect`` stay quick.
"""
from __future__ import annotations

import argparse
import collections
import sys


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptjax", description="Run GPT-family models from GGUF files on JAX.")
    sub = p.add_subparsers(dest="command", required=True)

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
