"""Decoder-only transformer covering the Llama, Mistral, Qwen2/3 and Gemma 1/2/3 families (Flax linen, pure apply).

  x₀ = embed(tokens) [· sqrt(D) for Gemma]
  xₗ₊₁ = xₗ' + MLP(norm(xₗ')),   xₗ' = xₗ + Attn(norm(xₗ))       (pre-norm residual blocks)
  logits = norm(x_L) · Wₒᵤₜ         (Wₒᵤₜ = embeddingᵀ when tied), float32
  Gemma 2/3 (``post_norms``): xₗ' = xₗ + norm(Attn(norm(xₗ))), xₗ₊₁ = xₗ' + norm(MLP(norm(xₗ')));
  Gemma 2 also soft-caps the logits, logits <- c·tanh(logits / c) (``final_logit_softcap``).

Per-layer patterns (``config.layer_types``: sliding-window or global attention; sliding layers' own RoPE base
``rope_local_theta``) are static per unscanned block; in the scanned stack each block looks its kind up from
its traced layer number and selects its mask and RoPE angles with it.

The L blocks are one ``nn.scan`` (parameters stacked on a leading "layers" axis), so compile time does not
grow with depth; ``config.remat`` wraps each block in ``nn.remat``. With ``config.scan_layers=False`` they
are L modules ``layers_0`` .. with a parameter tree and KV cache buffer each (``unstack_layers`` converts a
scanned model's parameters); the sampler decodes that way on CPU.

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

from models import attention_kernels, kv_cache
from models.attention import Attention, attention_mask, segment_mask, sliding_window_mask
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import LORA, MLP, Embedder, RMSNorm, dense, param, rope_angles, rope_inv_freq, softcap


class Block(nn.Module):
  """One pre-norm transformer block; the carry is the residual stream and the KV cache.

  Scanned, the cache of all L layers travels in the carry and each block writes its new keys/values into its
  own layer ``layer`` in place (``kv_cache.write_layer``): a decode step then touches only the new slots and
  reads the layer it attends over, instead of copying the whole cache as scanned-over inputs and outputs
  would. Unscanned (``layer`` None), the carry holds this block's own (k, v) buffers.

  ``layer_index`` is an unscanned block's layer number, so its sliding-window flag is a Python bool; a
  scanned block reads the flag of its traced ``layer`` from the config's constant pattern.
  ``local_rope`` is the (sin, cos) pair of sliding layers when they have their own RoPE base, else None.
  """
  config: ModelConfig
  layer_index: Optional[int] = None

  def _sliding(self, layer):
    """Whether this block attends over a sliding window: a Python bool, or a traced bool in a scanned stack."""
    pattern = self.config.sliding_layers
    if self.layer_index is not None or len(set(pattern)) == 1:
      return pattern[self.layer_index or 0]
    return jnp.asarray(pattern)[layer]

  @nn.compact
  def __call__(self, carry, layer, sin, cos, mask, index, local_rope=None):
    x, cache = carry
    c = self.config
    dtype, pdtype = c.jnp_dtype, c.jnp_param_dtype
    impl = "xla" if cache is not None else kernel_impl(c)   # a kernel's ``mask`` is the [B, S] segment ids
    sliding = False
    if c.has_sliding:
      sliding = self._sliding(layer)
      if sliding is not False and impl == "xla":
        mask = sliding_window_mask(mask, c.sliding_window, index, sliding)
      if local_rope is not None and sliding is not False:
        sin, cos = (local_rope if sliding is True else
                    (jnp.where(sliding, local_rope[0], sin), jnp.where(sliding, local_rope[1], cos)))
    norm = dict(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=dtype, param_dtype=pdtype)
    scale = None if c.query_pre_attn_scalar is None else float(c.query_pre_attn_scalar) ** -0.5
    h = RMSNorm(name="attn_norm", **norm)(x)
    h, cache = Attention(c.num_heads, c.num_kv_heads, c.head_dim, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm,
                         norm_eps=c.norm_eps, norm_plus_one=c.norm_plus_one, scale=scale,
                         logit_cap=c.attn_logit_softcap, dtype=dtype,
                         cache_keys_slots_last=c.cache_keys_slots_last, impl=impl, window=c.sliding_window,
                         param_dtype=pdtype, name="attn")(h, sin, cos, mask, cache, index, layer, sliding)
    if c.post_norms:
      h = RMSNorm(name="attn_post_norm", **norm)(h)
    x = x + h
    h = RMSNorm(name="mlp_norm", **norm)(x)
    h = MLP(c.mlp_dim, activation=c.activation, dtype=dtype, param_dtype=pdtype, name="mlp")(h)
    if c.post_norms:
      h = RMSNorm(name="mlp_post_norm", **norm)(h)
    x = x + h
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, cache), None


def kernel_impl(config: ModelConfig) -> str:
  """The attention implementation of the teacher-forced (no-cache) passes: ``config.attention``, with "auto"
  resolved for the platform tracing it (``models.attention_kernels.resolve``), or "xla" where that kernel cannot
  run in this trace (``attention_kernels.available``: splash without a context mesh on several devices)."""
  impl = attention_kernels.resolve(config.attention, jax.default_backend(), dtype=config.jnp_dtype,
                                   logit_cap=config.attn_logit_softcap, head_dim=config.head_dim)
  return impl if attention_kernels.available(impl) else "xla"


def scan_unroll(config: ModelConfig) -> int:
  """Layers per iteration of the scanned stack: ``config.scan_unroll``, or for 0 the platform's (all of them on
  CPU, one elsewhere; ``ModelConfig.scan_unroll``)."""
  if config.scan_unroll:
    return max(1, min(int(config.scan_unroll), config.num_layers))
  return config.num_layers if jax.default_backend() == "cpu" else 1


def _stacked_blocks(config: ModelConfig):
  block = nn.remat(Block, prevent_cse=False) if config.remat else Block
  return nn.scan(block, variable_axes={"params": 0, LORA: 0}, split_rngs={"params": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                 length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                 unroll=scan_unroll(config))


def unstack_layers(params: dict, num_layers: int) -> dict:
  """A scanned model's (unboxed) parameters for the same model with ``scan_layers=False``: the stacked
  "layers" subtree becomes ``layers_0`` .. ``layers_{L-1}``. Under ``jit`` each layer is copied out once."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def stack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of ``unstack_layers``."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


