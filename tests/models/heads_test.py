"""BT and IQN heads: numpy forward references, cosine index convention, monotone options, quantile fitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import heads
from rewards import quantile

B, D, N = 3, 8, 5


def _np(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(params))


def _iqn_reference(p, feature, taus, n_cos):
  """Slow per-(row, tau) numpy forward of the raw IQN head."""
  out = np.zeros(taus.shape)
  for b in range(taus.shape[0]):
    for j, tau in enumerate(taus[b]):
      c = np.array([np.cos(np.pi * i * tau) for i in range(1, n_cos + 1)])
      phi = np.maximum(c @ p["tau_kernel"] + p["tau_bias"], 0)
      h = np.maximum((feature[b] * phi) @ p["mlp_kernel"] + p["mlp_bias"], 0)
      out[b, j] = h @ p["out_kernel"] + p["out_bias"][0]
  return out


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return rng.normal(size=(B, D)).astype(np.float32), np.sort(rng.uniform(size=(B, N)), -1).astype(np.float32)


def test_cosine_features_start_at_one():
  taus = jnp.asarray(np.random.default_rng(1).uniform(size=200), jnp.float32)
  c = np.asarray(heads.cosine_features(taus, 64))
  assert c.shape == (200, 64)
  assert np.all(c.std(axis=0) > 1e-3)                   # no constant column (the i = 0 convention would add one)
  np.testing.assert_allclose(c[:, 0], np.cos(np.pi * np.asarray(taus)), rtol=1e-5, atol=1e-6)


def test_bt_head_matches_numpy_and_is_boxed(inputs):
  feature, _ = inputs
  head = heads.BTHead()
  boxed = head.init(jax.random.key(0), feature)["params"]
  assert nn.get_partition_spec(boxed)["kernel"] == jax.P("embed")
  p = _np(boxed)
  out = head.apply({"params": nn.unbox(boxed)}, feature)
  assert out.shape == (B,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, feature @ p["kernel"] + p["bias"][0], rtol=1e-5, atol=1e-5)


def test_iqn_head_matches_numpy_reference(inputs):
  feature, taus = inputs
  head = heads.IQNHead(num_cosines=16, hidden_dim=12)
  boxed = head.init(jax.random.key(1), feature, taus)["params"]
  specs = nn.get_partition_spec(boxed)
  assert specs["mlp_kernel"] == jax.P("embed", "mlp") and specs["tau_kernel"] == jax.P(None, "embed")
  params = nn.unbox(boxed)
  out = head.apply({"params": params}, feature, taus)
  assert out.shape == (B, N) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _iqn_reference(_np(boxed), feature, taus, 16), rtol=1e-4, atol=1e-5)
  # Shared taus [N] equal the same taus broadcast to [B, N].
  np.testing.assert_allclose(head.apply({"params": params}, feature, taus[0]),
                             head.apply({"params": params}, feature, np.tile(taus[:1], (B, 1))), rtol=1e-6)
  with pytest.raises(ValueError):
    head.apply({"params": params}, feature, taus[:2])


def test_monotone_options(inputs):
  feature, taus = inputs
  raw = heads.IQNHead(num_cosines=16)
  params = nn.unbox(raw.init(jax.random.key(2), feature, taus)["params"])
  shuffled = taus[:, ::-1]
  v_raw = np.asarray(raw.apply({"params": params}, feature, taus), np.float64)
  v_sort = heads.IQNHead(num_cosines=16, monotone="sort").apply({"params": params}, feature, shuffled)
  np.testing.assert_allclose(v_sort, np.sort(v_raw, -1), rtol=1e-5, atol=1e-6)
  v_cum = heads.IQNHead(num_cosines=16, monotone="cumsoftplus").apply({"params": params}, feature, shuffled)
  ref = np.cumsum(np.concatenate([v_raw[:, :1], np.log1p(np.exp(v_raw[:, 1:]))], -1), -1)
  np.testing.assert_allclose(v_cum, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(v_cum), axis=-1) >= 0)
  with pytest.raises(ValueError):
    heads.IQNHead(monotone="isotonic").init(jax.random.key(0), feature, taus)


def test_iqn_head_fits_a_known_distribution():
  """Trained with the quantile Huber loss on samples of U(0, 4), q(tau) approaches 4 tau."""
  head = heads.IQNHead(num_cosines=16, hidden_dim=16)
  feature = jnp.ones((1, 4))
  params = nn.unbox(head.init(jax.random.key(3), feature, jnp.full((1, 16), 0.5))["params"])
  targets = jnp.linspace(0.0, 4.0, 65)[None, :]          # [1, M]: an empirical U(0, 4)
  tx = optax.adam(2e-2)

  @jax.jit
  def train(params, key):
    def step(carry, k):
      params, opt = carry
      taus = jax.random.uniform(k, (1, 16))
      loss, g = jax.value_and_grad(lambda p: quantile.huber_loss(head.apply({"params": p}, feature, taus), taus,
                                                                 targets, kappa=0.1))(params)
      upd, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, upd), opt), loss
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, 300))
    return params, losses

  params, losses = train(params, jax.random.key(4))
  grid = quantile.midpoint_taus(8)[None, :]
  q = np.asarray(head.apply({"params": params}, feature, grid))[0]
  np.testing.assert_allclose(q, 4 * np.asarray(grid[0]), atol=0.25)
  assert float(losses[-30:].mean()) < float(losses[:30].mean())
