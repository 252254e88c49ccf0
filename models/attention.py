"""Grouped-query self-attention with RoPE, an optional KV cache, and float32 softmax.

Family options (``models.config.ModelConfig``): per-head q/k RMSNorm (Qwen3, Gemma 3), query scaling by
``query_pre_attn_scalar`` and attention-logit soft-capping (Gemma 2), and sliding-window layers
(``sliding_window_mask``; Mistral, Gemma 2/3).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention_kernels, kv_cache
from models.layers import RMSNorm, apply_rope, dense, param, softcap, with_lora

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


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal attention within segments of packed rows: query s sees key t <= s when both are in the same segment.

  Args:
    segment_ids: [B, S] int, 0 on unused slots (which see nothing), 1, 2, ... for the segments of a row.
  Returns:
    [B, S, S] bool.
  """
  s = segment_ids.shape[1]
  causal = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]                      # [S, S]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
  return causal[None] & same


def sliding_window_mask(mask: jax.Array, window: int, index: Optional[jax.Array] = None,
                        sliding: Any = True) -> jax.Array:
  """``mask`` restricted to the last ``window`` slots of each query: key slot t is kept when s - W < t <= s.

  The same rule as Hugging Face's ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``) and Mistral's
  "Sliding Window Attention" (arXiv:2310.06825, Sec. 2). Slots, not RoPE positions: the real tokens of a
  left-padded row (and the tokens decoded after them) fill consecutive slots, so within a row the two differ
  by a constant.

  Args:
    mask: [B, S, T] bool from ``attention_mask`` (queries in slots index + [0, S), keys in slots [0, T)).
    window: W >= 1.
    index: int32 scalar slot of the first query (None: 0, no cache).
    sliding: whether this layer slides: a Python bool, or a traced bool scalar (a scanned layer stack).
  Returns:
    [B, S, T] bool.
  """
  s, t = mask.shape[1:]
  q_slot = (jnp.int32(0) if index is None else index) + jnp.arange(s, dtype=jnp.int32)
  near = (q_slot[:, None] - jnp.arange(t, dtype=jnp.int32)[None, :]) < window        # [S, T]
  if sliding is not True:
    near = near | ~jnp.asarray(sliding, jnp.bool_)
  return mask & near[None, :, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                          keys_transposed: bool = False, scale: Optional[float] = None,
                          logit_cap: Optional[float] = None) -> jax.Array:
  """softmax(cap(q kᵀ · scale) + mask) v with KVH key/value heads shared by H/KVH query heads each.

  scale = 1 / sqrt(Dh) by default; cap(x) = c·tanh(x / c) with c = ``logit_cap`` (``layers.softcap``), or x.

  Args:
    q: [B, S, H, Dh] queries.
    k: [B, KVH, T, Dh] keys, head-major; or [B, KVH, Dh, T] with ``keys_transposed`` (the KV cache's layout).
    v: [B, KVH, T, Dh] values.
    mask: [B, S, T] bool.
    keys_transposed: k is [B, KVH, Dh, T].
    scale: the score scale (Gemma 2/3: query_pre_attn_scalar ** -0.5); None: Dh ** -0.5.
    logit_cap: soft-cap of the scaled scores (Gemma 2: 50.0); None: none.
  Returns:
    [B, S, H, Dh] in q's dtype; scores and softmax in float32.
  """
  b, s, h, dh = q.shape
  kvh = k.shape[1]
  g = h // kvh
  scale = dh ** -0.5 if scale is None else scale
  # Head-major queries [B, KVH, G*S, Dh] (row g*S + s): the [.., G*S, T] scores and probabilities then need
  # no transposes between the two batched matmuls; only the small q / output tensors are relaid.
  q = q.reshape(b, s, kvh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, dh)
  if keys_transposed:
    # Slots last: per (row, KV head) a [G*S, Dh] x [Dh, T] matmul over contiguous rows of T keys.
    scores = jnp.einsum("bkqd,bkdt->bkqt", q, k, preferred_element_type=jnp.float32) * scale
  elif s == 1:
    # One new token per row (a decode step) over [B, KVH, T, Dh] keys: the G scores of each (row, KV head) as
    # a broadcast multiply and a sum over Dh. XLA:CPU ran the einsum as B·KVH tiny [G, Dh] x [Dh, T]
    # matmuls: small-50m, 32 rows, 480-slot cache, 40-51 ms per decode step with it, 34-35 ms without.
    # (XLA:CPU decodes with slots-last keys, ``ModelConfig.cache_keys_slots_last``, faster still.)
    scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * k[:, :, None, :, :], axis=-1) * scale
  else:
    scores = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32) * scale
  scores = softcap(scores, logit_cap)
  mask = jnp.tile(mask, (1, g, 1))                                      # [B, G*S, T]
  scores = jnp.where(mask[:, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqt,bktd->bkqd", probs, v)                         # [B, KVH, G*S, Dh]
  return out.reshape(b, kvh, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h, dh)


# Query block of ``causal_self_attention``: on CPU (small-50m shapes, 4 x 512 tokens, 11 layers) blocks of 128
# took the attention's forward + backward from 0.81-1.06 s to 0.51-0.77 s per step over three runs (in one
# run: 256 0.62 s, 128 0.51 s, 64 0.73 s).
CAUSAL_BLOCK = 128


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          block: int = CAUSAL_BLOCK, **kwargs) -> jax.Array:
  """``dot_product_attention`` of S tokens over themselves, in query blocks that skip the keys after the block.

  A query in block [a, e) may only see keys < e (the mask is causal), so block i attends over keys [0, e)
  instead of [0, S): about half of the S² scores (S·(S + block)/2) are computed, with the same result for
  every query that sees at least one key. A query that sees none (a left-padding position) gets the mean of
  the block's values instead of all values; nothing reads it, since no real token attends to padding.

  Args:
    q: [B, S, H, Dh]; k, v: [B, KVH, S, Dh] of the same S tokens.
    mask: [B, S, S] bool, causal (``attention_mask`` without a cache).
    block: query block length.
    **kwargs: ``scale`` and ``logit_cap`` of ``dot_product_attention``.
  Returns:
    [B, S, H, Dh].
  """
  s = q.shape[1]
  if s <= block:
    return dot_product_attention(q, k, v, mask, **kwargs)
  outs = []
  for a in range(0, s, block):
    e = min(a + block, s)
    outs.append(dot_product_attention(q[:, a:e], k[:, :, :e], v[:, :, :e], mask[:, a:e, :e], **kwargs))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  """Multi-head attention with H query and KVH key/value heads (GQA), RoPE, optional q/k/v bias, optional
  per-head q/k RMSNorm before RoPE, a score scale and soft-cap (see ``dot_product_attention``)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6               # of the q/k norms
  norm_plus_one: bool = False          # of the q/k norms (Gemma 3)
  scale: Optional[float] = None        # score scale; None: head_dim ** -0.5
  logit_cap: Optional[float] = None    # attention-logit soft-cap
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  cache_keys_slots_last: bool = False   # the cache's keys are [.., KVH, Dh, S_max] (``ModelConfig``)
  impl: str = "xla"                     # without a cache: "xla", or a kernel (``models.attention_kernels``)
  window: Optional[int] = None          # sliding layers' window W (kernels apply it themselves)

  def _project(self, x, name, heads, heads_axis):
    d = x.shape[-1]
    w = param(self, name, ("embed", heads_axis, "head_dim"), (d, heads, self.head_dim), self.param_dtype)
    y = with_lora(self, name, x, dense(x, w, dtype=self.dtype), dtype=self.dtype)
    if self.qkv_bias:
      bias = param(self, f"{name}_bias", (heads_axis, "head_dim"), (heads, self.head_dim), self.param_dtype,
                   nn.initializers.zeros)
      y = y + bias.astype(self.dtype)[None, None]
    return y

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array,
               cache: Optional[tuple[jax.Array, jax.Array]] = None,
               index: Optional[jax.Array] = None, layer: Optional[jax.Array] = None, sliding=False):
    """Self-attention over the new tokens, or over the cache after writing them into it.

    Args:
      x: [B, S, D] normed hidden states.
      sin, cos: [B, S, Dh/2] RoPE angles of the S tokens.
      mask: [B, S, T] bool from ``attention_mask`` (T = S, or S_max with a cache); with a kernel ``impl`` (no
        cache) the [B, S] int32 segment ids instead (0 on padding).
      cache: the stacked (k, v) of all layers, each [L, B, KVH, S_max, Dh] (keys [L, B, KVH, Dh, S_max] with
        ``cache_keys_slots_last``; ``kv_cache.KVCache``); with ``layer`` None this layer's own (k, v) without
        the L axis; or None.
      index: int32 scalar slot of the first new token (with a cache).
      layer: int32 scalar, this block's layer in a stacked cache.
      sliding: whether this layer slides over ``window`` (a Python or traced bool; kernels only: the einsum
        path gets the window in ``mask``).
    Returns:
      ([B, S, D] output, the cache as given with this layer's new slots written in place, or None).
    """
    x = x.astype(self.dtype)
    q = self._project(x, "q", self.num_heads, "heads")
    k = self._project(x, "k", self.num_kv_heads, "kv_heads")
    if self.qk_norm:   # over Dh of each head, before RoPE (Qwen3, Gemma 3)
      norm = dict(eps=self.norm_eps, plus_one=self.norm_plus_one, dtype=self.dtype, param_dtype=self.param_dtype,
                  axis_name="head_dim")
      q, k = RMSNorm(name="q_norm", **norm)(q), RMSNorm(name="k_norm", **norm)(k)
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    v = self._project(x, "v", self.num_kv_heads, "kv_heads")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # head-major [B, KVH, S, Dh]
    options = dict(scale=self.scale, logit_cap=self.logit_cap)
    attend = functools.partial(causal_self_attention, **options)
    if cache is not None:
      slots_last = self.cache_keys_slots_last
      new_k = k.transpose(0, 1, 3, 2) if slots_last else k
      cache = (kv_cache.write_layer(cache[0], new_k, layer, index, slot_axis=3 if slots_last else 2),
               kv_cache.write_layer(cache[1], v, layer, index, slot_axis=2))
      k, v = (kv_cache.read_layer(buf, layer).astype(self.dtype) for buf in cache)
      attend = functools.partial(dot_product_attention, keys_transposed=slots_last, **options)
    elif self.impl != "xla":   # ``mask`` holds the segment ids
      out = attention_kernels.self_attention(q, k, v, mask, impl=self.impl, window=self.window, sliding=sliding,
                                             scale=self.head_dim ** -0.5 if self.scale is None else self.scale,
                                             logit_cap=self.logit_cap)
      return self._out(x, out), cache
    # Rematerialised: the backward pass recomputes the [B, H, S, T] scores from q and k instead of keeping
    # them for every layer (a buffer L times that size written, and on CPU page-faulted, every step).
    out = jax.checkpoint(attend)(q, k, v, mask)
    return self._out(x, out), cache

  def _out(self, x, out):
    """The output projection of the heads' outputs [B, S, H, Dh] -> [B, S, D]."""
    d = x.shape[-1]
    wo = param(self, "o", ("heads", "head_dim", "embed"), (self.num_heads, self.head_dim, d), self.param_dtype,
               nn.initializers.normal(stddev=(self.num_heads * self.head_dim) ** -0.5))
    return with_lora(self, "o", out, dense(out, wo, contract=2, dtype=self.dtype), 2, dtype=self.dtype)