class Transformer(nn.Module):
  """The policy / reference / reward backbone. See the module docstring for the equations."""
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype, pdtype = c.jnp_dtype, c.jnp_param_dtype
    self.embedder = Embedder(c.vocab_size, c.embed_dim, scale=c.scale_embeddings, dtype=dtype,
                             param_dtype=pdtype)
    if c.scan_layers:
      self.layers = _stacked_blocks(c)(c)
    else:    # a list: linen names the blocks layers_0 .. layers_{L-1}
      block = nn.remat(Block, prevent_cse=False) if c.remat else Block
      self.layers = [block(c, layer_index=i) for i in range(c.num_layers)]
    self.final_norm = RMSNorm(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=dtype, param_dtype=pdtype)
    if not c.tie_embeddings:
      self.lm_head = param(self, "lm_head", ("embed", "vocab"), (c.embed_dim, c.vocab_size), pdtype)

  def _hidden(self, tokens, positions, attn_mask, cache: Optional[KVCache], segment_ids=None):
    """Final-normed hidden states [B, S, D] and the updated cache."""
    c = self.config
    x = self.embedder.encode(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    sin, cos = rope_angles(positions, rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling))
    local_rope = rope_angles(positions, rope_inv_freq(c.head_dim, c.rope_local_theta)) if c.local_rope else None
    if cache is None:
      segs = attn_mask.astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
      if kernel_impl(c) != "xla":
        mask = segs
      else:
        mask = attention_mask(attn_mask) if segment_ids is None else segment_mask(segs)
      x, _ = self._blocks(x, None, sin, cos, mask, None, local_rope)
    else:
      key_mask = kv_cache.update_key_mask(cache.key_mask, attn_mask, cache.index)
      mask = attention_mask(attn_mask, key_mask, cache.index)
      x, (k, v) = self._blocks(x, (cache.k, cache.v), sin, cos, mask, cache.index, local_rope)
      cache = KVCache(k=k, v=v, key_mask=key_mask, index=cache.index + tokens.shape[1])
    return self.final_norm(x), cache

  def _blocks(self, x, kv, sin, cos, mask, index, local_rope=None):
    """The L blocks over the residual stream x; ``kv`` is the cache's (k, v) or None."""
    c = self.config
    if c.scan_layers:
      layers = jnp.arange(c.num_layers, dtype=jnp.int32)   # scanned over: block l reads and writes cache layer l
      (x, kv), _ = self.layers((x, kv), layers, sin, cos, mask, index, local_rope)
      return x, kv
    if kv is None:
      for block in self.layers:
        (x, _), _ = block((x, None), None, sin, cos, mask, None, local_rope)
      return x, None
    ks, vs = list(kv[0]), list(kv[1])
    for i, block in enumerate(self.layers):
      (x, (ks[i], vs[i])), _ = block((x, (ks[i], vs[i])), None, sin, cos, mask, index, local_rope)
    return x, (tuple(ks), tuple(vs))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output projection of final-normed hidden states [B, S, D] -> float32 logits [B, S, V]."""
    if self.config.tie_embeddings:
      out = self.embedder.decode(hidden)
    else:
      out = dense(hidden, self.lm_head, dtype=self.config.jnp_dtype, preferred_element_type=jnp.float32)
    out = softcap(out, self.config.final_logit_softcap)   # Gemma 2; identity otherwise
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

  def features(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array,
               segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Final-normed hidden states [B, S, D] in the compute dtype (input to reward heads).

    ``segment_ids`` [B, S] int (packed rows, ``rlj.packing``): a token attends only to the earlier tokens of its
    own segment (0: unused slots); ``positions`` then restart in each segment. None: one segment per row, the
    real tokens of ``attn_mask``.
    """
    return self._hidden(tokens, positions, attn_mask, None, segment_ids)[0]
