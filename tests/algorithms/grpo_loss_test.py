"""GRPO: advantages (vectors, properties, RLOO), clipped surrogate (clip table, references, gradients), sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from algorithms import common
from algorithms import grpo
from rlj import sharding

import algo_reference as ref_impl

TOL = dict(rtol=1e-5, atol=1e-6)
_adv = jax.jit(grpo.advantages, static_argnames=("scale", "eps", "ddof"))


# ---------------------------------------------------------------------------------------------- advantages

def test_advantage_vectors():
  np.testing.assert_allclose(_adv(jnp.array([[1.0, 0, 0, 1]])),
                             [[0.865875, -0.865875, -0.865875, 0.865875]], **TOL)
  np.testing.assert_allclose(_adv(jnp.array([[1.0, 0, 0, 1]]), eps=0.0),
                             [[0.866025, -0.866025, -0.866025, 0.866025]], **TOL)
  np.testing.assert_allclose(_adv(jnp.array([[0.0, 1]])), [[-0.707007, 0.707007]], **TOL)
  np.testing.assert_allclose(_adv(jnp.array([[0.0, 1]]), ddof=0), [[-0.9998, 0.9998]], **TOL)
  np.testing.assert_allclose(_adv(jnp.array([[1.0, 2, 3, 4]]), scale="none"), [[-1.5, -0.5, 0.5, 1.5]],
                             **TOL)
  for scale in grpo.SCALES:
    for eps in (0.0, 1e-6, 1e-4):
      const = jnp.array([[3.0, 3, 3, 3], [0.1, 0.1, 0.1, 0.1]])
      assert np.all(np.asarray(_adv(const, scale=scale, eps=eps)) == 0.0)


def test_advantages_match_reference_and_properties():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(3, 5)).astype(np.float32)
  r_nan = r.copy()
  r_nan[0, 1] = np.nan
  r_nan[2, :4] = np.nan  # a singleton group -> 0
  shift = rng.normal(size=(3, 1)).astype(np.float32) * 5
  for scale in grpo.SCALES:
    a = np.asarray(_adv(r, scale=scale))
    np.testing.assert_allclose(a, ref_impl.group_adv(r, scale=scale), **TOL)
    np.testing.assert_allclose(_adv(r_nan, scale=scale), ref_impl.group_adv(r_nan, scale=scale), **TOL)
    np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-5)
    # per-prompt shifts for group/none; the batch std is only invariant to one shift of the whole batch
    shifted = r + (shift[:1] if scale == "batch" else shift)
    np.testing.assert_allclose(_adv(shifted, scale=scale), a, rtol=1e-4, atol=1e-4)
    perm = rng.permutation(5)
    np.testing.assert_allclose(_adv(r[:, perm], scale=scale), a[:, perm], **TOL)
    scaled = np.asarray(_adv(3.0 * r, scale=scale))
    np.testing.assert_allclose(scaled, 3.0 * a if scale == "none" else a, rtol=1e-3, atol=1e-4)
  assert np.all(np.asarray(_adv(r_nan))[2] == 0.0)
  assert np.asarray(_adv(r_nan))[0, 1] == 0.0


def test_rloo():
  rng = np.random.default_rng(1)
  r = rng.normal(size=(2, 4)).astype(np.float32)
  want = np.array([[r[b, g] - np.mean(np.delete(r[b], g)) for g in range(4)] for b in range(2)])
  got = grpo.rloo_advantages(r)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 0.0, atol=1e-5)
  assert np.all(np.asarray(grpo.rloo_advantages(jnp.array([[2.0, 2.0, 2.0], [1.0, np.nan, np.nan]]))) == 0)


def test_reward_metrics():
  m = grpo.reward_metrics(jnp.array([[1.0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]]))
  np.testing.assert_allclose(m["frac_reward_zero_std"], 2 / 3, **TOL)
  np.testing.assert_allclose(m["reward_mean"], 6 / 12, **TOL)


# ---------------------------------------------------------------------------------------------- the loss

_loss = jax.jit(grpo.loss, static_argnames=("clip_eps", "clip_eps_high", "dual_clip", "kl_coef", "kl_estimator",
                                             "agg", "max_len", "num_generations"))


def test_clip_table():
  rho = np.array([1.5, 1.5, 0.5, 0.5, 1.0], np.float32)
  adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0], np.float32)
  want = [-1.28, 1.5, -0.5, 0.8, -2.0]
  for i in range(5):
    logp = jnp.log(jnp.full((1, 1), rho[i]))
    zeros = jnp.zeros((1, 1))
    value, _ = _loss(logp, zeros, None, jnp.array(adv[i:i + 1]), jnp.ones((1, 1)), clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(value, want[i], **TOL)
  # dual clip caps a negative-advantage token at c * |A| for every ratio
  for r in (1.5, 4.0, 50.0):
    value, m = _loss(jnp.log(jnp.full((1, 1), r)), jnp.zeros((1, 1)), None, jnp.array([-1.0]), jnp.ones((1, 1)),
                     clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(value, min(r, 3.0), **TOL)
    assert float(value) <= 3.0
  with pytest.raises(ValueError, match="dual_clip"):
    grpo.loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), None, jnp.ones(1), jnp.ones((1, 1)), dual_clip=0.5)
  with pytest.raises(ValueError, match="kl_coef"):
    grpo.loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), None, jnp.ones(1), jnp.ones((1, 1)), kl_coef=0.1)


def _batch(n=8, t=8, seed=5, spread=0.3):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, size=(n, t))
  old = logp + rng.normal(0, spread, size=(n, t))
  ref = logp + rng.normal(0, 0.3, size=(n, t))
  adv = rng.normal(size=(n,))
  lens = rng.integers(1, t + 1, size=n)
  mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.float64)
  return logp, old, ref, adv, mask


CONFIGS = [
    dict(clip_eps=0.2, kl_coef=0.0, agg="token_mean"),
    dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", agg="seq_mean_token_mean"),
    dict(clip_eps=0.1, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3_ratio", agg="dr_grpo", max_len=10),
    dict(clip_eps=0.2, kl_coef=0.05, kl_estimator="k2", agg="seq_mean_token_sum"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_loss_matches_reference_value_and_gradient(cfg):
  logp, old, ref, adv, mask = _batch()
  f32 = [x.astype(np.float32) for x in (logp, old, ref, adv, mask)]
  value, _ = _loss(*f32, **cfg)
  np.testing.assert_allclose(value, ref_impl.grpo_loss(*f32, **cfg), **TOL)
  with jax.enable_x64(True):
    grad = jax.grad(lambda lp: grpo.loss(lp, old, ref, adv, mask, **cfg)[0])(jnp.asarray(logp))
    fd = ref_impl.finite_diff(lambda lp: ref_impl.grpo_loss(lp, old, ref, adv, mask, **cfg), logp)
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_on_policy_gradient_is_reinforce():
  logp, _, _, adv, mask = (x.astype(np.float32) for x in _batch())
  for eps in (0.05, 0.2):
    grad = jax.grad(lambda lp: grpo.loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, clip_eps=eps)[0])(logp)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), **TOL)


def test_fully_masked_rows_give_finite_zero_gradients():
  logp, old, ref, adv, mask = (x.astype(np.float32) for x in _batch())
  mask[1] = 0.0
  for agg in common.AGG_MODES:
    grad = jax.grad(lambda lp: grpo.loss(lp, old, ref, adv, mask, kl_coef=0.1, agg=agg, max_len=8)[0])(logp)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1] == 0)


def test_sign_regression_between_aggregations():
  """G=2, rewards [1, 0]; the negative completion is longer: token_mean and seq_mean_token_mean disagree in sign."""
  adv = np.asarray(grpo.advantages(jnp.array([[1.0, 0.0]]))).reshape(-1)
  t = 8
  mask = np.zeros((2, t), np.float32)
  mask[0, :2], mask[1, :] = 1.0, 1.0
  logp = np.full((2, t), -1.0, np.float32)
  old = logp - np.log(np.array([[1.15], [0.9]], np.float32))
  ref = logp - 0.05
  cfg = dict(clip_eps=0.2, kl_coef=0.04, kl_estimator="k3")
  smtm, _ = _loss(logp, old, ref, adv, mask, agg="seq_mean_token_mean", **cfg)
  tm, _ = _loss(logp, old, ref, adv, mask, agg="token_mean", **cfg)
  want_smtm = ref_impl.grpo_loss(*(x.astype(np.float64) for x in (logp, old, ref, adv, mask)),
                                 agg="seq_mean_token_mean", **cfg)
  want_tm = ref_impl.grpo_loss(*(x.astype(np.float64) for x in (logp, old, ref, adv, mask)), agg="token_mean", **cfg)
  np.testing.assert_allclose([smtm, tm], [want_smtm, want_tm], **TOL)
  assert float(smtm) < 0 < float(tm)


def test_metrics():
  logp = np.log(np.array([[1.5, 0.5, 1.0, 1.0], [1.0, 1.0, 0.7, 2.0]], np.float32))
  logp[1, 0] = 30.0  # clamped
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  adv = np.array([1.0, -1.0], np.float32)
  zeros = np.zeros_like(logp)
  _, m = _loss(logp, zeros, zeros, adv, mask, clip_eps=0.2, kl_coef=0.0, num_generations=2)
  np.testing.assert_allclose(m["clip_frac_high"], 1 / 7, **TOL)  # 1.5 with A > 0
  np.testing.assert_allclose(m["clip_frac_low"], 1 / 7, **TOL)  # 0.7 with A < 0
  np.testing.assert_allclose(m["num_clamped"], 1.0)
  np.testing.assert_allclose(m["ratio_min"], 0.5, **TOL)
  np.testing.assert_allclose(m["ratio_max"], np.exp(20.0), rtol=1e-5)
  np.testing.assert_allclose(m["adv_mean"], 0.0, atol=1e-7)
  np.testing.assert_allclose(m["frac_reward_zero_std"], 0.0)
  assert float(m["kl"]) > 0
  _, m0 = _loss(logp, zeros, zeros, np.zeros(2, np.float32), mask, num_generations=2)
  np.testing.assert_allclose(m0["frac_reward_zero_std"], 1.0)


def test_no_recompiles_across_calls():
  traces = []

  @jax.jit
  def step(logp, old, ref, adv, mask):
    traces.append(1)
    return jax.value_and_grad(lambda lp: grpo.loss(lp, old, ref, adv, mask, kl_coef=0.04)[0])(logp)

  for seed in (0, 1, 2):
    step(*(x.astype(np.float32) for x in _batch(seed=seed)))
  assert len(traces) == 1


def test_sharded_over_8_devices_equals_one_device():
  mesh = sharding.make_mesh([("data", 8)])
  logp, old, ref, adv, mask = (x.astype(np.float32) for x in _batch(n=16, seed=7))
  mask[3] = 0.0
  n_tok, n_seq = mask.sum(), float((mask.sum(-1) > 0).sum())
  rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(x, rows) for x in (logp, old, ref, adv, mask)]
  assert len(sharded[0].sharding.device_set) == 8

  @functools.partial(jax.jit, static_argnames=("agg",))
  def fn(logp, old, ref, adv, mask, *, agg):
    f = lambda lp: grpo.loss(lp, old, ref, adv, mask, clip_eps_high=0.28, kl_coef=0.1, agg=agg, num_tokens=n_tok,
                             num_seqs=n_seq, max_len=8)
    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    return value, metrics, grad

  for agg in common.AGG_MODES:
    v1, m1, g1 = fn(logp, old, ref, adv, mask, agg=agg)
    v8, m8, g8 = fn(*sharded, agg=agg)
    np.testing.assert_allclose(v8, v1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-8)
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
