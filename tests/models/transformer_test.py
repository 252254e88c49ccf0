"""Transformer invariances: remat changes nothing, features feed the logits, rope and norm references."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, presets
from models.transformer import Transformer

CONFIG = presets.get("tiny")


def test_remat_gives_same_loss_and_grads():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 8)).astype(np.int32)
  mask = np.ones((2, 8), np.int32)
  positions = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
  params = jax.jit(lambda r: nn.unbox(Transformer(CONFIG).init(r, tokens, positions, mask)["params"]))(
      jax.random.key(0))

  def run(config):
    def loss(p):
      model = Transformer(config)
      logits, _ = model.apply({"params": p}, tokens, positions, mask)
      feats = model.apply({"params": p}, tokens, positions, mask, method=Transformer.features)
      by_hand = jnp.einsum("bsd,dv->bsv", feats, p["lm_head"])
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), (logits, by_hand)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l0, (logits, by_hand)), g0 = run(CONFIG)
  (l1, _), g1 = run(dataclasses.replace(CONFIG, remat=True))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5), g1, g0)


def test_rope_matches_pairwise_rotation_reference():
  rng = np.random.default_rng(0)
  dh, theta = 8, 100.0
  x = rng.standard_normal((1, 3, 2, dh)).astype(np.float32)  # [B, S, N, Dh]
  positions = np.array([[0, 1, 5]], np.int32)
  sin, cos = layers.rope_angles(jnp.asarray(positions), layers.rope_inv_freq(dh, theta))
  out = np.asarray(layers.apply_rope(jnp.asarray(x), sin, cos))
  ref = np.zeros_like(x)
  for s in range(3):
    for i in range(dh // 2):  # "rotate_half" pairs (i, i + Dh/2), angle pos * theta^(-2i/Dh)
      a = positions[0, s] * theta ** (-2 * i / dh)
      x1, x2 = x[0, s, :, i], x[0, s, :, i + dh // 2]
      ref[0, s, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
      ref[0, s, :, i + dh // 2] = x2 * np.cos(a) + x1 * np.sin(a)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_llama3_rope_scaling_bands():
  base = layers.rope_inv_freq(8, 500_000.0)
  scaled = layers.rope_inv_freq(8, 500_000.0, (8.0, 1.0, 4.0, 256))
  wavelen = 2 * np.pi / base                      # [6.3, 167, 4.4e3, 1.2e5]
  np.testing.assert_allclose(scaled[wavelen < 64], base[wavelen < 64])            # high freq: kept
  np.testing.assert_allclose(scaled[wavelen > 256], base[wavelen > 256] / 8.0)    # low freq: / factor
  mid = (wavelen >= 64) & (wavelen <= 256)
  smooth = (256 / wavelen[mid] - 1.0) / (4.0 - 1.0)
  np.testing.assert_allclose(scaled[mid], (1 - smooth) * base[mid] / 8.0 + smooth * base[mid], rtol=1e-6)
  assert mid.sum() == 1


def test_rms_norm_reference():
  x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
  w = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  for plus_one in (False, True):
    out = layers.RMSNorm(eps=1e-6, plus_one=plus_one).apply({"params": {"scale": w}}, x)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * ((1 + w) if plus_one else w)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
