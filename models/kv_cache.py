"""Key/value cache for incremental decoding.

Slots are positions in the cache buffer, not token positions: a left-padded prompt of length P fills slots
[0, P) (its padding included, with ``key_mask`` False there), then each decoded token takes the next slot.
A query in slot s attends to every slot t <= s whose ``key_mask`` is True. RoPE positions are passed by
the caller separately, so padding does not shift them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from models.config import ModelConfig


# One stacked [L, B, KVH, S_max, Dh] buffer (scanned model), or a tuple of L [B, KVH, S_max, Dh] buffers
# (``ModelConfig.scan_layers=False``).
Layers = Union[jax.Array, tuple[jax.Array, ...]]


class KVCache(NamedTuple):
  """Decoding state of all layers.

  Attributes:
    k: [L, B, KVH, S_max, Dh] keys (after RoPE), or a tuple of L [B, KVH, S_max, Dh] for an unscanned model.
      Head-major: attention reads a layer's [B, KVH, S_max, Dh] as it is (slot-major [.., S_max, KVH, Dh]
      made XLA:CPU copy it transposed every decode step and layer).
    v: values, laid out like ``k``.
    key_mask: [B, S_max] bool, True on slots that hold a real (non-padding) token.
    index: int32 scalar, the next slot to write.
  """
  k: Layers
  v: Layers
  key_mask: jax.Array
  index: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Optional[jnp.dtype] = None) -> KVCache:
  """An empty cache of ``max_len`` slots, laid out as the model's ``scan_layers`` needs; ``dtype`` defaults to
  the model's compute dtype."""
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    make = lambda: jnp.zeros((config.num_layers,) + shape, dtype)
  else:
    make = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=make(), v=make(), key_mask=jnp.zeros((batch, max_len), jnp.bool_),
                 index=jnp.zeros((), jnp.int32))


def logical_axes(config: Optional[ModelConfig] = None) -> KVCache:
  """Logical axis names of each cache field (map them with ``rlj.sharding.tree_shardings``); a per-layer
  tuple of them for an unscanned ``config``."""
  kv = ("batch", "kv_heads", "length", "head_dim")
  kv = (("layers",) + kv) if config is None or config.scan_layers else (kv,) * config.num_layers
  return KVCache(k=kv, v=kv, key_mask=("batch", "length"), index=())


def update_key_mask(key_mask: jax.Array, attn_mask: jax.Array, index: jax.Array) -> jax.Array:
  """Writes the new tokens' mask [B, S] into ``key_mask`` [B, S_max] at slots [index, index + S)."""
  return jax.lax.dynamic_update_slice(key_mask, attn_mask.astype(jnp.bool_), (jnp.int32(0), index))


def write_layer(buf: jax.Array, new: jax.Array, layer: Optional[jax.Array], index: jax.Array) -> jax.Array:
  """Writes a layer's new keys or values [B, KVH, S, Dh] at slot ``index`` into its own [B, KVH, S_max, Dh]
  buffer (``layer`` None), or into layer ``layer`` of a stacked [L, B, KVH, S_max, Dh] one. Inside a decode
  loop XLA updates the buffer in place: only the S new slots move."""
  zero = jnp.int32(0)
  if layer is None:
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (zero, zero, index, zero))
  return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), (layer, zero, zero, index, zero))


def read_layer(buf: jax.Array, layer: Optional[jax.Array]) -> jax.Array:
  """A layer's [B, KVH, S_max, Dh]: the buffer itself (``layer`` None) or layer ``layer`` of a stacked one."""
  if layer is None:
    return buf
  return jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False)
