"""Bradley-Terry loss: ALGORITHMS.md section 7 vectors, a numpy reference and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewards import bradley_terry

_loss = jax.jit(bradley_terry.loss, static_argnames=("center_coef",))


def _reference(r_w, r_l, margin, center_coef):
  per = [np.log1p(np.exp(-(w - l - m))) for w, l, m in zip(r_w, r_l, np.broadcast_to(margin, r_w.shape))]
  return np.mean(per) + center_coef * np.mean([(w + l) ** 2 for w, l in zip(r_w, r_l)])


@pytest.mark.parametrize("r_w, r_l, margin, center, expected", [
    (0.0, 0.0, 0.0, 0.0, 0.693147),
    (1.0, 0.0, 0.0, 0.0, 0.313262),
    (1.0, 0.0, 1.0, 0.0, 0.693147),
    (2.0, 1.0, 0.0, 0.01, 0.403262),
])
def test_vectors(r_w, r_l, margin, center, expected):
  loss, _ = _loss(jnp.array([r_w]), jnp.array([r_l]), margin=margin, center_coef=center)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_matches_numpy_reference_with_per_pair_margin():
  rng = np.random.default_rng(0)
  r_w, r_l = rng.normal(size=(2, 16)) * 3
  margin = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=16)
  loss, m = _loss(jnp.asarray(r_w, jnp.float32), jnp.asarray(r_l, jnp.float32),
                  margin=jnp.asarray(margin, jnp.float32), center_coef=0.01)
  np.testing.assert_allclose(loss, _reference(r_w, r_l, margin, 0.01), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["accuracy"], np.mean(r_w > r_l), rtol=1e-6)
  np.testing.assert_allclose(m["margin"], np.mean(r_w - r_l), rtol=1e-5, atol=1e-6)


def test_shift_invariance_and_symmetry_bound():
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 8)))
  base, _ = _loss(a, b)
  shifted, _ = _loss(a + 7.5, b + 7.5)
  np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-6)
  # L(a, b) + L(b, a) >= 2 log 2 per pair, equality iff a == b.
  per = jax.vmap(lambda x, y: _loss(x[None], y[None])[0] + _loss(y[None], x[None])[0])(a, b)
  assert np.all(np.asarray(per) > 2 * np.log(2))
  eq, _ = _loss(a, a)
  np.testing.assert_allclose(2 * eq, 2 * np.log(2), rtol=1e-6)


def test_gradient_is_minus_sigmoid_and_stable():
  r_w = jnp.array([0.5, -2.0, 80.0, -80.0])
  r_l = jnp.array([0.0, 1.0, -80.0, 80.0])
  g = jax.grad(lambda w: bradley_terry.loss(w, r_l)[0])(r_w)
  np.testing.assert_allclose(g, -jax.nn.sigmoid(r_l - r_w) / 4, rtol=1e-5, atol=1e-7)
  loss, _ = _loss(r_w, r_l)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, (np.log1p(np.exp(-0.5)) + np.log1p(np.exp(3.0)) + 0.0 + 160.0) / 4, rtol=1e-5)


def test_tie_counts_as_wrong():
  _, m = _loss(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(m["accuracy"], 0.5)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError):
    bradley_terry.loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)))
  with pytest.raises(ValueError):
    bradley_terry.loss(jnp.zeros(3), jnp.zeros(3), margin=jnp.zeros(2))
