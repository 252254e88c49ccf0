"""P3O: float64 reference (both variants), gradients, shift invariance, swap symmetry, on-policy gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from algorithms import p3o
from rlj import sharding

import algo_reference as ref_impl

TOL = dict(rtol=1e-5, atol=1e-6)
_loss = jax.jit(p3o.loss, static_argnames=("clip_eps", "kl_coef", "ratio_clip", "variant", "avg_tokenwise"))


def _batch(b=4, t=6, seed=0, spread=0.05):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, size=(b, 2, t))
  old = logp + rng.normal(0, spread, size=(b, 2, t))
  ref = logp + rng.normal(0, 0.1, size=(b, 2, t))
  rewards = rng.normal(size=(b, 2))
  lens = rng.integers(1, t + 1, size=(b, 2))
  mask = (np.arange(t)[None, None, :] < lens[..., None]).astype(np.float64)
  return logp, old, ref, rewards, mask


CONFIGS = [dict(variant="joint"), dict(variant="joint", avg_tokenwise=True, kl_coef=0.1),
           dict(variant="separate", clip_eps=0.02), dict(variant="joint", clip_eps=0.01, ratio_clip=1.05)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_reference_value_and_gradient(cfg):
  logp, old, ref, rewards, mask = _batch()
  value, metrics = _loss(*(x.astype(np.float32) for x in (logp, old, ref, rewards, mask)), **cfg)
  np.testing.assert_allclose(value, ref_impl.p3o_loss(logp, old, ref, rewards, mask, **cfg), rtol=1e-4, atol=1e-6)
  assert 1 / cfg.get("ratio_clip", 10.0) <= float(metrics["ratio_min"]) or float(metrics["ratio_clipped_frac"]) > 0
  with jax.enable_x64(True):
    grad = jax.grad(lambda lp: p3o.loss(lp, old, ref, rewards, mask, **cfg)[0])(jnp.asarray(logp))
    fd = ref_impl.finite_diff(lambda lp: ref_impl.p3o_loss(lp, old, ref, rewards, mask, frozen=logp, **cfg), logp)
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["joint", "separate"])
def test_shift_invariance_and_swap_symmetry(variant):
  logp, old, ref, rewards, mask = (x.astype(np.float32) for x in _batch(seed=1))
  rewards = np.round(rewards * 64) / 64  # dyadic rewards: r + shift and the difference are exact in float32
  shift = np.array([[3.0], [-7.0], [0.5], [100.0]], np.float32)
  vg = jax.jit(jax.value_and_grad(lambda lp, r: p3o.loss(lp, old, ref, r, mask, variant=variant)[0]))
  v0, g0 = vg(logp, rewards)
  v1, g1 = vg(logp, rewards + shift)
  np.testing.assert_allclose(v1, v0, atol=1e-7)
  np.testing.assert_allclose(g1, g0, atol=1e-7)
  swap = lambda x: x[:, ::-1]
  v2, _ = _loss(swap(logp), swap(old), swap(ref), swap(rewards), swap(mask), variant=variant)
  np.testing.assert_allclose(v2, v0, rtol=1e-6, atol=1e-7)


def test_equal_pair_gives_zero_and_on_policy_gradient():
  logp, old, ref, rewards, mask = (x.astype(np.float32) for x in _batch(seed=2))
  same = lambda x: np.repeat(x[:, :1], 2, axis=1)
  vg = jax.jit(jax.value_and_grad(lambda lp, o, r, rw, m, c: p3o.loss(lp, o, r, rw, m, kl_coef=c)[0]))
  v, g = vg(same(logp), same(old), same(ref), same(rewards), same(mask), 0.05)
  assert float(v) == 0.0 and np.all(np.asarray(g) == 0.0)
  # at theta = theta_old: grad = -q/2 * grad(log pi(y1) - log pi(y2)), averaged over pairs
  kl_coef = 0.05
  _, grad = vg(logp, logp, ref, rewards, mask, kl_coef)
  lam = np.sum(mask * (logp - ref), -1)
  q = (rewards[:, 0] - rewards[:, 1]) - kl_coef * (lam[:, 0] - lam[:, 1])
  want = -0.5 * q[:, None, None] * np.array([1.0, -1.0])[None, :, None] * mask / logp.shape[0]
  np.testing.assert_allclose(grad, want, **TOL)


def test_pair_up_and_errors():
  x = jnp.arange(16.0).reshape(8, 2)
  pairs = p3o.pair_up(x, 4)
  assert pairs.shape == (4, 2, 2)
  np.testing.assert_array_equal(pairs[1], [[4, 5], [6, 7]])
  np.testing.assert_array_equal(p3o.pair_up(jnp.arange(8.0).reshape(2, 4).reshape(-1), 4), [[0, 1], [2, 3], [4, 5],
                                                                                              [6, 7]])
  with pytest.raises(ValueError, match="even"):
    p3o.pair_up(x, 3)
  with pytest.raises(ValueError, match="variant"):
    p3o.loss(*(x.astype(np.float32) for x in _batch()), variant="tokens")


def test_sharded_over_8_devices_equals_one_device():
  mesh = sharding.make_mesh([("data", 8)])
  args = [x.astype(np.float32) for x in _batch(b=16, seed=3)]
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args]
  for variant in ("joint", "separate"):
    f = jax.jit(jax.value_and_grad(functools.partial(lambda *a, v: p3o.loss(*a, variant=v)[0], v=variant)))
    v1, g1 = f(*args)
    v8, g8 = f(*sharded)
    np.testing.assert_allclose(v8, v1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-8)
