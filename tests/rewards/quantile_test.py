"""Quantile Huber loss, pairwise distributional loss, preference probability and scalarisations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewards import bradley_terry, quantile

TAUS = jnp.array([0.25, 0.75])
PRED = jnp.array([0.0, 1.0])
TARGET = jnp.array([0.5, 2.0])


def _huber_reference(pred, taus, target, kappa):
  """Slow loops over (example, i, j), float64."""
  out = []
  for p_b, t_b, y_b in zip(pred.reshape(-1, pred.shape[-1]), taus.reshape(-1, taus.shape[-1]),
                           target.reshape(-1, target.shape[-1])):
    total = 0.0
    for p, t in zip(p_b, t_b):
      acc = 0.0
      for y in y_b:
        d = y - p
        w = abs(t - (1.0 if d < 0 else 0.0))
        if kappa == 0:
          acc += w * abs(d)
        else:
          h = 0.5 * d * d if abs(d) <= kappa else kappa * (abs(d) - 0.5 * kappa)
          acc += w * h / kappa
      total += acc / len(y_b)
    out.append(total)
  return np.mean(out)


@pytest.mark.parametrize("kappa, expected", [(1.0, 0.40625), (2.0, 0.234375), (0.0, 0.75)])
def test_huber_vectors(kappa, expected):
  np.testing.assert_allclose(quantile.huber_loss(PRED, TAUS, TARGET, kappa=kappa), expected, rtol=1e-5, atol=1e-6)


def test_huber_rlax_convention_differs_by_kappa():
  # rlax does not divide by kappa: its value at kappa=2 is ours times 2 (0.46875).
  np.testing.assert_allclose(2.0 * quantile.huber_loss(PRED, TAUS, TARGET, kappa=2.0), 0.46875, rtol=1e-6)


@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0, 3.0])
def test_huber_matches_reference_batched_n_ne_m(kappa):
  rng = np.random.default_rng(int(kappa * 10))
  pred = rng.normal(size=(3, 5)) * 2
  taus = rng.uniform(size=(3, 5))
  target = rng.normal(size=(3, 7)) * 2
  got = quantile.huber_loss(*(jnp.asarray(x, jnp.float32) for x in (pred, taus, target)), kappa=kappa)
  np.testing.assert_allclose(got, _huber_reference(pred, taus, target, kappa), rtol=1e-5, atol=1e-6)


def test_pinball_minimiser_is_empirical_quantile_and_small_kappa_limit():
  target = jnp.asarray(np.random.default_rng(3).permutation(np.arange(10.0)) * 1.3, jnp.float32)
  tau = 0.35
  cands = jnp.sort(target)
  losses = jax.vmap(lambda c: quantile.huber_loss(c[None], jnp.array([tau]), target, kappa=0.0))(cands)
  # d/dc = (1 - tau) #below - tau #above vanishes between order statistics 3 and 4: the 4th smallest wins.
  assert int(jnp.argmin(losses)) == 3
  pinball = quantile.huber_loss(PRED, TAUS, TARGET, kappa=0.0)
  np.testing.assert_allclose(quantile.huber_loss(PRED, TAUS, TARGET, kappa=1e-4), pinball, rtol=1e-3)


def test_huber_no_gradient_through_targets():
  g = jax.grad(lambda t: quantile.huber_loss(PRED, TAUS, t))(TARGET)
  np.testing.assert_array_equal(g, 0.0)


def test_preference_prob_vector_hard_and_soft():
  qa, qb = jnp.array([0.0, 1.0, 2.0, 3.0]), jnp.array([0.5, 1.0, 1.5, 2.0])
  np.testing.assert_allclose(quantile.preference_prob(qa, qb), 0.5625, rtol=1e-6)
  np.testing.assert_allclose(quantile.preference_prob(qa, qb, temperature=0.1), 0.5625, rtol=1e-5, atol=1e-6)


def test_preference_prob_matches_reference_and_complements():
  rng = np.random.default_rng(4)
  qa, qb = rng.normal(size=(2, 3, 6))
  ref = np.array([np.mean([[1 / (1 + np.exp(-(x - y) / 0.7)) for y in b] for x in a]) for a, b in zip(qa, qb)])
  qa, qb = jnp.asarray(qa, jnp.float32), jnp.asarray(qb, jnp.float32)
  np.testing.assert_allclose(quantile.preference_prob(qa, qb, temperature=0.7), ref, rtol=1e-5, atol=1e-6)
  for t in (None, 0.7):
    total = quantile.preference_prob(qa, qb, temperature=t) + quantile.preference_prob(qb, qa, temperature=t)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
  np.testing.assert_allclose(quantile.preference_prob(qa, qa), 0.5, rtol=1e-6)
  # As T -> 0 the soft probability tends to the hard one (distinct values).
  np.testing.assert_allclose(quantile.preference_prob(qa, qb, temperature=1e-4), quantile.preference_prob(qa, qb),
                             atol=1e-4)


_pairwise = jax.jit(quantile.pairwise_loss, static_argnames=("temperature", "center_coef", "mean_anchor_coef"))


def test_pairwise_single_quantile_is_bradley_terry():
  rng = np.random.default_rng(5)
  w, l = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 8)) * 2)
  bt, bt_m = bradley_terry.loss(w, l, center_coef=0.01)
  pw, pw_m = _pairwise(w[:, None], l[:, None], center_coef=0.01)
  np.testing.assert_allclose(pw, bt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pw_m["accuracy"], bt_m["accuracy"])
  # All quantiles equal within each response: still BT.
  pw4, _ = _pairwise(jnp.tile(w[:, None], (1, 4)), jnp.tile(l[:, None], (1, 4)), center_coef=0.01)
  np.testing.assert_allclose(pw4, bt, rtol=1e-5, atol=1e-6)


def test_pairwise_matches_reference_and_properties():
  rng = np.random.default_rng(6)
  qw, ql = rng.normal(size=(2, 4, 5))
  t = 0.5
  ref = -np.mean([np.log(np.mean(1 / (1 + np.exp(-(a[:, None] - b[None, :]) / t)))) for a, b in zip(qw, ql)])
  qw, ql = jnp.asarray(qw, jnp.float32), jnp.asarray(ql, jnp.float32)
  loss, m = _pairwise(qw, ql, temperature=t)
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
  shift = jnp.arange(4.0)[:, None] * 3.0
  np.testing.assert_allclose(_pairwise(qw + shift, ql + shift, temperature=t)[0], loss, rtol=1e-5, atol=1e-6)
  same, _ = _pairwise(qw, qw, temperature=t)   # identical distributions: P = 0.5, loss log 2
  np.testing.assert_allclose(same, np.log(2), rtol=1e-6)
  assert m["accuracy"].shape == () and 0.0 <= float(m["pref_prob"]) <= 1.0
  # P is non-decreasing in every chosen quantile.
  g = jax.grad(lambda q: _pairwise(q, ql, temperature=t)[0])(qw)
  assert np.all(np.asarray(g) <= 0)


def test_pairwise_is_stable_for_large_gaps():
  loss, _ = _pairwise(jnp.array([[-200.0, 300.0]]), jnp.array([[250.0, 400.0]]))
  grad = jax.grad(lambda q: _pairwise(q, jnp.array([[250.0, 400.0]]))[0])(jnp.array([[-200.0, 300.0]]))
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_scalarize_matches_numpy():
  rng = np.random.default_rng(7)
  q = rng.normal(size=(3, 8))
  jq = jnp.asarray(q, jnp.float32)
  s = np.sort(q, axis=-1)
  np.testing.assert_allclose(quantile.scalarize(jq), q.mean(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(quantile.scalarize(jq, kind="cvar", alpha=0.25), s[:, :2].mean(-1), rtol=1e-5)
  np.testing.assert_allclose(quantile.scalarize(jq, kind="cvar", alpha=0.3), s[:, :3].mean(-1), rtol=1e-5)
  taus = np.asarray(quantile.midpoint_taus(8))
  for alpha in (0.02, 0.3, 0.5, 0.99):
    ref = [np.interp(alpha, taus, row) for row in s]
    np.testing.assert_allclose(quantile.scalarize(jq, kind="quantile", alpha=alpha), ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    quantile.scalarize(jq, kind="median")


def test_midpoint_grid_and_crossing_penalty():
  np.testing.assert_allclose(quantile.midpoint_taus(4), [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_allclose(quantile.crossing_penalty(jnp.array([[0.0, 1.0, 0.5, 2.0]])), 0.5)
  np.testing.assert_allclose(quantile.crossing_penalty(jnp.array([[0.0, 1.0, 1.5, 2.0]])), 0.0)
