"""The KV cache: static-shape key/value buffers that ``forward`` reads and writes.

Layout (docs/INTERFACES.md): ``k, v: [L, B, K, S, H]`` in the compute dtype, S = the cache
length (at most the context length). Slot j of row b holds the key/value of position j of that
row. Rows advance independently (per-row ``start``), so one cache serves a right-padded batch:
padding tokens write garbage at slots past the prompt, which decode overwrites before any query
can see them (the causal mask shows a query at position p only the slots j <= p).

Sliding-window layers (gpt-oss: even layers, window 128) could later keep only ``window`` slots
in a ring buffer (slot = position mod window) with the position of each slot stored beside it;
:func:`gptjax.models.layers.attention_mask` is written in terms of slot positions for that
reason. That would make the cache a pair of stacks (full layers, sliding layers); today every
layer keeps S slots.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from gptjax.errors import GenerationError


@struct.dataclass
class KVCache:
    """Keys and values of every layer. A frozen pytree: jit takes it as an argument, and the
    generate loop donates it so that the updates happen in place."""

    k: jnp.ndarray  # [L, B, K, S, H]
    v: jnp.ndarray  # [L, B, K, S, H]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self):
        return self.k.dtype

    def write(self, layer: int, k_new, v_new, positions) -> "KVCache":
        """Store the keys/values of T new tokens of every row at their positions.

        layer: static int; k_new, v_new: [B, T, K, H]; positions: int [B, T].
        Positions >= S are dropped (they can only come from padding past the end; the
        generate layer refuses real tokens beyond the cache).
        """
        B = k_new.shape[0]
        rows = jnp.arange(B)[:, None]                                   # [B, 1]
        # Advanced indices (layer, rows, positions) are split by a slice, so numpy rules put
        # their broadcast shape [B, T] first: the indexed view is [B, T, K, H] like k_new.
        k = self.k.at[layer, rows, :, positions].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, rows, :, positions].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """A zero-filled cache for ``batch`` rows of ``max_len`` positions.

    Zeros (never uninitialised memory): a masked slot still enters the probabilities-times-values
    matmul with weight 0, and 0 * NaN would be NaN. Shapes come from config.n_layers,
    n_kv_heads and head_dim.
    """
    if int(batch) < 1 or int(max_len) < 1:
        raise GenerationError(f"KV cache needs batch >= 1 and max_len >= 1, got {batch=} "
                              f"{max_len=}")
    shape = (config.n_layers, int(batch), config.n_kv_heads, int(max_len), config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
