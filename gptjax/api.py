"""The Python API: ``m = gptjax.load(path)``, then ``m.generate``, ``m.stream``, ``m.chat``,
``m.logits``, ``m.perplexity``; ``m.tokenizer`` and ``m.config``.

A :class:`Model` ties together what the lower layers build (docs/INTERFACES.md):

    file ─► formats.gguf / HF dir ─► ModelConfig ─► weights (param pytree) ─┐
                                  └► Tokenizer ─────────────────────────────┼─► Generator (jitted loop)
                                                                            └─► perplexity, logits

Architectures are a data table (:data:`ARCHITECTURES`): the module giving ``forward`` (and
optionally ``unembed``) for each ``config.arch``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gptjax.errors import FormatError, GenerationError, UnsupportedModelError

__all__ = ["ARCHITECTURES", "ChatReply", "Model", "load"]

#: config.arch -> module with ``forward(params, tokens, start, cache, config, *, return_hidden)``
#: and (optionally) ``unembed(params, hidden)``.
ARCHITECTURES = {
    "gpt2": "gptjax.models.gpt2",
    "llama": "gptjax.models.llama",
    "gpt-oss": "gptjax.models.gpt_oss",
}


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """One assistant turn.  ``text`` is the answer without any chat markup; for gpt-oss (harmony)
    ``reasoning`` holds the analysis channel, ``tool_calls`` the parsed calls and ``commentary``
    the commentary-channel messages meant for the user (preambles before tool calls)."""

    text: str
    reasoning: str = ""
    tool_calls: tuple = ()
    completion: Any = None          # gptjax.generate.Completion
    stats: Any = None               # gptjax.generate.GenerationStats
    commentary: str = ""


def _is_single_prompt(prompts) -> bool:
    """One prompt (a str or a list of token ids) rather than a batch of them."""
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))


def _arch_module(arch: str):
    try:
        return importlib.import_module(ARCHITECTURES[arch])
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}") from None


class Model:
    """A loaded model: parameters on the device, tokenizer, config and a compiled generator.

    Build it with :func:`load`.  Prompts are text (or lists of token ids); generation settings are
    a :class:`gptjax.sampling.Sampler` (default greedy) and a seed.
    """

    def __init__(self, params, config, tokenizer, *, dtype, path: str, load_timings: dict | None = None):
        from gptjax.generate import Generator

        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.path = path
        self.load_timings = dict(load_timings or {})
        mod = _arch_module(config.arch)
        self._forward = mod.forward
        from gptjax.models import layers

        self._unembed = getattr(mod, "unembed", layers.unembed)
        self._generator = Generator(self._forward, params, config, tokenizer=tokenizer,
                                    cache_dtype=dtype, unembed_fn=self._unembed)
        self._logits_fn = None

    def __repr__(self) -> str:
        return f"Model({self.config.arch}, {self.path!r}, dtype={np.dtype(self.dtype).name})"

    # ------------------------------------------------------------------------------ prompts

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.  ``add_bos`` defaults to the file's rule (tokenizer.add_bos);
        special-token text such as ``<|im_start|>`` becomes its id (llama.cpp's CLI does the same)."""
        tok = self._need_tokenizer()
        ids = tok.encode(text, add_special=False, parse_special=parse_special)
        if add_bos is None:
            add_bos = tok.add_bos
        if add_bos:
            if tok.bos_id is None:
                raise GenerationError(f"{self.path}: add_bos requested but the vocabulary has no BOS token")
            ids = [tok.bos_id] + ids
        return ids

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise GenerationError(f"{self.path} has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    def _prompt_ids(self, prompt, add_bos) -> list[int]:
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_bos=add_bos)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError("empty prompt: give at least one token (or set add_bos=True)")
        return ids

    # ---------------------------------------------------------------------------- generation

    def complete(self, prompts, *, max_new_tokens: int = 128, sampler=None, seed: int | None = None,
                 stop: Sequence[str] | str = (), add_bos: bool | None = None, eos_ids=None):
        """Generate for one prompt or a batch; returns the full
        :class:`gptjax.generate.GenerationResult` (ids, text, stop reasons, timings)."""
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise GenerationError("no prompts given")
        ids = [self._prompt_ids(p, add_bos) for p in batch]
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self._generator.generate(ids, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                        stop_strings=stop, eos_ids=eos_ids)

    def generate(self, prompts, *, max_new_tokens: int = 128, sampler=None, seed: int | None = None,
                 stop: Sequence[str] | str = (), add_bos: bool | None = None):
        """Text continuation(s): a str for one prompt, a list of str for a list of prompts."""
        res = self.complete(prompts, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                            stop=stop, add_bos=add_bos)
        texts = [c.text if c.text is not None else c.token_ids for c in res.completions]
        single = _is_single_prompt(prompts)
        return texts[0] if single else texts

    def stream(self, prompt, *, max_new_tokens: int = 128, sampler=None, seed: int | None = None,
               stop: Sequence[str] | str = (), add_bos: bool | None = None, eos_ids=None):
        """Iterate over text pieces of one completion as tokens arrive (whole UTF-8 characters).
        The returned iterator's ``result`` holds the GenerationResult once exhausted."""
        self._need_tokenizer()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self._generator.stream(self._prompt_ids(prompt, add_bos), max_new_tokens=max_new_tokens,
                                      sampler=sampler, seed=seed, stop_strings=stop, eos_ids=eos_ids)

    # ----------------------------------------------------------------------------------- chat

    def chat_prompt(self, messages: list[dict], *, reasoning: str = "medium", tools=None,
                    template: str | None = None, add_generation_prompt: bool = True,
                    now=None) -> str:
        """The prompt text for ``messages`` from the file's chat template (jinja2, rendered as
        HF's ``apply_chat_template``); gpt-oss uses harmony (``reasoning`` = low|medium|high).
        ``now`` (a ``datetime.datetime``) pins what the template's ``strftime_now`` reports, e.g.
        gpt-oss's "Current date:" line; default: the local clock."""
        from gptjax import chat

        tok = self._need_tokenizer()
        tpl = chat.select_chat_template(template or tok.chat_template, arch=self.config.arch, source=self.path)
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
        if self.config.arch == "gpt-oss":
            return chat.render_harmony(messages, template=tpl, reasoning_effort=reasoning, tools=tools,
                                       add_generation_prompt=add_generation_prompt, now=now,
                                       bos_token=bos, eos_token=eos)
        return chat.render_chat(tpl, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=bos, eos_token=eos, tools=tools, now=now)

    def chat(self, messages: list[dict], *, max_new_tokens: int = 512, sampler=None, seed: int | None = None,
             reasoning: str = "medium", tools=None, template: str | None = None, stream: bool = False):
        """One assistant turn for ``messages`` ([{"role": "user", "content": "..."}, ...]).

        Returns a :class:`ChatReply`; with ``stream=True`` an iterator of text pieces of the answer
        (for gpt-oss only the final channel is streamed; reasoning is parsed out) whose
        ``reply`` attribute holds the ChatReply once exhausted.
        """
        from gptjax import chat

        tok = self._need_tokenizer()
        prompt = self.chat_prompt(messages, reasoning=reasoning, tools=tools, template=template)
        # The template writes BOS itself where the model wants one (as apply_chat_template does).
        ids = tok.encode(prompt, add_special=False, parse_special=True)
        harmony = self.config.arch == "gpt-oss"
        eos_ids = None
        if harmony:
            # The turn ends at <|return|> or <|call|> (harmony), and at the file's other
            # end-of-generation tokens (<|endoftext|>: llama.cpp's EOG set, HF generation_config's
            # eos list), but never at <|end|>, which only closes the analysis message.
            stops = set(chat.harmony_stop_ids(tok.token_to_id)) | set(tok.eog_ids)
            if tok.eos_id is not None:
                stops.add(tok.eos_id)
            stops.discard(tok.token_to_id("<|end|>"))
            eos_ids = tuple(sorted(stops))
        it = self._generator.stream(ids, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                                    eos_ids=eos_ids)
        return _ChatStream(it, tok, harmony) if stream else _ChatStream(it, tok, harmony).collect()

    # ------------------------------------------------------------------------------ scoring

    def logits(self, token_ids) -> np.ndarray:
        """Float32 logits of a full forward pass: [T, V] for one sequence of ids, [B, T, V] for a
        batch of equal-length sequences (position t predicts token t+1)."""
        import jax
        import jax.numpy as jnp

        from gptjax.cache import init_cache

        arr = np.asarray(token_ids)
        single = arr.ndim == 1
        arr = arr[None] if single else arr
        if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise GenerationError(f"token_ids must be a non-empty [T] or [B, T] integer array, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise GenerationError(f"token ids must lie in [0, {self.config.vocab_size})")
        B, T = arr.shape
        if T > self.config.context_length:
            raise GenerationError(f"{T} tokens exceed the context length {self.config.context_length}")
        if self._logits_fn is None:
            cfg, dtype, fwd = self.config, self.dtype, self._forward

            def run(params, tokens):
                cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], dtype)
                logits, _ = fwd(params, tokens, jnp.zeros((tokens.shape[0],), jnp.int32), cache, cfg)
                return logits

            self._logits_fn = jax.jit(run)
        out = np.asarray(self._logits_fn(self.params, jnp.asarray(arr, jnp.int32)))
        return out[0] if single else out

    def perplexity(self, text_or_ids, *, ctx: int = 512, progress: Callable | None = None) -> float:
        """Perplexity with llama.cpp's convention (gptjax.perplexity): chunks of ``ctx`` tokens,
        second half of each scored.  ``progress(done, total, running_ppl)`` is called after each chunk."""
        from gptjax.perplexity import perplexity

        if isinstance(text_or_ids, str):
            ids = self._need_tokenizer().encode(text_or_ids, add_special=False, parse_special=False)
        else:
            ids = [int(t) for t in text_or_ids]
        bos = self.tokenizer.bos_id if (self.tokenizer is not None and self.tokenizer.add_bos) else None
        ppl, _ = perplexity(self._forward, self.params, self.config, ids, ctx=ctx, progress=progress,
                            unembed_fn=self._unembed, cache_dtype=self.dtype, bos_id=bos)
        return ppl


