"""Text generation: one prefill call, then compiled decode loops that emit many tokens per call.

Architecture-agnostic: :class:`Generator` takes the model's pure ``forward`` function (the
contract of docs/INTERFACES.md, "Models") and a cache constructor, so GPT-2, llama and gpt-oss
all share this loop.

Flow of one request (a batch of right-padded prompts)::

    validate (prompt lengths vs context, sampler, stop strings)        -> GenerationError
    prefill  (one jit call): cache = init_cache(B, S); logits = forward(prompts, start=0)
             take each row's logits at its last real token, sample token #0
    decode   (jit, cache and loop state donated), each step:
                 logits = forward(last token of each row, start = its position)
                 sample, append, update penalties' counts and stop flags
             as  one ``lax.while_loop`` that exits when every row is done (the default when an
                 EOS can end rows and the host need not look midway), or
                 fixed-length chunks (``chunk_size``; 16 when streaming, with stop strings or
                 no EOS set) queued two deep, then the remainder as one such while_loop
             (the first fixed-length chunk is queued behind prefill before its result is read)
    host     between calls: decode text incrementally, look for stop strings, stream text

Why two loop forms: on GPU a data-dependent loop exit makes XLA copy the predicate to the host
every iteration, so that call is synchronous and each step pays a small round-trip; a static trip
count runs asynchronously, and the host reads chunk k while chunk k+1 runs.  Measured with
GPT-2 124M shapes (bf16, batch 1, H100, jax 0.11.2): 0.47 ms/step in one while_loop, 0.43 in one
fixed-count loop, 0.55 in while_loops of 16 steps, 0.43 in queued fixed chunks of 16.

Static shapes, so that new requests rarely recompile:

* prompts are right-padded to a bucket (:func:`prompt_bucket`: a power of two, at least 16, up to
  1024, then a multiple of 512), the batch to a power of two (extra rows are inert);
* the cache length ``S`` (:func:`cache_bucket`) is ``T_pad + max_new_tokens`` rounded up to a
  multiple of 128 and capped by ``config.context_length``; ``max_new_tokens``, the while_loop's
  step bound, the sampler's float parameters and the EOS ids are traced arguments, not constants
  (a fixed chunk length is static: one compilation per ``chunk_size`` used).

Per-row loop state (:class:`LoopState`): the token sequence ``seq [B, S]`` (prompt then generated
tokens, at their positions), ``length`` (tokens in ``seq``; the next token goes to position
``length``), ``n_new`` (tokens generated), ``done``, ``reason``, the row's PRNG key and, with
penalties, the history counts ``[B, V]``.  Finished rows keep running (their step rewrites the
K/V of their last token in place, which changes nothing) and their outputs are ignored.

Stop conditions, in priority order when several hit at the same token:

* ``"eos"``: the token is in the EOS/EOT set (``tokenizer.eog_ids`` by default).  The stop token
  is not part of ``token_ids`` nor of ``text``; it is reported as ``Completion.stop_token``.
* ``"stop_string"``: checked on the host, token by token, on the incrementally decoded text of
  the chunk just computed; ``text`` ends right before the stop string, ``token_ids`` end with the
  token that completed it (tokens computed after it in the same chunk are dropped).
* ``"max_tokens"``: ``max_new_tokens`` tokens generated.
* ``"context_full"``: the sequence (prompt + generated) reached ``config.context_length`` tokens,
  before ``max_new_tokens``.  Never silent.

Sampling is reproducible: row ``b``'s ``i``-th token uses the key
``fold_in(fold_in(key(seed), b), i)``, independent of how the loop is cut into chunks.

Padding and the KV cache: prefill passes each row's prompt length to ``forward(...,
lengths=...)`` (when the model's forward takes it), so that padding tokens are not written to
the cache; sliding-window layers keep ring buffers (gptjax.cache), where a padding token could
otherwise evict a real key the row still needs.

Memory (contexts up to ``config.context_length``, bounded by the device): before anything runs,
the request's need is compared with the free memory of the first device (``bytes_limit -
bytes_in_use`` of ``memory_stats()``; the check is skipped where the backend reports nothing,
e.g. CPU). The need counted is what the request allocates for sure: the KV cache for (batch
bucket, S) in the cache dtype (``jax.eval_shape`` of the cache constructor, which equals
``ModelConfig.kv_cache_bytes`` for gptjax's caches), the parameter leaves not yet on the device,
and the prefill logits (float32 [B, V], or [B, T_pad, V] without ``unembed_fn``). Parameters
already on the device are inside ``bytes_in_use``. Too little raises GenerationError naming both
numbers. Activations and XLA scratch come on top, so passing the check is necessary, not
sufficient.
"""
from __future__ import annotations

