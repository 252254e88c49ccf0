"""The adaptive KL controller (Ziegler et al., arXiv:1909.08593, Sec. 2.2) against a plain loop, and the running
moments against numpy over the whole history."""
import numpy as np
import pytest

from algorithms import kl_control, running_moments


def _reference_betas(beta, kls, target, horizon, n_steps):
  out = []
  for kl in kls:
    error = (kl - target) / target
    error = min(max(error, -0.2), 0.2)
    beta = beta * (1 + n_steps / horizon * error)
    out.append(beta)
  return out


def test_kl_controller_follows_a_plain_loop_over_a_kl_sequence():
  rng = np.random.default_rng(0)
  kls = np.concatenate([rng.uniform(0, 0.5, 20), [0.1, 0.1, 1e-9, 3.0]])   # around, at, far below, far above target
  beta, got = 0.05, []
  for kl in kls:
    beta = kl_control.adaptive_kl_update(beta, kl, target=0.1, horizon=200.0, n_steps=64)
    got.append(beta)
  np.testing.assert_allclose(got, _reference_betas(0.05, kls, 0.1, 200.0, 64), rtol=1e-12)
  assert got[21] == got[20] == got[19]                           # KL at the target: no change
  assert got[22] == pytest.approx(got[21] * (1 - 0.2 * 64 / 200))  # far below: the clipped error -0.2
  assert got[23] == pytest.approx(got[22] * (1 + 0.2 * 64 / 200))  # far above: +0.2


def test_kl_controller_error_is_clipped_and_target_checked():
  assert kl_control.proportional_error(10.0, 0.1) == 0.2
  assert kl_control.proportional_error(0.0, 0.1) == -0.2
  assert kl_control.proportional_error(0.15, 0.1) == pytest.approx(0.2)    # 0.5, clipped
  assert kl_control.proportional_error(0.11, 0.1) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="target"):
    kl_control.proportional_error(0.1, 0.0)


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (5, 17, 2, 40), (64,), (3, 0, 8)])
def test_running_moments_equal_numpy_over_the_concatenated_history(sizes):
  rng = np.random.default_rng(len(sizes))
  m, seen = running_moments.Moments(), []
  for i, n in enumerate(sizes):
    batch = rng.normal(loc=3.0 * i, scale=1.0 + i, size=n)
    m = running_moments.update(m, batch)
    seen.append(batch)
    history = np.concatenate(seen)
    assert m.count == history.size
    if history.size:
      np.testing.assert_allclose(m.mean, history.mean(), rtol=1e-12, atol=1e-12)
    for ddof in (0, 1):
      want = history.std(ddof=ddof) if history.size > ddof else 0.0
      np.testing.assert_allclose(running_moments.std(m, ddof=ddof), want, rtol=1e-10, atol=1e-12)


def test_running_moments_skip_missing_values():
  m = running_moments.update(running_moments.Moments(), [1.0, np.nan, 3.0, np.inf])
  assert (m.count, m.mean) == (2.0, 2.0)
  assert running_moments.std(m) == pytest.approx(np.std([1.0, 3.0], ddof=1))
