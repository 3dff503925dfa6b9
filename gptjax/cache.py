"""The KV cache: static-shape key/value buffers that ``forward`` reads and writes.

Two stacks (docs/INTERFACES.md, "Models"), both in the compute dtype:

* full-attention layers ``k, v: [Lf, B, K, S, H]``: slot j of row b holds the key/value of
  position j of that row (S = the cache length, at most the context length);
* sliding-window layers ``k_swa, v_swa: [Ls, B, K, W', H]``, a ring buffer of W' = min(W, S)
  slots (W = ``config.sliding_window``, 128 for gpt-oss): position p lives in slot p mod W'.

``sliding`` (static, one bool per model layer) says which stack holds each layer; the index
inside its stack is the number of earlier layers of the same kind (:meth:`KVCache.locate`).
A model without sliding layers (GPT-2, llama without a window) has ``sliding == ()``,
``k_swa = v_swa = None`` and exactly the single [L, B, K, S, H] stack of before; a model whose
every layer slides has an empty full stack ``[0, B, K, S, H]`` (no bytes, it only carries S).

Memory: gpt-oss-20b (24 layers, 12 sliding, K 8, H 64) at S = 131072 in bf16 keeps
12 * 2 * 131072 * 8 * 64 * 2 bytes = 3.0 GiB of full layers and 12 * 2 * 128 * 8 * 64 * 2 =
3 MiB of rings, about half of the 6.0 GiB of keeping S slots in every layer;
``ModelConfig.kv_cache_bytes`` counts the same bytes.

Why a ring is enough (window W, the query's own key included: a query at p sees (p - W, p]):

* decode (T = 1) at position p: once the new key is written to slot p mod W', the slots
  j < min(p + 1, W') hold exactly the positions max(0, p - W' + 1) .. p, all visible; softmax
  attention is invariant under a permutation of the keys, so decode is plain attention over
  the first min(p + 1, W') ring slots with no window and no positions
  (:func:`gptjax.models.layers.cache_attention`).
* a chunk (T > 1) at start s: its queries need keys of (s + t - W, s + t], some older than the
  chunk (still in the ring, which the chunk's own writes would evict) and some from the chunk.
  :func:`context_slots` lays out, per row, the n = min(s, W') ring entries s - n .. s - 1 in
  position order followed by the chunk's T keys, so that index i holds position s - n + i and
  ordinary causal-window attention with query positions n + t (indices) applies; the chunk's
  last keys are then written to the ring.

Both rest on one invariant: **before a call at start s, row b's ring holds positions
max(0, s - W') .. s - 1** (and nothing later). Calls that advance each row in order keep it,
including re-running the last position (a finished row of the generate loop rewrites its last
token's key in place). Right padding must not break it: a padding token at position q >= len_b
would land in slot q mod W' and evict a real key q - W' that decode still needs, so padding
tokens are not written at all: ``forward(..., lengths=...)`` gives each row's number of real
tokens, and :meth:`KVCache.write` drops the rest (in both stacks; in the full stack the padding
slots were never visible anyway). Without ``lengths`` every token is written, which is right
for unpadded calls and for padding shorter than the ring's wrap.

Slots never written hold zeros (never uninitialised memory): a masked or out-of-range slot
still enters the probabilities-times-values matmul with weight 0, and 0 * NaN would be NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gptjax.errors import GenerationError

__all__ = ["KVCache", "init_cache", "context_slots", "cache_nbytes"]


@struct.dataclass
class KVCache:
    """Keys and values of every layer. A frozen pytree: jit takes it as an argument, and the
    generate loop donates it so that the updates happen in place. ``sliding`` and ``window``
    are static (pytree aux data): a cache's layout is part of the compiled program."""

    k: jnp.ndarray                       # [Lf, B, K, S, H] full-attention layers
    v: jnp.ndarray                       # [Lf, B, K, S, H]
    k_swa: jnp.ndarray | None = None     # [Ls, B, K, W', H] sliding layers, ring (slot p % W')
    v_swa: jnp.ndarray | None = None     # [Ls, B, K, W', H]
    sliding: tuple[bool, ...] = struct.field(pytree_node=False, default=())  # per model layer
    window: int = struct.field(pytree_node=False, default=0)                 # W (0: none)

    @property
    def n_layers(self) -> int:
        return len(self.sliding) if self.sliding else self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """S: the positions the cache can hold (0 .. S-1)."""
        return self.k.shape[3]

    @property
    def ring_len(self) -> int:
        """W' = min(W, S), the slots of each sliding layer (0 without sliding layers)."""
        return 0 if self.k_swa is None else self.k_swa.shape[3]

    @property
    def dtype(self):
        return self.k.dtype

    def locate(self, layer: int) -> tuple[bool, int]:
        """(in the ring stack?, index in its stack) of model layer ``layer`` (static int)."""
        if not self.sliding:
            return False, layer
        kind = self.sliding[layer]
        return kind, sum(1 for s in self.sliding[:layer] if s == kind)

    def write(self, layer: int, k_new, v_new, positions, lengths=None) -> "KVCache":
        """Store the keys/values of T new tokens of every row at their positions.

        layer: static int (model layer); k_new, v_new: [B, T, K, H]; positions: int [B, T],
        consecutive per row (start + arange(T)); lengths: None (every token is real) or
        int [B], the number of real tokens of each row: tokens t >= lengths[b] are padding
        and are not written.

        Full layers: token t goes to slot positions[b, t]; positions >= S are dropped (only
        padding past the end can have them; the generate layer refuses real tokens beyond the
        cache). Ring layers: of the real tokens only the last min(T, W') are written (earlier
        ones would be overwritten by them), to slots position mod W' — distinct slots, so the
        scatter has no duplicate indices and its result is well defined.
        """
        in_ring, idx = self.locate(layer)
        B, T = positions.shape
        rows = jnp.arange(B)[:, None]                                   # [B, 1]
        n = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.clip(lengths, 0, T)
        if not in_ring and B == 1 and lengths is None:
            # One row of real tokens (batch-1 decode): a plain in-place dynamic-update-slice (one
            # kernel per array; XLA turns the dropping scatter below into three).  A real token
            # is never past the cache (the generate layer checks), so the start is in range.
            slot = positions[0, 0]
            return self.replace(k=_update_row(self.k, k_new, idx, slot),
                                v=_update_row(self.v, v_new, idx, slot))
        if not in_ring:
            S = self.max_len
            slots = jnp.where(jnp.arange(T)[None, :] < n[:, None], positions, S)   # [B, T]
            # Advanced indices (idx, rows, slots) are split by a slice, so numpy rules put
            # their broadcast shape [B, T] first: the indexed view is [B, T, K, H] like k_new.
            k = self.k.at[idx, rows, :, slots].set(k_new.astype(self.k.dtype), mode="drop")
            v = self.v.at[idx, rows, :, slots].set(v_new.astype(self.v.dtype), mode="drop")
            return self.replace(k=k, v=v)
        W = self.ring_len
        if B == 1 and T == 1 and lengths is None:
            # Batch-1 decode: the same dynamic-update-slice at slot p mod W' (the scatter below
            # costs XLA three kernels: a read of the old slot, a select, a write).
            slot = positions[0, 0] % W
            return self.replace(k_swa=_update_row(self.k_swa, k_new, idx, slot),
                                v_swa=_update_row(self.v_swa, v_new, idx, slot))
        m = min(T, W)
        t = n[:, None] - m + jnp.arange(m)[None, :]                     # [B, m] tokens to keep
        ok = t >= 0                                                     # (t < n always)
        tc = jnp.clip(t, 0, T - 1)[:, :, None, None]                    # [B, m, 1, 1]
        ks = jnp.take_along_axis(k_new, tc, axis=1)                     # [B, m, K, H]
        vs = jnp.take_along_axis(v_new, tc, axis=1)
        pos = jnp.take_along_axis(positions, tc[:, :, 0, 0], axis=1)    # [B, m]
        slots = jnp.where(ok, pos % W, W)                               # W: dropped
        k_swa = self.k_swa.at[idx, rows, :, slots].set(ks.astype(self.k_swa.dtype), mode="drop")
        v_swa = self.v_swa.at[idx, rows, :, slots].set(vs.astype(self.v_swa.dtype), mode="drop")
        return self.replace(k_swa=k_swa, v_swa=v_swa)

    def ring_context(self, layer: int, k_new, v_new, start):
        """Keys/values a chunk of T tokens at ``start`` attends to in sliding layer ``layer``,
        read from the ring *before* the chunk is written (module docstring).

        k_new, v_new: [B, T, K, H]; start: int [B]. Returns (k_ctx, v_ctx [B, K, W' + T, H],
        q_start int32 [B]): index i of row b holds position start_b - q_start_b + i for
        i < q_start_b + T (ring entries, then the chunk); later indices are filler that no
        query can see (they lie after the last query's index). Query t of the chunk is at
        index q_start_b + t, so a causal window mask by index equals the mask by position.
        """
        _, idx = self.locate(layer)
        T = k_new.shape[1]
        slots, q_start = context_slots(start, T, self.ring_len)         # [B, W'+T], [B]
        g = slots[:, None, :, None]                                     # [B, 1, W'+T, 1]

        def gather(ring, new):
            src = jnp.concatenate([ring[idx], new.astype(ring.dtype).transpose(0, 2, 1, 3)],
                                  axis=2)                               # [B, K, W'+T, H]
            return jnp.take_along_axis(src, g, axis=2)

        return gather(self.k_swa, k_new), gather(self.v_swa, v_new), q_start


