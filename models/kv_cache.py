"""Key/value cache for incremental decoding.

Slots are positions in the cache buffer, not token positions: a left-padded prompt of length P fills slots
[0, P) (its padding included, with ``key_mask`` False there), then each decoded token takes the next slot.
A query in slot s attends to every slot t <= s whose ``key_mask`` is True. RoPE positions are passed by
the caller separately, so padding does not shift them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from models.config import ModelConfig


class KVCache(NamedTuple):
  """Decoding state of all layers.

  Attributes:
    k: [L, B, KVH, S_max, Dh] keys (after RoPE), head-major: attention reads a layer's [B, KVH, S_max, Dh]
      as it is (slot-major [.., S_max, KVH, Dh] made XLA:CPU copy it transposed every decode step and layer).
    v: [L, B, KVH, S_max, Dh] values.
    key_mask: [B, S_max] bool, True on slots that hold a real (non-padding) token.
    index: int32 scalar, the next slot to write.
  """
  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  index: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Optional[jnp.dtype] = None) -> KVCache:
  """An empty cache of ``max_len`` slots; ``dtype`` defaults to the model's compute dtype."""
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 key_mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))


def logical_axes() -> KVCache:
  """Logical axis names of each cache field (map them with ``rlj.sharding.tree_shardings``)."""
  kv = ("layers", "batch", "kv_heads", "length", "head_dim")
  return KVCache(k=kv, v=kv, key_mask=("batch", "length"), index=())


def update_key_mask(key_mask: jax.Array, attn_mask: jax.Array, index: jax.Array) -> jax.Array:
  """Writes the new tokens' mask [B, S] into ``key_mask`` [B, S_max] at slots [index, index + S)."""
  return jax.lax.dynamic_update_slice(key_mask, attn_mask.astype(jnp.bool_), (jnp.int32(0), index))


def write_layer(stacked: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  """Writes layer ``layer``'s new keys or values [B, KVH, S, Dh] into the stacked [L, B, KVH, S_max, Dh] at
  slot ``index``; inside a loop over layers XLA updates the buffer in place (only the S new slots move)."""
  zero = jnp.int32(0)
  return jax.lax.dynamic_update_slice(stacked, new[None].astype(stacked.dtype), (layer, zero, zero, index, zero))


def read_layer(stacked: jax.Array, layer: jax.Array) -> jax.Array:
  """Layer ``layer`` [B, KVH, S_max, Dh] of a stacked [L, B, KVH, S_max, Dh] cache buffer."""
  return jax.lax.dynamic_index_in_dim(stacked, layer, axis=0, keepdims=False)
