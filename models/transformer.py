"""Decoder-only transformer covering the Llama, Qwen2 and Gemma families (Flax linen, pure apply).

  x₀ = embed(tokens) [· sqrt(D) for Gemma]
  xₗ₊₁ = xₗ' + MLP(norm(xₗ')),   xₗ' = xₗ + Attn(norm(xₗ))       (pre-norm residual blocks)
  logits = norm(x_L) · Wₒᵤₜ         (Wₒᵤₜ = embeddingᵀ when tied), float32

The L blocks are one ``nn.scan`` (parameters stacked on a leading "layers" axis), so compile time does not
grow with depth; ``config.remat`` wraps each block in ``nn.remat``.

Usage:
  model = Transformer(config)
  params = model.init(rng, tokens, positions, attn_mask)["params"]         # boxed with logical names
  logits, _ = model.apply({"params": params}, tokens, positions, attn_mask)   # [B, S, V] float32
  logits, cache = model.apply({"params": params}, tokens, positions, attn_mask, cache=cache)

For left-padded rows pass ``positions = max(cumsum(attn_mask) - 1, 0)``.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import kv_cache
from models.attention import Attention, attention_mask
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import MLP, Embedder, RMSNorm, dense, param, rope_angles, rope_inv_freq


class Block(nn.Module):
  """One pre-norm transformer block; the scan carry is the residual stream and the stacked KV cache.

  The cache of all L layers travels in the carry and each block writes its new keys/values into its own
  layer in place (``kv_cache.write_layer``): a decode step then touches only the new slots and reads the
  layer it attends over, instead of copying the whole cache as scanned-over inputs and outputs would.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, sin, cos, mask, index):
    x, cache = carry
    c = self.config
    dtype, pdtype = c.jnp_dtype, c.jnp_param_dtype
    norm = dict(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=dtype, param_dtype=pdtype)
    h = RMSNorm(name="attn_norm", **norm)(x)
    h, cache = Attention(c.num_heads, c.num_kv_heads, c.head_dim, qkv_bias=c.qkv_bias, dtype=dtype,
                         param_dtype=pdtype, name="attn")(h, sin, cos, mask, cache, index, layer)
    x = x + h
    h = RMSNorm(name="mlp_norm", **norm)(x)
    x = x + MLP(c.mlp_dim, activation=c.activation, dtype=dtype, param_dtype=pdtype, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, cache), None


def _stacked_blocks(config: ModelConfig):
  block = nn.remat(Block, prevent_cse=False) if config.remat else Block
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                 length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
  """The policy / reference / reward backbone. See the module docstring for the equations."""
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype, pdtype = c.jnp_dtype, c.jnp_param_dtype
    self.embedder = Embedder(c.vocab_size, c.embed_dim, scale=c.scale_embeddings, dtype=dtype,
                             param_dtype=pdtype)
    self.layers = _stacked_blocks(c)(c)
    self.final_norm = RMSNorm(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=dtype, param_dtype=pdtype)
    if not c.tie_embeddings:
      self.lm_head = param(self, "lm_head", ("embed", "vocab"), (c.embed_dim, c.vocab_size), pdtype)

  def _hidden(self, tokens, positions, attn_mask, cache: Optional[KVCache]):
    """Final-normed hidden states [B, S, D] and the updated cache."""
    c = self.config
    x = self.embedder.encode(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    sin, cos = rope_angles(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
    layers = jnp.arange(c.num_layers, dtype=jnp.int32)   # scanned over: block l reads and writes cache layer l
    if cache is None:
      mask = attention_mask(attn_mask)
      (x, _), _ = self.layers((x, None), layers, sin, cos, mask, None)
    else:
      key_mask = kv_cache.update_key_mask(cache.key_mask, attn_mask, cache.index)
      mask = attention_mask(attn_mask, key_mask, cache.index)
      (x, (k, v)), _ = self.layers((x, (cache.k, cache.v)), layers, sin, cos, mask, cache.index)
      cache = KVCache(k=k, v=v, key_mask=key_mask, index=cache.index + tokens.shape[1])
    return self.final_norm(x), cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output projection of final-normed hidden states [B, S, D] -> float32 logits [B, S, V]."""
    if self.config.tie_embeddings:
      out = self.embedder.decode(hidden)
    else:
      out = dense(hidden, self.lm_head, dtype=self.config.jnp_dtype, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

  def __call__(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array,
               cache: Optional[KVCache] = None,
               logits_at: Optional[slice] = None) -> tuple[jax.Array, Optional[KVCache]]:
    """Logits of every position.

    Args:
      tokens: [B, S] int32 token ids.
      positions: [B, S] int32 RoPE positions.
      attn_mask: [B, S] 1 for real tokens, 0 for padding (padding keys are never attended to).
      cache: a ``KVCache`` to write the S tokens into (at slots [index, index + S)) and attend over, or None.
      logits_at: project only the positions ``hidden[:, logits_at]`` (a static slice) to logits, skipping the
        rest of the [B, S, V] matmul: ``slice(-1, None)`` for a prefill, the completion's positions when
        scoring one.
    Returns:
      (logits [B, S, V] float32 ([B, len(logits_at), V] with ``logits_at``), updated cache or None).
    """
    hidden, cache = self._hidden(tokens, positions, attn_mask, cache)
    if logits_at is not None:
      hidden = hidden[:, logits_at]
    return self.logits(hidden), cache

  def features(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array) -> jax.Array:
    """Final-normed hidden states [B, S, D] in the compute dtype (input to reward heads)."""
    return self._hidden(tokens, positions, attn_mask, None)[0]