def _update_row(stack, new, layer: int, slot):
    """Tokens new [1, T, K, H] of the single row into slots slot.. of layer ``layer`` of a
    [L, 1, K, S, H] stack: one in-place dynamic-update-slice."""
    at = (layer, 0, 0, jnp.asarray(slot).astype(jnp.int32), 0)
    return jax.lax.dynamic_update_slice(stack, new.astype(stack.dtype).transpose(0, 2, 1, 3)[None],
                                        at)


def context_slots(start, T: int, W: int):
    """Where :meth:`KVCache.ring_context` reads each index: int32 ([B, W + T], [B]).

    Sources are numbered as in ``concat(ring [W slots], chunk [T tokens])``. With
    n_b = min(start_b, W): index i < n_b reads ring slot (start_b - n_b + i) mod W (position
    start_b - n_b + i); index n_b <= i < n_b + T reads chunk token i - n_b (source W + i - n_b);
    later indices repeat the last chunk token (filler). Returns (sources, n).
    Example W = 4, T = 3: start 0 → [4 5 6 6 6 6 6], n 0; start 6 → [2 3 0 1 4 5 6], n 4.
    """
    start = jnp.asarray(start, jnp.int32)
    n = jnp.minimum(start, W)                                           # [B]
    i = jnp.arange(W + T, dtype=jnp.int32)[None, :]                     # [1, W+T]
    ring = (start[:, None] - n[:, None] + i) % W
    chunk = jnp.minimum(W + i - n[:, None], W + T - 1)
    return jnp.where(i < n[:, None], ring, chunk), n


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """A zero-filled cache for ``batch`` rows of ``max_len`` positions (S).

    Shapes from config.n_layers, n_kv_heads, head_dim, and, when ``config.sliding_window`` is
    set, ``sliding_window_pattern``: the sliding layers get rings of min(sliding_window, S)
    slots (module docstring). Zeros, never uninitialised memory (see there).
    """
    if int(batch) < 1 or int(max_len) < 1:
        raise GenerationError(f"KV cache needs batch >= 1 and max_len >= 1, got {batch=} "
                              f"{max_len=}")
    B, S = int(batch), int(max_len)
    K, H, L = config.n_kv_heads, config.head_dim, config.n_layers
    window = int(getattr(config, "sliding_window", 0) or 0)
    pattern = tuple(bool(s) for s in getattr(config, "sliding_window_pattern", ())) if window else ()
    n_ring = sum(pattern)
    if n_ring == 0:
        shape = (L, B, K, S, H)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    full, ring = (L - n_ring, B, K, S, H), (n_ring, B, K, min(window, S), H)
    return KVCache(k=jnp.zeros(full, dtype), v=jnp.zeros(full, dtype),
                   k_swa=jnp.zeros(ring, dtype), v_swa=jnp.zeros(ring, dtype),
                   sliding=pattern, window=window)


def cache_nbytes(init_cache_fn, config, batch: int, max_len: int, dtype) -> int:
    """Bytes of the cache ``init_cache_fn(config, batch, max_len, dtype)`` would allocate,
    computed abstractly (``jax.eval_shape``: nothing is allocated)."""
    import math

    import jax

    shapes = jax.eval_shape(lambda: init_cache_fn(config, batch, max_len, dtype))
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(shapes))
