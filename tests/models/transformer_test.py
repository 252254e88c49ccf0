"""Transformer invariances: remat and the layer scan's unrolling change nothing, features feed the logits, rope and norm references."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers, presets
from models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

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
  np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), atol=1e-5, rtol=1e-5)
  # Remat, and the layer scan as a loop of one layer per iteration instead of unrolled (the CPU default), on the
  # same stacked parameters.
  for variant in (dict(remat=True, scan_unroll=1),):
    (l1, _), g1 = run(dataclasses.replace(CONFIG, **variant))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 g1, g0)


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


def test_dense_is_the_einsum_values_and_grads():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((5, 6, 7)), jnp.float32)    # [k, *o]: "...k,kho->...ho"
  w2 = jnp.asarray(rng.standard_normal((4, 5, 6)), jnp.float32)    # [*k, o]: "...hk,hko->...o"
  cases = [(lambda x, w: layers.dense(x, w), lambda x, w: jnp.einsum("bsgk,kho->bsgho", x, w), w1),
           (lambda x, w: layers.dense(x, w, contract=2), lambda x, w: jnp.einsum("bshk,hko->bso", x, w), w2)]
  for fast, slow, w in cases:
    np.testing.assert_allclose(fast(x, w), slow(x, w), rtol=1e-5, atol=1e-5)
    gf = jax.grad(lambda x, w: jnp.sum(jnp.sin(fast(x, w))), argnums=(0, 1))(x, w)
    gs = jax.grad(lambda x, w: jnp.sum(jnp.sin(slow(x, w))), argnums=(0, 1))(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), gf, gs)
  assert layers.dense(x, w1, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert layers.dense(x, w1, dtype=jnp.bfloat16, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_causal_blocks_match_full_attention_on_real_tokens():
  """Query blocks of 8 over 21 tokens (8, 8, 5), with left padding: same outputs and grads on real tokens."""
  from models import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  b, s, h, kvh, dh = 2, 21, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((b, s, h, dh)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, kvh, s, dh)), jnp.float32) for _ in range(2))
  attn_mask = np.ones((b, s), np.int32)
  attn_mask[1, :6] = 0
  mask = attention.attention_mask(jnp.asarray(attn_mask))
  real = jnp.asarray(attn_mask, jnp.float32)[:, :, None, None]
  weights = jnp.asarray(rng.standard_normal((b, s, h, dh)), jnp.float32) * real

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weights)
  blocked = jax.jit(lambda q, k, v, m: attention.causal_self_attention(q, k, v, m, block=8))
  full_out = jax.jit(attention.dot_product_attention)(q, k, v, mask)
  np.testing.assert_allclose(blocked(q, k, v, mask) * real, full_out * real, rtol=1e-6, atol=1e-6)
  g_blocked = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
  g_full = jax.jit(jax.grad(loss(attention.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_blocked, g_full)
  # A slow reference for one real query: softmax over the keys it may see.
  bi, si, hi = 1, 13, 3
  kh = hi // (h // kvh)
  keys = np.arange(6, si + 1)
  sc = np.asarray(k)[bi, kh, keys] @ np.asarray(q)[bi, si, hi] / np.sqrt(dh)
  p = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
  np.testing.assert_allclose(np.asarray(blocked(q, k, v, mask))[bi, si, hi], p @ np.asarray(v)[bi, kh, keys],
                             rtol=1e-5, atol=1e-6)


def test_decode_attention_paths_match_a_loop_over_heads():
  """One query (a decode step) over slots-last keys [B, KVH, Dh, T] (the matmul path) and over [B, KVH, T, Dh]
  keys (the multiply-and-sum path), and two queries over either layout (einsums): all agree with a per-(row,
  head) numpy loop, masked keys included."""
  from models import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  b, t, h, kvh, dh = 3, 11, 6, 2, 8
  q = rng.standard_normal((b, 2, h, dh)).astype(np.float32)
  k, v = (rng.standard_normal((b, kvh, t, dh)).astype(np.float32) for _ in range(2))
  key_mask = rng.random((b, t)) < 0.7
  key_mask[:, -1] = True
  kt = jnp.asarray(k.transpose(0, 1, 3, 2))
  one = np.asarray(attention.dot_product_attention(jnp.asarray(q[:, 1:]), kt, jnp.asarray(v),
                                                   jnp.asarray(key_mask[:, None, :]), keys_transposed=True))
  for bi in range(b):
    for hi in range(h):
      kh = hi // (h // kvh)
      keys = np.flatnonzero(key_mask[bi])
      sc = k[bi, kh, keys] @ q[bi, 1, hi] / np.sqrt(dh)
      p = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
      np.testing.assert_allclose(one[bi, 0, hi], p @ v[bi, kh, keys], rtol=1e-5, atol=1e-6)
  one_slot_major = attention.dot_product_attention(jnp.asarray(q[:, 1:]), jnp.asarray(k), jnp.asarray(v),
                                                   jnp.asarray(key_mask[:, None, :]))
  np.testing.assert_allclose(np.asarray(one_slot_major), one, rtol=1e-5, atol=1e-6)
  two_mask = jnp.asarray(np.repeat(key_mask[:, None, :], 2, axis=1))
  two = attention.dot_product_attention(jnp.asarray(q), kt, jnp.asarray(v), two_mask, keys_transposed=True)
  slot_major = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), two_mask)
  np.testing.assert_allclose(one[:, 0], np.asarray(two)[:, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(two), np.asarray(slot_major), rtol=1e-5, atol=1e-6)


def test_logits_at_projects_only_those_positions():
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  positions = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
  model = Transformer(CONFIG)
  params = nn.unbox(model.init(jax.random.key(0), tokens, positions, mask)["params"])
  full, _ = model.apply({"params": params}, tokens, positions, mask)
  part, _ = model.apply({"params": params}, tokens, positions, mask, logits_at=slice(4, 8))
  assert part.shape == (2, 4, CONFIG.vocab_size)
  np.testing.assert_allclose(part, full[:, 4:8], rtol=1e-5, atol=1e-5)
