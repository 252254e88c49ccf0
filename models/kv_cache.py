"""Key/value cache for incremental decoding.

Slots are positions in the cache buffer, not token positions: a left-padded prompt of length P fills slots
[0, P) (its padding included, with ``key_mask`` False there), then each decoded token takes the next slot.
A query in slot s attends to every slot t <= s whose ``key_mask`` is True. RoPE positions are passed by
the caller separately, so padding does not shift them.

Sliding-window layers (``ModelConfig.layer_types``) keep all S_max slots as well and mask those outside their
window (``attention.sliding_window_mask``): one cache layout for every layer of a scanned stack, at the memory
of a full-length cache for the local layers too (a ring buffer of W slots would save it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from models.config import ModelConfig


# One stacked buffer of all L layers (scanned model), or a tuple of L per-layer buffers
# (``ModelConfig.scan_layers=False``).
Layers = Union[jax.Array, tuple[jax.Array, ...]]


class KVCache(NamedTuple):
  """Decoding state of all layers.

  Attributes:
    k: [L, B, KVH, S_max, Dh] keys (after RoPE), or a tuple of L [B, KVH, S_max, Dh] for an unscanned model;
      with ``ModelConfig.cache_keys_slots_last`` [L, B, KVH, Dh, S_max] (or L of [B, KVH, Dh, S_max]).
    v: [L, B, KVH, S_max, Dh] values, or a tuple of L [B, KVH, S_max, Dh].
      Both are head-major: attention reads a layer as it is (slot-major [.., S_max, KVH, Dh] made XLA:CPU copy
      a layer transposed every decode step).
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
  b, kvh, dh = batch, config.num_kv_heads, config.head_dim

  def make(shape):
    if config.scan_layers:
      return jnp.zeros((config.num_layers,) + shape, dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  k_shape = (b, kvh, dh, max_len) if config.cache_keys_slots_last else (b, kvh, max_len, dh)
  return KVCache(k=make(k_shape), v=make((b, kvh, max_len, dh)),
                 key_mask=jnp.zeros((batch, max_len), jnp.bool_), index=jnp.zeros((), jnp.int32))


def logical_axes(config: Optional[ModelConfig] = None) -> KVCache:
  """Logical axis names of each cache field (map them with ``rlj.sharding.tree_shardings``); a per-layer
  tuple of them for an unscanned ``config``."""
  def per_layer(names):
    return (("layers",) + names) if config is None or config.scan_layers else (names,) * config.num_layers
  slots_last = config is not None and config.cache_keys_slots_last
  k = ("batch", "kv_heads", "head_dim", "length") if slots_last else ("batch", "kv_heads", "length", "head_dim")
  return KVCache(k=per_layer(k), v=per_layer(("batch", "kv_heads", "length", "head_dim")),
                 key_mask=("batch", "length"), index=())


def update_key_mask(key_mask: jax.Array, attn_mask: jax.Array, index: jax.Array) -> jax.Array:
  """Writes the new tokens' mask [B, S] into ``key_mask`` [B, S_max] at slots [index, index + S)."""
  return jax.lax.dynamic_update_slice(key_mask, attn_mask.astype(jnp.bool_), (jnp.int32(0), index))


def write_layer(buf: jax.Array, new: jax.Array, layer: Optional[jax.Array], index: jax.Array, *,
                slot_axis: int) -> jax.Array:
  """Writes a layer's S new slots ``new`` ([B, KVH, S, Dh] with ``slot_axis=2``; slots-last keys
  [B, KVH, Dh, S] with ``slot_axis=3``) at slot ``index`` into its own buffer (``layer`` None), or into
  layer ``layer`` of a stacked [L, ...] one. Inside a decode loop XLA updates the buffer in place: only the S
  new slots move."""
  start = [jnp.int32(0)] * new.ndim
  start[slot_axis] = index
  if layer is None:
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)
  return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), [layer] + start)


def read_layer(buf: jax.Array, layer: Optional[jax.Array]) -> jax.Array:
  """A layer's keys or values: the buffer itself (``layer`` None) or layer ``layer`` of a stacked one."""
  if layer is None:
    return buf
  return jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False)


def place(dst: KVCache, src: KVCache, repeats: int = 1) -> KVCache:
  """``dst`` holding ``src`` in its first slots, each of src's rows repeated ``repeats`` times.

  Row r·repeats + j of the result is row r of ``src`` (so ``dst`` has ``repeats`` times as many rows), slots
  [0, S_src) hold src's keys, values and key mask, later slots are masked off (their stale contents are never
  attended to: a slot's mask turns on when a token is written there), and the next slot to write is
  ``src.index``. This is how a prefill of B prompts serves their B·G samples, and how a cache grows into a
  longer buffer: XLA writes src into dst in place when dst is donated or a fresh buffer.
  """
  if dst.key_mask.shape[0] != src.key_mask.shape[0] * repeats or dst.key_mask.shape[1] < src.key_mask.shape[1]:
    raise ValueError(f"cannot place a cache of {src.key_mask.shape} (rows, slots) x {repeats} rows into one of "
                     f"{dst.key_mask.shape}")
  batch_axis = 0 if isinstance(dst.k, tuple) else 1   # per-layer [B, ...] buffers, or stacked [L, B, ...]

  def put(buf, new, axis):
    if repeats > 1:
      new = jnp.repeat(new, repeats, axis=axis)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (jnp.int32(0),) * buf.ndim)

  layers = lambda d, s: jax.tree.map(lambda b, n: put(b, n, batch_axis), d, s)
  key_mask = put(jnp.zeros_like(dst.key_mask), src.key_mask, 0)
  return KVCache(k=layers(dst.k, src.k), v=layers(dst.v, src.v), key_mask=key_mask, index=src.index)