import inspect
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import GenerationError
from gptjax.sampling import (
    Greedy,
    Sampler,
    SamplerPlan,
    init_counts,
    row_keys,
    sample_tokens,
    split,
    step_keys,
    update_counts,
)

__all__ = [
    "Completion",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "LoopState",
    "TextStream",
    "STOP_REASONS",
    "prompt_bucket",
    "cache_bucket",
    "batch_bucket",
]

STOP_REASONS = ("eos", "stop_string", "max_tokens", "context_full")

# Device-side reason codes (LoopState.reason).
_RUNNING, _EOS, _MAX, _CONTEXT, _PADDING = 0, 1, 2, 3, 4
_DEVICE_REASON = {_EOS: "eos", _MAX: "max_tokens", _CONTEXT: "context_full"}

_MIN_PROMPT_BUCKET = 16
_POW2_PROMPT_LIMIT = 1024
_LONG_PROMPT_STEP = 512
_CACHE_STEP = 128
_EOS_PAD = 8                 # the EOS-id array is padded to a multiple of this (fewer shapes)
DEFAULT_STREAM_CHUNK = 16    # decode steps per host round-trip when streaming
# ... otherwise, when the loop runs in fixed-length chunks.  16, not 32: the remainder of a
# request (needed steps mod chunk) runs as a while_loop, whose steps cost more (H100,
# gpt-oss-20b, benchmarks/loop_forms.py: 64 tokens after a 4096-token prompt 541 -> 549.5 tok/s;
# batch 1, 128 tokens unchanged), and stop strings are found sooner.
DEFAULT_CHUNK = 16
# Whether the first fixed-length decode chunk is queued behind prefill before prefill's result
# is read (see Generator._execute; a switch for benchmarks/first_token.py).
EARLY_FIRST_CHUNK = True


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def prompt_bucket(n: int, context_length: int) -> int:
    """Padded prefill length for a longest prompt of ``n`` tokens: the next power of two (at
    least 16) up to 1024, beyond that the next multiple of 512; never above the context."""
    if n <= _POW2_PROMPT_LIMIT:
        b = max(_MIN_PROMPT_BUCKET, 1 << max(0, n - 1).bit_length())
    else:
        b = _round_up(n, _LONG_PROMPT_STEP)
    return min(b, context_length)


def cache_bucket(t_pad: int, max_new_tokens: int, context_length: int) -> int:
    """Cache length S: room for the padded prompt and every new token, rounded up to a
    multiple of 128, at most the context length."""
    return min(context_length, _round_up(t_pad + max_new_tokens, _CACHE_STEP))


def batch_bucket(b: int) -> int:
    """Padded batch size: the next power of two."""
    return 1 << max(0, b - 1).bit_length()