class _ChatStream:
    """Streams the answer of a chat turn; for harmony, routes channels through the stream parser."""

    def __init__(self, text_stream, tokenizer, harmony: bool):
        self._it = text_stream
        self._harmony = harmony
        self.reply: ChatReply | None = None
        if harmony:
            from gptjax.chat import HarmonyStreamParser

            self._parser = HarmonyStreamParser()

    def __iter__(self) -> Iterator[str]:
        for piece in self._it:
            if not self._harmony:
                yield piece
                continue
            for ev in self._parser.push(piece):
                if ev.channel in (None, "final") and not ev.recipient:
                    yield ev.text
        res = self._it.result
        comp = res.completions[0]
        if self._harmony:
            for ev in self._parser.finish():
                if ev.channel in (None, "final") and not ev.recipient:
                    yield ev.text
            # The stop token (<|return|>, <|call|>) is not part of the text, so the last message
            # counts as open (HarmonyResult.complete False); its content is whole all the same.
            parsed = self._parser.result()
            self.reply = ChatReply(parsed.final, parsed.reasoning, tuple(parsed.tool_calls), comp, res.stats,
                                   commentary=parsed.commentary)
        else:
            self.reply = ChatReply(comp.text or "", completion=comp, stats=res.stats)

    def collect(self) -> ChatReply:
        for _ in self:
            pass
        return self.reply


