"""Cached decoding (prefill, then one token at a time) reproduces the full forward pass."""
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import kv_cache, presets
from models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

# Tiny Gemma-flavoured variant: q/k/v bias, (1 + w) norm, embedding scale and GeGLU all on the cached path.
CONFIG = dataclasses.replace(presets.get("tiny"), qkv_bias=True, norm_plus_one=True, scale_embeddings=True,
                             activation="gelu_tanh", rope_theta=100.0)
B, P, T, MAX_LEN = 2, 5, 4, 12
PADS = (0, 2)  # left padding of each prompt: prompts of length 5 and 3


@functools.lru_cache(maxsize=None)
def _params():
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda rng: nn.unbox(Transformer(CONFIG).init(rng, tokens, tokens, tokens)["params"]))
  params = init(jax.random.key(0))
  # Non-trivial norm and bias values (they init at 0), drawn with numpy.
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(B, P + T)).astype(np.int32)
  mask = np.ones((B, P + T), np.int32)
  for row, pad in enumerate(PADS):
    mask[row, :pad] = 0
    tokens[row, :pad] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


@chex.assert_max_traces(n=2)  # one prefill shape, one decode shape: no retrace per step
def _step(params, tokens, positions, mask, cache):
  return Transformer(CONFIG).apply({"params": params}, tokens, positions, mask, cache=cache)


_step_jit = jax.jit(_step)


def _prefill_then_decode(step, params, tokens, positions, mask, cache):
  """Logits [B, P + T, V] of a P-token prefill and then T one-token steps through ``step``, and the cache."""
  logits, cache = step(params, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
  steps = [logits]
  for t in range(P, P + T):
    logits, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(logits)
  return np.concatenate([np.asarray(s) for s in steps], axis=1), cache


@pytest.mark.parametrize("slots_last", [False, True])
def test_cached_decoding_matches_full_forward(slots_last):
  """Prefill then one token at a time equals the full forward pass, with keys cached [.., S_max, Dh] (the
  default) or slots-last [.., Dh, S_max] (``cache_keys_slots_last``, the CPU decode model's)."""
  params = _params()
  tokens, mask, positions = _batch()
  full, none = jax.jit(lambda p: Transformer(CONFIG).apply({"params": p}, tokens, positions, mask))(params)
  assert none is None

  config = dataclasses.replace(CONFIG, cache_keys_slots_last=slots_last)
  step = jax.jit(lambda p, *args: Transformer(config).apply({"params": p}, *args[:3], cache=args[3]))
  step = step if slots_last else _step_jit                           # counts traces: none per decode step
  cached, cache = _prefill_then_decode(step, params, tokens, positions, mask, kv_cache.init_cache(config, B, MAX_LEN))

  assert int(cache.index) == P + T
  np.testing.assert_array_equal(np.asarray(cache.key_mask[:, :P + T]), mask.astype(bool))
  assert not np.asarray(cache.key_mask[:, P + T:]).any()
  L, KVH, DH = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
  assert cache.k.shape == ((L, B, KVH, DH, MAX_LEN) if slots_last else (L, B, KVH, MAX_LEN, DH))
  assert cache.v.shape == (L, B, KVH, MAX_LEN, DH)
  k = np.asarray(cache.k).swapaxes(3, 4) if slots_last else np.asarray(cache.k)   # [L, B, KVH, S_max, Dh]
  assert not k[:, :, :, P + T:].any() and not np.asarray(cache.v[:, :, :, P + T:]).any()  # unwritten slots
  assert k[:, :, :, :P + T].any() and np.asarray(cache.v[:, :, :, :P + T]).any()
  assert kv_cache.logical_axes(config).k[-2:] == (("head_dim", "length") if slots_last else ("length", "head_dim"))
  valid = mask.astype(bool)
  np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=2e-5, rtol=2e-5)


def test_bfloat16_compute_stays_close_and_logits_are_float32():
  params = _params()
  tokens, mask, positions = _batch()
  bf16 = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  model = Transformer(bf16)
  (low, _), feats = jax.jit(lambda p: (model.apply({"params": p}, tokens, positions, mask),
                                       model.apply({"params": p}, tokens, positions, mask,
                                                   method=Transformer.features)))(cast)
  high, _ = jax.jit(lambda p: Transformer(CONFIG).apply({"params": p}, tokens, positions, mask))(params)
  assert low.dtype == jnp.float32
  valid = mask.astype(bool)
  err = np.abs(np.asarray(low) - np.asarray(high))[valid].max()
  assert 0 < err < 0.1 * np.abs(np.asarray(high)[valid]).max()
  assert feats.shape == (B, P + T, CONFIG.embed_dim) and feats.dtype == jnp.bfloat16


def test_unscanned_model_cached_decoding_matches_scanned_full_forward():
  """scan_layers=False: unstack_layers' parameters, a KV buffer per layer, the scanned model's logits; and
  stack_layers undoes unstack_layers."""
  from models.transformer import stack_layers, unstack_layers  # pylint: disable=g-import-not-at-top
  params = _params()
  tokens, mask, positions = _batch()
  full, _ = jax.jit(lambda p: Transformer(CONFIG).apply({"params": p}, tokens, positions, mask))(params)
  unscanned = dataclasses.replace(CONFIG, scan_layers=False, cache_keys_slots_last=True)   # the CPU decode model
  model = Transformer(unscanned)
  per_layer = unstack_layers(params, CONFIG.num_layers)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:, :1], tokens[:, :1], mask[:, :1]))
  assert jax.tree.structure(nn.unbox(boxed["params"])) == jax.tree.structure(per_layer)
  assert boxed["params"]["layers_0"]["attn"]["q"].names == ("embed", "heads", "head_dim")
  jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer, CONFIG.num_layers), params)

  step = jax.jit(lambda p, *args: model.apply({"params": p}, *args[:3], cache=args[3]))
  cache = kv_cache.init_cache(unscanned, B, MAX_LEN)
  assert len(cache.k) == CONFIG.num_layers and cache.k[0].shape == (B, CONFIG.num_kv_heads, CONFIG.head_dim,
                                                                    MAX_LEN)
  assert cache.v[0].shape == (B, CONFIG.num_kv_heads, MAX_LEN, CONFIG.head_dim)
  axes = kv_cache.logical_axes(unscanned)
  assert axes.k == (("batch", "kv_heads", "head_dim", "length"),) * CONFIG.num_layers
  assert axes.v == (("batch", "kv_heads", "length", "head_dim"),) * CONFIG.num_layers
  cached, cache = _prefill_then_decode(step, per_layer, tokens, positions, mask, cache)
  assert all(not np.asarray(k[..., P + T:]).any() and np.asarray(k[..., :P + T]).any() for k in cache.k)
  assert all(not np.asarray(v[:, :, P + T:]).any() and np.asarray(v[:, :, :P + T]).any() for v in cache.v)
  valid = mask.astype(bool)
  np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=2e-5, rtol=2e-5)
  no_cache, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, mask))(per_layer)
  np.testing.assert_allclose(np.asarray(no_cache), np.asarray(full), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("stacked", [True, False])
def test_place_repeats_rows_into_the_first_slots_and_masks_the_rest(stacked):
  """kv_cache.place against a numpy loop: row r*G + j of the result is row r of the source in slots [0, S),
  the destination's later slots keep their contents but are masked off, and the next slot is the source's."""
  config = dataclasses.replace(CONFIG, scan_layers=stacked, cache_keys_slots_last=not stacked)
  rng = np.random.default_rng(3)
  g, rows, s_src, s_dst = 3, 2, 5, 9
  fill = lambda c: jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), c)
  src = fill(kv_cache.init_cache(config, rows, s_src))
  src = src._replace(key_mask=rng.random((rows, s_src)) < 0.7, index=jnp.int32(s_src - 1))
  dst = fill(kv_cache.init_cache(config, rows * g, s_dst))
  dst = dst._replace(key_mask=np.ones((rows * g, s_dst), bool), index=jnp.int32(7))
  out = jax.jit(kv_cache.place, static_argnums=2)(dst, src, g)
  assert int(out.index) == s_src - 1
  batch_axis, slot_axes = (1, (3, 3)) if stacked else (0, (3, 2))   # keys slots-last when unstacked here
  for field, slot_axis in zip(("k", "v"), slot_axes):
    for o, s_, d in zip(*(jax.tree.leaves(getattr(c, field)) for c in (out, src, dst))):
      o, s_, d = np.asarray(o), np.asarray(s_), np.asarray(d)
      for r in range(rows * g):
        got = np.take(o, r, axis=batch_axis)
        want_src, want_dst = np.take(s_, r // g, axis=batch_axis), np.take(d, r, axis=batch_axis)
        ax = slot_axis - 1
        np.testing.assert_array_equal(np.take(got, range(s_src), axis=ax), want_src)
        np.testing.assert_array_equal(np.take(got, range(s_src, s_dst), axis=ax),
                                      np.take(want_dst, range(s_src, s_dst), axis=ax))
  key_mask = np.asarray(out.key_mask)
  np.testing.assert_array_equal(key_mask[:, :s_src], np.repeat(np.asarray(src.key_mask), g, axis=0))
  assert not key_mask[:, s_src:].any()
  with pytest.raises(ValueError, match="cannot place"):
    kv_cache.place(dst, src, 2)