def device_memory_available() -> int | None:
    """Free bytes of the first JAX device (``bytes_limit - bytes_in_use`` of its
    ``memory_stats()``), or None when the backend does not report them (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"


class LoopState(NamedTuple):
    """Per-row state carried by the decode loop (a pytree; donated between chunks)."""

    seq: jax.Array          # int32 [B, S] prompt then generated tokens, at their positions
    length: jax.Array       # int32 [B] tokens in seq; the next one goes to position `length`
    n_new: jax.Array        # int32 [B] tokens generated (the EOS token included)
    done: jax.Array         # bool [B]
    reason: jax.Array       # int32 [B] _RUNNING / _EOS / _MAX / _CONTEXT / _PADDING
    keys: jax.Array         # PRNG keys [B], one stream per row
    counts: jax.Array | None  # int32 [B, V] penalty history, None without penalties


@dataclass(frozen=True)
class Completion:
    """The result for one prompt."""

    token_ids: tuple[int, ...]      # generated ids, without the EOS/EOT stop token
    text: str | None                # decoded text (None without a tokenizer), stop string cut
    stop_reason: str                # one of STOP_REASONS
    stop_token: int | None = None   # the EOS/EOT id that ended the row ("eos" only)
    stop_string: str | None = None  # the stop string found ("stop_string" only)


@dataclass(frozen=True)
class GenerationStats:
    """Timings of one call.  Times include compilation when ``compiled`` is true."""

    batch: int                  # prompts in the request
    prompt_tokens: int          # real prompt tokens over all rows
    prefill_length: int         # padded prompt length T_pad
    cache_length: int           # cache slots S
    generated_tokens: int       # tokens produced by the device for the returned rows
    decode_steps: int           # decode-loop iterations (each advances every row)
    decode_calls: int           # host round-trips of the decode loop
    prefill_s: float            # prefill call, first token included, until its result is on host
    decode_s: float             # decode calls until their results are on host (host work excluded)
    compiled: bool              # whether this call traced (and compiled) prefill or decode
    seed: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (all but each row's first) per second."""
        n = self.generated_tokens - self.batch
        return n / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass(frozen=True)
class GenerationResult:
    completions: tuple[Completion, ...]
    stats: GenerationStats


class TextStream:
    """Iterator over text pieces of one streamed completion; ``result`` is set once exhausted."""

    def __init__(self, events: Iterator[list[tuple[int, str]]], holder: dict):
        self._events = events
        self._holder = holder

    def __iter__(self):
        for event in self._events:
            for _, piece in event:
                if piece:
                    yield piece

    @property
    def result(self) -> GenerationResult | None:
        return self._holder.get("result")


