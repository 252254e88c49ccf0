"""KL estimators: the ALGORITHMS.md test vector, exact expectations and float64 gradient identities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import kl

import algo_reference as ref_impl


def test_vector():
  logp, ref = jnp.float32(-1.0), jnp.float32(-1.5)
  want = {"k1": 0.5, "k2": 0.125, "k3": 0.1065307, "k3_ratio": 0.1065307}
  for kind, value in want.items():
    got = kl.estimate(logp, ref, kind, old_logp=logp)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6)


def test_matches_reference_and_zero_at_equal():
  rng = np.random.default_rng(0)
  logp = rng.normal(-2, 1, size=(4, 8)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=(4, 8))).astype(np.float32)
  old = (logp + rng.normal(0, 0.1, size=(4, 8))).astype(np.float32)
  for kind in kl.KINDS:
    got = kl.estimate(logp, ref, kind, old_logp=old)
    want = ref_impl.k_estimate(logp.astype(np.float64), ref.astype(np.float64), kind, old.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl.estimate(logp, logp, kind, old_logp=old), 0.0, atol=1e-7)
    if kind in ("k2", "k3", "k3_ratio"):
      assert np.all(np.asarray(got) >= 0)


def test_value_clip_clamp_and_errors():
  logp = jnp.array([0.0, -100.0])
  ref = jnp.array([-100.0, 0.0])
  k3 = kl.estimate(logp, ref, "k3")
  assert np.all(np.isfinite(k3))
  np.testing.assert_allclose(k3[1], np.expm1(20.0) - 20.0, rtol=1e-6)  # delta clamped at +20
  np.testing.assert_allclose(kl.estimate(logp, ref, "k3", value_clip=10.0), [10.0, 10.0])
  with pytest.raises(ValueError, match="old_logp"):
    kl.estimate(logp, ref, "k3_ratio")
  with pytest.raises(ValueError, match="unknown"):
    kl.estimate(logp, ref, "k4")


def _categorical():
  theta = np.array([0.3, -1.2, 0.8, 0.1, -0.4])
  q = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
  return theta, q


def test_expectations_under_the_policy():
  """E_pi[k1] = E_pi[k3] = E_pi[k3_ratio] = KL(pi || ref) exactly; E_pi[k2] is biased."""
  with jax.enable_x64(True):
    theta, q = _categorical()
    logp = jax.nn.log_softmax(jnp.asarray(theta))
    logq = jnp.log(jnp.asarray(q))
    pi = jnp.exp(logp)
    reverse = float(jnp.sum(pi * (logp - logq)))
    for kind in ("k1", "k3", "k3_ratio"):
      expect = float(jnp.sum(pi * kl.estimate(logp, logq, kind, old_logp=logp)))
      np.testing.assert_allclose(expect, reverse, rtol=1e-12)
    k2 = float(jnp.sum(pi * kl.estimate(logp, logq, "k2")))
    assert abs(k2 - reverse) > 1e-3


def test_gradient_identities_float64():
  """sum_y pi(y) grad(estimator) in the loss: k1 -> 0, k2 -> reverse, k3 -> forward, k3_ratio -> reverse."""
  with jax.enable_x64(True):
    theta, q = _categorical()
    theta = jnp.asarray(theta)
    logq = jnp.log(jnp.asarray(q))

    def surrogate(th, kind):
      logp = jax.nn.log_softmax(th)
      weight = jax.lax.stop_gradient(jnp.exp(logp))  # samples y ~ pi, weighted exactly
      est = kl.estimate(logp, logq, kind, old_logp=jax.lax.stop_gradient(logp))
      assert est.dtype == jnp.float64
      return jnp.sum(weight * est)

    def reverse(th):
      logp = jax.nn.log_softmax(th)
      return jnp.sum(jnp.exp(logp) * (logp - logq))

    def forward(th):
      return jnp.sum(jnp.exp(logq) * (logq - jax.nn.log_softmax(th)))

    g_rev, g_fwd = jax.grad(reverse)(theta), jax.grad(forward)(theta)
    assert np.max(np.abs(g_rev - g_fwd)) > 1e-2  # the two targets really differ here
    want = {"k1": jnp.zeros_like(theta), "k2": g_rev, "k3": g_fwd, "k3_ratio": g_rev}
    for kind, target in want.items():
      got = jax.grad(surrogate)(theta, kind)
      np.testing.assert_allclose(got, target, atol=1e-8, err_msg=kind)
  assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak
