"""Attention kernels against the einsum reference path: the TPU splash kernel in Pallas interpret mode (values
and gradients, padding, GQA, sliding windows, soft-cap, a mixed layer pattern in the scanned stack, 8-device
shards), the cuDNN path's arguments, and the platform choice."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention_kernels, presets
from models.attention import attention_mask, causal_self_attention, sliding_window_mask
from models.transformer import Transformer
from rlj import logprobs, sharding

pytestmark = pytest.mark.usefixtures("fast_compile")


def _one_device():
  """A 1-device mesh context: the kernel runs unsharded (without a mesh, 8 devices make the model fall back)."""
  return jax.set_mesh(sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1]))


def _inputs(b=2, s=200, h=4, kvh=2, dh=16, pads=(0, 37), seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(b, s, h, dh)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(b, kvh, s, dh)), jnp.float32) for _ in range(2))
  seg = np.ones((b, s), np.int32)
  for i, p in enumerate(pads):
    seg[i, :p] = 0                                                              # left padding
  return q, k, v, jnp.asarray(seg)


def _reference(q, k, v, seg, *, scale, logit_cap=None, window=None):
  mask = attention_mask(seg)
  if window is not None:
    mask = sliding_window_mask(mask, window)
  return causal_self_attention(q, k, v, mask, scale=scale, logit_cap=logit_cap)


@pytest.mark.parametrize("window,cap", [(None, None), (48, 5.0)])
def test_splash_equals_einsum_values_and_grads(monkeypatch, window, cap):
  monkeypatch.setattr(attention_kernels, "MAX_BLOCK", 128)     # several tiles: 200 tokens pad to 2 x 128
  q, k, v, seg = _inputs()
  real = (seg > 0)[:, :, None, None].astype(jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real   # padding rows unread

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  ref = lambda q, k, v: _reference(q, k, v, seg, scale=0.3, logit_cap=cap, window=window)
  ker = lambda q, k, v: attention_kernels.self_attention(q, k, v, seg, impl="splash", scale=0.3, logit_cap=cap,
                                                         window=window, sliding=window is not None)
  with attention_kernels.pallas_interpret(), _one_device():
    out = jax.jit(ker)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: loss(ker, *a), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(np.asarray(out * real), np.asarray(ref(q, k, v) * real), atol=2e-5, rtol=2e-5)
  ref_grads = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  for g, rg in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=5e-5, rtol=5e-5)


def _model_case(config, seed=0):
  r = np.random.default_rng(seed)
  b, s = 8, 40
  tokens = jnp.asarray(r.integers(0, config.vocab_size, size=(b, s)), jnp.int32)
  mask = np.ones((b, s), np.int32)
  for i in range(b):
    mask[i, :i * 3] = 0
  mask = jnp.asarray(mask)
  init = Transformer(dataclasses.replace(config, attention="xla")).init
  params = nn.unbox(init(jax.random.key(seed), tokens, tokens, mask)["params"])
  return params, tokens, mask


def _logp_and_grads(config, params, tokens, mask):
  def loss(p):
    logp = logprobs.completion_logprobs(Transformer(config).apply, p, tokens, mask, 24, temperature=1.0,
                                        logits_window=True)
    return jnp.sum(logp * mask[:, 24:]), logp
  return jax.value_and_grad(loss, has_aux=True)(params)


def test_model_with_splash_equals_einsum_mixed_sliding_layers_on_1_and_8_devices():
  """A scanned stack of full and sliding layers (the kernel's window chosen per traced layer): log-probs of the
  completion and the parameters' gradients equal the einsum model's, on one device and under a (data 2, fsdp 2,
  tensor 2) mesh, where each device runs the kernel on its rows and heads (shard_map)."""
  base = dataclasses.replace(presets.get("tiny"), num_layers=3, sliding_window=6,
                             layer_types=("sliding", "full", "sliding"), attention="xla")
  params, tokens, mask = _model_case(base)
  (_, logp0), g0 = jax.jit(lambda p: _logp_and_grads(base, p, tokens, mask))(params)
  splash = dataclasses.replace(base, attention="splash")
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  with attention_kernels.pallas_interpret():
    with _one_device():
      (_, logp1), g1 = jax.jit(lambda p: _logp_and_grads(splash, p, tokens, mask))(params)
    with jax.set_mesh(mesh), sharding.activation_rules(mesh):
      (_, logp8), g8 = jax.jit(lambda p: _logp_and_grads(splash, p, tokens, mask))(params)
  for logp, g in ((logp1, g1), (logp8, g8)):
    np.testing.assert_allclose(np.asarray(logp), np.asarray(logp0), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4), g, g0)


def test_splash_without_a_mesh_on_several_devices_keeps_the_einsum_path():
  """Traced with no context mesh on a host of 8 devices, a splash model runs the einsum path (a Pallas call would
  not be partitioned) and gives its log-probs; a direct kernel call says what it needs."""
  base = dataclasses.replace(presets.get("tiny"), num_layers=2, sliding_window=5, layer_types=("sliding", "full"),
                             attention="xla")
  params, tokens, mask = _model_case(base)
  (_, logp0), _ = jax.jit(lambda p: _logp_and_grads(base, p, tokens, mask))(params)
  splash = dataclasses.replace(base, attention="splash")
  (_, logp1), _ = jax.jit(lambda p: _logp_and_grads(splash, p, tokens, mask))(params)
  np.testing.assert_allclose(np.asarray(logp1), np.asarray(logp0), atol=1e-6)
  q, k, v, seg = _inputs(s=16)
  with pytest.raises(ValueError, match="jax.set_mesh"):
    attention_kernels.self_attention(q, k, v, seg, impl="splash", scale=0.3)


def test_cudnn_arguments_with_xla_implementation(monkeypatch):
  """cuDNN itself needs a GPU; its call's layout, segment mask and window are checked by running the same
  ``jax.nn.dot_product_attention`` call with XLA's implementation (launch/benchmarks/gpu_check.py runs cuDNN)."""
  real_fn = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: real_fn(*a, **{**kw, "implementation": "xla"}))
  q, k, v, seg = _inputs(s=64, pads=(5, 20))
  real = (seg > 0)[:, :, None, None]
  for window in (None, 9):
    out = attention_kernels.self_attention(q, k, v, seg, impl="cudnn", scale=0.25, window=window,
                                           sliding=window is not None)
    ref = _reference(q, k, v, seg, scale=0.25, window=window)
    np.testing.assert_allclose(np.asarray(out * real), np.asarray(ref * real), atol=2e-5)


def test_platform_choice_and_bad_names():
  r = attention_kernels.resolve
  assert r("auto", "tpu") == "splash"
  assert r("auto", "gpu", dtype=jnp.bfloat16) == "cudnn"
  assert r("auto", "gpu", dtype=jnp.float32) == "xla"                       # cuDNN flash attention: bf16/fp16
  assert r("auto", "gpu", dtype=jnp.bfloat16, logit_cap=50.0) == "xla"      # no soft-cap in cuDNN
  assert r("auto", "gpu", dtype=jnp.bfloat16, head_dim=256) == "xla"        # Gemma's 256-wide heads
  assert r("auto", "cpu", dtype=jnp.bfloat16) == "xla"
  assert r("splash", "cpu") == "splash"
  with pytest.raises(ValueError, match="choose one of"):
    dataclasses.replace(presets.get("tiny"), attention="flash")