class _Row:
    """Host-side bookkeeping of one prompt: kept ids, decoded text, stop detection."""

    def __init__(self, length: int, tokenizer, stop_strings: tuple[str, ...]):
        self.length = length
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stops = stop_strings
        self.max_stop = max((len(s) for s in stop_strings), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.seen = 0              # device tokens already processed
        self.finished = False
        self.reason: str | None = None
        self.stop_token: int | None = None
        self.stop_string: str | None = None

    def _push_text(self, piece: str) -> bool:
        """Append decoded text; True if that completed a stop string (text is then cut)."""
        old_len = len(self.text)
        self.text += piece
        if not self.stops or not piece:
            return False
        start = max(0, old_len - self.max_stop + 1)   # a new hit must end inside `piece`
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text, self.stop_string = self.text[:i], s
        self.finished, self.reason = True, "stop_string"
        return True

    def _finish(self, reason: str):
        if self.decoder is not None and self._push_text(self.decoder.flush()):
            return                   # flushed bytes completed a stop string: that reason wins
        self.finished, self.reason = True, reason

    def consume(self, seq_row: np.ndarray, n_new: int, done: bool, reason: int) -> None:
        """Process the device tokens not seen yet (``seq_row[length + seen : length + n_new]``)."""
        if self.finished:
            return
        for i in range(self.seen, n_new):
            tok = int(seq_row[self.length + i])
            if done and reason == _EOS and i == n_new - 1:
                self.stop_token = tok
                self._finish("eos")
                return
            self.ids.append(tok)
            if self.decoder is not None and self._push_text(self.decoder.push(tok)):
                return
        self.seen = n_new
        if done:
            self._finish(_DEVICE_REASON[reason])

    def new_text(self) -> str:
        """Text that can be shown now: all of it once finished, else all but the longest tail
        that could still grow into a stop string."""
        n = len(self.text)
        end = n
        if not self.finished:
            for s in self.stops:
                for k in range(min(len(s) - 1, n), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, n - k)
                        break
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def completion(self) -> Completion:
        return Completion(
            token_ids=tuple(self.ids),
            text=self.text if self.decoder is not None else None,
            stop_reason=self.reason,
            stop_token=self.stop_token,
            stop_string=self.stop_string,
        )


class Generator:
    """Generation for one model: ``forward`` + ``params`` + ``config``, compiled on demand.

    forward_fn: ``forward(params, tokens, start, cache, config) -> (logits, cache)``
        (docs/INTERFACES.md, "Models"); called inside jit, ``config`` static.
    params: the parameter pytree (passed to jit as an argument, never closed over).
    config: frozen model config with at least ``vocab_size`` and ``context_length``.
    tokenizer: optional; gives text, stop strings, streaming and the default EOS set
        (``eog_ids``, else ``eos_id``).
    eos_ids: EOS/EOT ids that end a row (overrides the tokenizer's set; empty: none).
    init_cache_fn: ``init_cache(config, batch, max_len, dtype)``; default gptjax.cache.init_cache.
    cache_dtype: the cache (= compute) dtype, float32 by default.
    unembed_fn: optional ``unembed(params, hidden [B, T, D]) -> logits [B, T, V]``.  When given,
        prefill calls ``forward(..., return_hidden=True)`` and unembeds only each row's last
        real position, instead of materialising float32 [B, T_pad, V] logits (gpt-oss:
        T_pad 4096 x V 201088 x 4 bytes = 3.3 GB per row).
    memory_probe: ``() -> int | None``, the device's free bytes (None: unknown, no check);
        default :func:`device_memory_available` (module docstring, "Memory").

    ``trace_counts`` counts how often prefill and decode were traced (each trace compiles).
    """

    def __init__(
        self,
        forward_fn: Callable,
        params,
        config,
        *,
        tokenizer=None,
        eos_ids: Sequence[int] | None = None,
        init_cache_fn: Callable | None = None,
        cache_dtype=jnp.float32,
        unembed_fn: Callable | None = None,
        decode_unroll: int | None = None,
        memory_probe: Callable[[], int | None] = device_memory_available,
    ):
        if init_cache_fn is None:
            from gptjax.cache import init_cache as init_cache_fn
        self.forward_fn = forward_fn
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.init_cache_fn = init_cache_fn
        self.cache_dtype = cache_dtype
        self.unembed_fn = unembed_fn
        self.memory_probe = memory_probe
        self._cache_bytes: dict[tuple[int, int], int] = {}
        # Models of docs/INTERFACES.md take ``lengths`` (padding not written to the cache);
        # a forward without it still works for caches without rings.
        try:
            sig = inspect.signature(forward_fn).parameters
        except (TypeError, ValueError):          # a callable without a readable signature
            sig = {}
        self._pass_lengths = "lengths" in sig or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
        # Decode steps per iteration of a fixed-length chunk's loop (lax.fori_loop ``unroll``):
        # fewer loop iterations, fewer per-iteration overheads, a longer compile.
        if decode_unroll is None:
            decode_unroll = int(os.environ.get("GPTJAX_DECODE_UNROLL", "1"))
        if isinstance(decode_unroll, bool) or not isinstance(decode_unroll, int) or decode_unroll < 1:
            raise GenerationError(f"decode_unroll must be an integer >= 1, got {decode_unroll!r}")
        self.decode_unroll = decode_unroll
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(config.context_length)
        if eos_ids is None and tokenizer is not None:
            eos_ids = getattr(tokenizer, "eog_ids", None) or (
                [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
            )
        self.eos_ids = self._check_eos(eos_ids or ())
        self.trace_counts = {"prefill": 0, "decode": 0}
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("plan", "max_len"))
        # Cache (1) and loop state (2) are donated: updated in place, never copied per chunk.
        self._decode = jax.jit(self._decode_impl, static_argnames=("plan", "chunk"), donate_argnums=(1, 2))

    # ----------------------------------------------------------------------------- validation

    def _check_eos(self, eos_ids) -> tuple[int, ...]:
        out = []
        for t in eos_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise GenerationError(f"eos_ids: {t!r} is not a token id in [0, {self.vocab_size})")
            out.append(int(t))
        return tuple(sorted(set(out)))

    def _check_prompts(self, prompts) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        if isinstance(prompts[0], (int, np.integer)):
            raise GenerationError("prompts must be a list of token-id lists; wrap one prompt in a list")
        out = []
        for i, p in enumerate(prompts):
            a = np.asarray(p)
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
                raise GenerationError(f"prompt {i}: expected a non-empty 1-D list of token ids, got {p!r:.80}")
            if a.min() < 0 or a.max() >= self.vocab_size:
                bad = int(a[(a < 0) | (a >= self.vocab_size)][0])
                raise GenerationError(f"prompt {i}: token id {bad} is outside [0, {self.vocab_size})")
            if a.size >= self.context_length:
                raise GenerationError(
                    f"prompt {i} has {a.size} tokens; the context holds {self.context_length}, "
                    f"so at most {self.context_length - 1} leave room for one new token"
                )
            out.append(a.astype(np.int32))
        return out

    def _check_memory(self, b: int, t_pad: int, cache_len: int) -> None:
        """GenerationError when the device's free memory cannot hold what a request of batch
        bucket ``b``, padded prompt ``t_pad`` and cache length ``cache_len`` allocates for sure
        (module docstring, "Memory"); nothing when the probe reports None."""
        avail = self.memory_probe()
        if avail is None:
            return
        key = (b, cache_len)
        if key not in self._cache_bytes:
            from gptjax.cache import cache_nbytes

            self._cache_bytes[key] = cache_nbytes(self.init_cache_fn, self.config, b, cache_len,
                                                  self.cache_dtype)
        kv = self._cache_bytes[key]
        host_params = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(self.params)
                          if not isinstance(a, jax.Array))
        logits = 4 * b * self.vocab_size * (1 if self.unembed_fn is not None else t_pad)
        need = kv + host_params + logits
        if need > avail:
            raise GenerationError(
                f"not enough device memory: this request needs at least {_gib(need)} "
                f"(KV cache {_gib(kv)} for {b} row(s) x {cache_len} positions in "
                f"{jnp.dtype(self.cache_dtype).name}, prefill logits {_gib(logits)}"
                + (f", parameters still on the host {_gib(host_params)}" if host_params else "")
                + f") but {jax.devices()[0].device_kind} has {_gib(max(avail, 0))} free; use a "
                f"shorter prompt or max_new_tokens, fewer prompts at once, or a smaller cache dtype")

    # ------------------------------------------------------------------------- traced pieces

    def _advance(self, st: LoopState, logits, sp, eos, max_new, plan: SamplerPlan) -> LoopState:
        """Sample one token per row from ``logits [B, V]`` and append it (active rows only)."""
        b, s = st.seq.shape
        rows = jnp.arange(b)
        nxt = sample_tokens(logits, step_keys(st.keys, st.n_new), plan, sp, st.counts)  # [B]
        active = ~st.done
        pos = st.length                                                  # new token's position
        seq = st.seq.at[rows, jnp.where(active, pos, s)].set(nxt, mode="drop")
        counts = st.counts
        if plan.penalties:
            counts = update_counts(counts, seq, nxt, pos, active, plan.penalty_last_n)
        n_new = st.n_new + active
        length = st.length + active
        is_eos = jnp.any(nxt[:, None] == eos[None, :], axis=-1)
        hit_max = n_new >= max_new
        hit_ctx = length >= self.context_length
        reason = jnp.where(
            active,
            jnp.where(is_eos, _EOS, jnp.where(hit_max, _MAX, jnp.where(hit_ctx, _CONTEXT, _RUNNING))),
            st.reason,
        ).astype(jnp.int32)
        done = st.done | (active & (is_eos | hit_max | hit_ctx))
        return LoopState(seq, length, n_new, done, reason, st.keys, counts)

    @staticmethod
    def _summary(st: LoopState, steps):
        """What the host reads after each call, packed into one int32 [B, S + 4] array so that it
        crosses to the host in a single transfer (each transfer costs a synchronisation):
        seq | n_new | done | reason | steps run."""
        steps = jnp.broadcast_to(steps, st.n_new.shape)
        extra = jnp.stack([st.n_new, st.done.astype(jnp.int32), st.reason, steps], axis=1)  # [B, 4]
        return jnp.concatenate([st.seq, extra], axis=1)

    def _prefill_impl(self, params, tokens, lengths, live, key, sp, eos, max_new, *, plan, max_len):
        """tokens: int32 [B, T] right-padded; lengths: int32 [B]; live: bool [B] (False for the
        batch-padding rows).  Returns (LoopState with token #0 sampled, cache, summary)."""
        self.trace_counts["prefill"] += 1
        b, t = tokens.shape
        cache = self.init_cache_fn(self.config, b, max_len, self.cache_dtype)
        start = jnp.zeros((b,), jnp.int32)
        at_last = (lengths - 1)[:, None, None]                          # each row's last real token
        kw = {"lengths": lengths} if self._pass_lengths else {}         # padding not cached
        with jax.named_scope("prefill"):
            if self.unembed_fn is None:
                logits, cache = self.forward_fn(params, tokens, start, cache, self.config, **kw)
                last = jnp.take_along_axis(logits, at_last, axis=1)[:, 0]                  # [B, V]
            else:
                hidden, cache = self.forward_fn(params, tokens, start, cache, self.config,
                                                return_hidden=True, **kw)
                last = self.unembed_fn(params, jnp.take_along_axis(hidden, at_last, axis=1))[:, 0]
        counts = init_counts(tokens, lengths, last.shape[-1], plan.penalty_last_n) if plan.penalties else None
        st = LoopState(
            seq=jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(tokens),
            length=lengths,
            n_new=jnp.zeros((b,), jnp.int32),
            done=~live,
            reason=jnp.where(live, _RUNNING, _PADDING).astype(jnp.int32),
            keys=row_keys(key, b),
            counts=counts,
        )
        st = self._advance(st, last, sp, eos, max_new, plan)
        return st, cache, self._summary(st, jnp.int32(0))

    def _decode_impl(self, params, cache, st, sp, eos, max_new, n_steps, *, plan, chunk):
        """Decode steps in one compiled loop.  Returns (state, cache, summary).

        chunk None: a ``while_loop`` of up to ``n_steps`` (traced) steps that exits as soon as
        every row is done.  chunk int: exactly ``chunk`` steps (static trip count), finished rows
        idling; asynchronous on GPU (module docstring).
        """
        self.trace_counts["decode"] += 1

        def step(st, cache):
            last_pos = st.length - 1                                     # [B]
            tok = jnp.take_along_axis(st.seq, last_pos[:, None], axis=1)  # [B, 1]
            with jax.named_scope("decode_step"):
                logits, cache = self.forward_fn(params, tok, last_pos, cache, self.config)
            return self._advance(st, logits[:, -1], sp, eos, max_new, plan), cache

        if chunk is None:
            def cond(carry):
                i, st, _ = carry
                return (i < n_steps) & ~jnp.all(st.done)

            def body(carry):
                i, st, cache = carry
                return (i + 1, *step(st, cache))

            steps, st, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), st, cache))
        else:
            st, cache = jax.lax.fori_loop(0, chunk, lambda _, c: step(*c), (st, cache),
                                          unroll=min(self.decode_unroll, chunk))
            steps = jnp.int32(chunk)
        return st, cache, self._summary(st, steps)

    # --------------------------------------------------------------------------- host driver

    def _prepare(self, prompts, max_new_tokens, sampler, seed, stop_strings, eos_ids, chunk_size, streaming):
        """Validate a request and build its padded arrays (nothing runs on the device)."""
        rows_np = self._check_prompts(prompts)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        plan, sp = split(Greedy() if sampler is None else sampler)
        stop_strings = tuple(stop_strings or ())
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop_strings: expected non-empty strings, got {s!r}")
        if stop_strings and self.tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (the Generator has none)")
        eos = self.eos_ids if eos_ids is None else self._check_eos(eos_ids)
        if chunk_size is None:
            # One early-exiting while_loop when an EOS can end rows and nothing needs the host
            # midway; otherwise queued fixed-length chunks (see _decode_impl).
            chunk_size = DEFAULT_STREAM_CHUNK if streaming else DEFAULT_CHUNK if stop_strings or not eos else None
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise GenerationError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if seed is None:
            seed = secrets.randbits(31)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise GenerationError(f"seed must be an integer, got {seed!r}")

        n_real = len(rows_np)
        lengths = [len(r) for r in rows_np]
        t_pad = prompt_bucket(max(lengths), self.context_length)
        b = batch_bucket(n_real)
        tokens = np.zeros((b, t_pad), np.int32)
        for i, r in enumerate(rows_np):
            tokens[i, : len(r)] = r
        lens = np.ones((b,), np.int32)          # batch-padding rows: one token, done from the start
        lens[:n_real] = lengths
        cache_len = cache_bucket(t_pad, max_new_tokens, self.context_length)
        self._check_memory(b, t_pad, cache_len)
        eos_arr = np.full((_round_up(max(len(eos), 1), _EOS_PAD),), -1, np.int32)
        eos_arr[: len(eos)] = eos
        return _Request(
            tokens=tokens,
            lengths=lens,
            live=np.arange(b) < n_real,
            n_real=n_real,
            max_new=max_new_tokens,
            cache_len=cache_len,
            plan=plan,
            params=sp,
            eos=eos_arr,
            stop_strings=stop_strings,
            chunk_size=chunk_size,
            seed=int(seed),
            streaming=streaming,
        )

    def _execute(self, req: "_Request", holder: dict) -> Iterator[list[tuple[int, str]]]:
        """Run a prepared request; yields ``[(row, new text), ...]`` after prefill and after every
        decode call, and leaves the GenerationResult in ``holder["result"]``."""
        n_real, b = req.n_real, req.tokens.shape[0]
        lengths = [int(n) for n in req.lengths[:n_real]]
        streaming, stop_strings, plan, sp = req.streaming, req.stop_strings, req.plan, req.params
        key = jax.random.key(req.seed)
        # Small per-request inputs go to the device once, not once per decode call.
        max_new = jnp.asarray(req.max_new, jnp.int32)
        eos = jnp.asarray(req.eos)
        rows = [_Row(n, self.tokenizer, stop_strings) for n in lengths]
        traces0 = dict(self.trace_counts)

        def fetch(summary):
            a = np.asarray(summary)                  # one device-to-host transfer
            return a[:, :-4], a[:, -4], a[:, -3].astype(bool), a[:, -2], int(a[0, -1])

        def consume(host) -> list[tuple[int, str]]:
            seq, n_new, done, reason, _ = host
            out = []
            for i, row in enumerate(rows):
                row.consume(seq[i], int(n_new[i]), bool(done[i]), int(reason[i]))
                if streaming:
                    out.append((i, row.new_text()))
            return out

        # Decode steps any row can still need: up to max_new tokens or the end of the context.
        # They run as fixed-length chunks (asynchronous, see _decode_impl) and the remainder as
        # one early-exiting while_loop; without chunk_size, all of them in that while_loop.
        needed = max(min(req.max_new, self.context_length - n) for n in lengths) - 1
        chunk = req.chunk_size or needed + 1
        calls_planned = deque([chunk] * (needed // chunk) + ([needed % chunk] if needed % chunk else []))
        pushed_stops = np.zeros((b,), bool)
        queue: deque = deque()

        def enqueue():
            # Rows a stop string ended are marked done in the next call's state; whatever they
            # produce meanwhile is ignored.
            nonlocal st, cache
            stops = np.zeros((b,), bool)
            stops[:n_real] = [r.reason == "stop_string" for r in rows]
            if (stops & ~pushed_stops).any():
                st = st._replace(done=st.done | jnp.asarray(stops))
                pushed_stops[:] = stops
            n = calls_planned.popleft()
            fixed = n == req.chunk_size
            st, cache, summary = self._decode(
                self.params, cache, st, sp, eos, max_new, np.int32(n), plan=plan,
                chunk=n if fixed else None,
            )
            queue.append(summary)

        t0 = time.perf_counter()
        st, cache, summary = self._prefill(
            self.params, req.tokens, req.lengths, req.live, key, sp, eos, max_new,
            plan=plan, max_len=req.cache_len,
        )
        # The first fixed-length decode chunk is queued behind prefill before its result is
        # read, so its host dispatch overlaps the prefill and decode starts the moment prefill
        # ends (an H100 trace of gpt-oss-20b showed 1.6-1.8 ms between the last prefill kernel
        # and the first decode kernel: profile_decode.py --gaps).  A while_loop call is
        # synchronous, so it still waits for the prefill result -- and so would a fixed chunk
        # with a while loop inside its step: the first token would wait for the whole chunk
        # (tests/test_kernels_e2e.py keeps the step free of them).  Should the first token end
        # every row, that one chunk's work is wasted.
        if EARLY_FIRST_CHUNK and calls_planned and calls_planned[0] == req.chunk_size:
            enqueue()
        host = fetch(summary)
        prefill_s = time.perf_counter() - t0
        yield consume(host)

        decode_s, steps, calls = 0.0, 0, 0
        t0 = time.perf_counter()
        # One call queued behind the one the host is reading, so the device never waits on it.
        while calls_planned and len(queue) < 2 and not all(r.finished for r in rows):
            enqueue()
        while queue and not all(r.finished for r in rows):
            host = fetch(queue.popleft())           # waits for the oldest call only
            steps, calls = steps + host[4], calls + 1
            event = consume(host)
            if calls_planned and not all(r.finished for r in rows):
                enqueue()
            decode_s += time.perf_counter() - t0
            yield event                             # time the consumer spends is not counted
            t0 = time.perf_counter()

        # Every row ends by one of the four reasons once `needed` steps ran (internal invariant).
        assert all(r.finished for r in rows), [r.reason for r in rows]
        generated = int(host[1][:n_real].sum())
        stats = GenerationStats(
            batch=n_real,
            prompt_tokens=int(sum(lengths)),
            prefill_length=req.tokens.shape[1],
            cache_length=req.cache_len,
            generated_tokens=generated,
            decode_steps=steps,
            decode_calls=calls,
            prefill_s=prefill_s,
            decode_s=decode_s,
            compiled=self.trace_counts != traces0,
            seed=req.seed,
        )
        holder["result"] = GenerationResult(tuple(r.completion() for r in rows), stats)

    # ---------------------------------------------------------------------------- public API

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        chunk_size: int | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts (lists of token ids).

        sampler: default :class:`Greedy`.  seed: PRNG seed (random when None; reported in the
        stats).  eos_ids: override the generator's EOS set for this call.  chunk_size: decode
        steps per fixed-length chunk (one host round-trip each); by default one early-exiting
        while_loop when an EOS set exists and there are no stop strings, else chunks of 16
        (module docstring).  Raises GenerationError for bad input before anything runs.
        """
        req = self._prepare(prompts, max_new_tokens, sampler, seed, stop_strings, eos_ids, chunk_size, False)
        holder: dict = {}
        for _ in self._execute(req, holder):
            pass
        return holder["result"]

    def stream(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        chunk_size: int | None = None,
    ) -> TextStream:
        """Stream the completion of one prompt as text pieces (needs a tokenizer).

        Pieces arrive after prefill and after every ``chunk_size`` (default 16) decode steps;
        they are whole UTF-8 characters (the tokenizer's stream decoder holds partial bytes) and
        never show a stop string or its beginning.  Their concatenation equals the final
        ``text``.  The returned object's ``result`` holds the GenerationResult once iterated.
        Bad input raises GenerationError here; the work starts when iteration does.
        """
        if self.tokenizer is None:
            raise GenerationError("stream() needs a tokenizer (the Generator has none)")
        req = self._prepare([prompt], max_new_tokens, sampler, seed, stop_strings, eos_ids, chunk_size, True)
        holder: dict = {}
        return TextStream(self._execute(req, holder), holder)


class _Request(NamedTuple):
    """A validated request: padded host arrays and settings."""

    tokens: np.ndarray          # int32 [B, T_pad] right-padded prompts (B = batch bucket)
    lengths: np.ndarray         # int32 [B]
    live: np.ndarray            # bool [B] False for batch-padding rows
    n_real: int
    max_new: int
    cache_len: int              # S
    plan: SamplerPlan
    params: dict
    eos: np.ndarray             # int32 [E] padded with -1
    stop_strings: tuple[str, ...]
    chunk_size: int | None
    seed: int
    streaming: bool
