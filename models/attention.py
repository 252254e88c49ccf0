"""Grouped-query self-attention with RoPE, an optional KV cache, and float32 softmax."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import kv_cache
from models.layers import apply_rope, param

# Finite "minus infinity": a query with no valid key (a padding row) gets a uniform softmax, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(attn_mask: jax.Array, key_mask: Optional[jax.Array] = None,
                   index: Optional[jax.Array] = None) -> jax.Array:
  """Which keys each query may see: causal over slots, and only keys whose mask is on.

  Args:
    attn_mask: [B, S] mask of the S new tokens (1 = real token, 0 = padding).
    key_mask: [B, T] bool mask of all cache slots (already holding the new tokens), or None when the
      keys are just the S new tokens.
    index: int32 scalar, the slot of the first new token (cache mode only).
  Returns:
    [B, S, T] bool.
  """
  s = attn_mask.shape[1]
  if key_mask is None:
    key_mask, index = attn_mask.astype(jnp.bool_), jnp.int32(0)
  t = key_mask.shape[1]
  q_slot = index + jnp.arange(s, dtype=jnp.int32)
  causal = jnp.arange(t, dtype=jnp.int32)[None, :] <= q_slot[:, None]  # [S, T]
  return causal[None, :, :] & key_mask[:, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q kᵀ / sqrt(Dh) + mask) v with KVH key/value heads shared by H/KVH query heads each.

  Args:
    q: [B, S, H, Dh] queries.
    k, v: [B, T, KVH, Dh] keys and values.
    mask: [B, S, T] bool.
  Returns:
    [B, S, H, Dh] in q's dtype; scores and softmax in float32.
  """
  b, s, h, dh = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, s, kvh, h // kvh, dh)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, h, dh)


class Attention(nn.Module):
  """Multi-head attention with H query and KVH key/value heads (GQA), RoPE and optional q/k/v bias."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _project(self, x, name, heads, heads_axis):
    d = x.shape[-1]
    w = param(self, name, ("embed", heads_axis, "head_dim"), (d, heads, self.head_dim), self.param_dtype)
    y = jnp.einsum("bsd,dhk->bshk", x, w.astype(self.dtype))
    if self.qkv_bias:
      bias = param(self, f"{name}_bias", (heads_axis, "head_dim"), (heads, self.head_dim), self.param_dtype,
                   nn.initializers.zeros)
      y = y + bias.astype(self.dtype)[None, None]
    return y

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array,
               cache: Optional[tuple[jax.Array, jax.Array]] = None,
               index: Optional[jax.Array] = None):
    """Self-attention over the new tokens, or over the cache after writing them into it.

    Args:
      x: [B, S, D] normed hidden states.
      sin, cos: [B, S, Dh/2] RoPE angles of the S tokens.
      mask: [B, S, T] bool from ``attention_mask`` (T = S, or S_max with a cache).
      cache: this layer's (k, v), each [B, S_max, KVH, Dh], or None.
      index: int32 scalar slot of the first new token (with a cache).
    Returns:
      ([B, S, D] output, updated (k, v) or None).
    """
    x = x.astype(self.dtype)
    q = apply_rope(self._project(x, "q", self.num_heads, "heads"), sin, cos)
    k = apply_rope(self._project(x, "k", self.num_kv_heads, "kv_heads"), sin, cos)
    v = self._project(x, "v", self.num_kv_heads, "kv_heads")
    if cache is not None:
      cache = (kv_cache.write(cache[0], k, index), kv_cache.write(cache[1], v, index))
      k, v = cache[0].astype(self.dtype), cache[1].astype(self.dtype)
    out = dot_product_attention(q, k, v, mask)
    d = x.shape[-1]
    wo = param(self, "o", ("heads", "head_dim", "embed"), (self.num_heads, self.head_dim, d), self.param_dtype,
               nn.initializers.normal(stddev=(self.num_heads * self.head_dim) ** -0.5))
    return jnp.einsum("bshk,hkd->bsd", out, wo.astype(self.dtype)), cache
