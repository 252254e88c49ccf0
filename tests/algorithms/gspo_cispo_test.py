"""GSPO and CISPO against float64 numpy references (values and gradients), on ragged masks, and their rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import cispo, grpo, gspo



@pytest.fixture(autouse=True)
def x64():
  """float64 for the references and the losses' float64 path, in this module's tests only."""
  with jax.enable_x64(True):
    yield

N, T = 6, 7


def _inputs(seed=0, spread=0.05):
  rng = np.random.default_rng(seed)
  lengths = np.array([7, 1, 4, 0, 6, 3])                     # ragged, one empty row
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
  old = rng.normal(-2.0, 0.5, (N, T))
  logp = old + rng.normal(0.0, spread, (N, T))
  adv = rng.normal(size=N)
  return logp, old, adv, mask


def _gspo_ref(logp, old, adv, mask, lo, hi):
  """Loss and d loss / d logp of GSPO (sequence), by the definitions: s_i, min(s A, clip(s) A), mean over rows."""
  rows = mask.sum(-1) > 0
  n = rows.sum()
  loss, grad = 0.0, np.zeros_like(logp)
  for i in range(N):
    if not rows[i]:
      continue
    length = mask[i].sum()
    s = np.exp(((logp[i] - old[i]) * mask[i]).sum() / length)
    unclipped, clipped = s * adv[i], np.clip(s, 1 - lo, 1 + hi) * adv[i]
    loss -= min(unclipped, clipped) / n
    if unclipped <= clipped or 1 - lo < s < 1 + hi:            # the min's branch carries d s / d logp
      grad[i] = -adv[i] * s * mask[i] / length / n
  return loss, grad


def _cispo_ref(logp, old, adv, mask, lo, hi):
  """Loss and gradient of CISPO: -(1 / n_tok) sum w A logp with w = clip(r) held constant."""
  n_tok = mask.sum()
  w = np.clip(np.exp(logp - old), 1 - lo, 1 + hi)
  loss = -(w * adv[:, None] * logp * mask).sum() / n_tok
  return loss, -(w * adv[:, None] * mask) / n_tok


@pytest.mark.parametrize("spread,lo,hi", [(0.05, 3e-4, 4e-4), (0.02, 0.2, 0.3), (0.3, 0.05, 0.05)])
def test_gspo_matches_the_reference_in_value_and_gradient(spread, lo, hi):
  logp, old, adv, mask = _inputs(1, spread)
  f = lambda lp, variant: gspo.loss(lp, old, None, adv, mask, clip_eps=lo, clip_eps_high=hi, variant=variant)[0]  # noqa: E731
  ref_loss, ref_grad = _gspo_ref(logp, old, adv, mask, lo, hi)
  for variant in gspo.VARIANTS:   # with one advantage per sequence GSPO-token equals GSPO, value and gradient
    np.testing.assert_allclose(f(logp, variant), ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.grad(f)(logp, variant), ref_grad, rtol=1e-10, atol=1e-12)


def test_gspo_with_one_token_per_sequence_is_grpo():
  """|y_i| = 1: s_i is GRPO's token ratio, and GSPO's loss is GRPO's sequence-mean-token-mean surrogate."""
  logp, old, adv, _ = _inputs(2, 0.3)
  mask = np.zeros((N, T))
  mask[:, 2] = 1.0
  kw = dict(clip_eps=0.2, clip_eps_high=0.28)
  g = lambda lp: gspo.loss(lp, old, None, adv, mask, **kw)[0]  # noqa: E731
  r = lambda lp: grpo.loss(lp, old, None, adv, mask, agg="seq_mean_token_mean", **kw)[0]  # noqa: E731
  np.testing.assert_allclose(g(logp), r(logp), rtol=1e-10)
  np.testing.assert_allclose(jax.grad(g)(logp), jax.grad(r)(logp), rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(np.exp(gspo.sequence_log_ratio(logp, old, mask)), np.exp(logp - old)[:, 2])


@pytest.mark.parametrize("lo,hi", [(1.0, 0.28), (0.1, 0.1)])
def test_cispo_matches_the_reference_and_keeps_clipped_tokens_gradients(lo, hi):
  logp, old, adv, mask = _inputs(3, 0.4)
  f = lambda lp: cispo.loss(lp, old, None, adv, mask, clip_eps=lo, clip_eps_high=hi)[0]  # noqa: E731
  ref_loss, ref_grad = _cispo_ref(logp, old, adv, mask, lo, hi)
  np.testing.assert_allclose(f(logp), ref_loss, rtol=1e-10)
  grad = np.asarray(jax.grad(f)(logp))
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
  ratio = np.exp(logp - old)
  outside = ((ratio > 1 + hi) | (ratio < 1 - lo)) & (mask > 0) & (adv[:, None] != 0)
  assert outside.any() and np.all(grad[outside] != 0)          # PPO's clip would have zeroed these
  _, m = cispo.loss(logp, old, None, adv, mask, clip_eps=lo, clip_eps_high=hi)
  np.testing.assert_allclose(m["clip_frac_high"], ((ratio > 1 + hi) * mask).sum() / mask.sum())


def test_losses_are_float32_under_float32_inputs_and_refuse_a_kl_without_reference():
  logp, old, adv, mask = (jnp.asarray(x, jnp.float32) for x in _inputs(4))
  for fn in (gspo.loss, cispo.loss):
    loss, metrics = fn(logp, old, None, adv, mask)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    with pytest.raises(ValueError, match="kl_coef"):
      fn(logp, old, None, adv, mask, kl_coef=0.1)
    loss_kl, m = fn(logp, old, old, adv, mask, kl_coef=0.1)
    assert "kl" in m and np.isfinite(loss_kl)
  with pytest.raises(ValueError, match="variant"):
    gspo.loss(logp, old, None, adv, mask, variant="tokens")