# ---------------------------------------------------------------------------------------- load

def load(path: str | os.PathLike, *, dtype=None, dequantize_at_load: bool | None = None,
         progress: Callable[[str], None] | None = None) -> Model:
    """Load a model from a GGUF file or a Hugging Face directory (config.json, *.safetensors,
    tokenizer.json).

    dtype: compute dtype (default float32 on CPU, bfloat16 on GPU).  dequantize_at_load: decode
    quantized GGUF matrices once at load (default on CPU) instead of inside every matmul (default
    on GPU).  progress: called with a short line per loading stage.
    """
    import jax.numpy as jnp

    from gptjax.config import ModelConfig
    from gptjax.weights import default_dtype

    say = progress or (lambda msg: None)
    p = Path(os.fspath(path))
    dtype = jnp.dtype(default_dtype() if dtype is None else dtype)
    timings = {}
    t0 = time.perf_counter()
    if p.is_dir():
        from gptjax.tokenizer import Tokenizer
        from gptjax.weights import load_params_hf

        cfg_path = p / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{cfg_path}: cannot read the model config: {e}") from e
        config = ModelConfig.from_hf(raw, source=str(cfg_path))
        tok_path = p / "tokenizer.json"
        tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
        timings["metadata_s"] = time.perf_counter() - t0
        say(f"{config.arch}: {config.n_layers} layers, d_model {config.d_model}; loading weights ...")
        t1 = time.perf_counter()
        params = load_params_hf(p, config, dtype)
    else:
        from gptjax.formats.gguf import read_gguf
        from gptjax.tokenizer import Tokenizer
        from gptjax.weights import load_params_gguf

        gf = read_gguf(p)
        config = ModelConfig.from_gguf(gf)
        tokenizer = Tokenizer.from_gguf(gf) if "tokenizer.ggml.model" in gf.metadata else None
        timings["metadata_s"] = time.perf_counter() - t0
        say(f"{config.arch}: {config.n_layers} layers, d_model {config.d_model}, "
            f"{len(gf.tensors)} tensors; loading weights ...")
        t1 = time.perf_counter()
        params = load_params_gguf(gf, config, dtype, dequantize_at_load=dequantize_at_load)
    import jax

    jax.block_until_ready(params)
    timings["weights_s"] = time.perf_counter() - t1
    say(f"weights ready in {timings['weights_s']:.1f} s")
    return Model(params, config, tokenizer, dtype=dtype, path=str(p), load_timings=timings)
