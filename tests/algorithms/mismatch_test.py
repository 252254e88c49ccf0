"""Sampler-trainer mismatch: diagnostics and correction weights against float64 numpy references, and the weights
applied by the GRPO loss (values and gradients)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import grpo, mismatch

import algo_reference as ref_impl

LOW, HIGH = 0.8, 1.25


def _batch(n=6, t=7, seed=3, spread=0.3):
  """Ragged masks (one row fully masked), trainer log-probs and sampler log-probs that differ by ~spread."""
  rng = np.random.default_rng(seed)
  trainer = rng.normal(-1.5, 0.5, size=(n, t))
  sampler = trainer + rng.normal(0, spread, size=(n, 1)) + rng.normal(0, spread, size=(n, t))  # row offsets too
  mask = (np.arange(t)[None, :] < rng.integers(1, t + 1, size=n)[:, None]).astype(np.float64)
  mask[2] = 0.0
  return trainer, sampler, mask


def _ref_weights(trainer, sampler, mask, mode, low, high):
  """Loops in float64: one weight per token, 0 on masked tokens."""
  n, t = trainer.shape
  out = np.zeros((n, t))
  for i in range(n):
    valid = [j for j in range(t) if mask[i, j] > 0]
    seq_log = sum(trainer[i, j] - sampler[i, j] for j in valid) / max(len(valid), 1)
    for j in valid:
      if mode == "none":
        out[i, j] = 1.0
        continue
      log_w = seq_log if mode.startswith("sequence") else trainer[i, j] - sampler[i, j]
      w = math.exp(min(max(log_w, -20.0), 20.0))
      if mode.endswith("truncate"):
        out[i, j] = min(w, high)
      else:
        out[i, j] = w if low <= w <= high else 0.0
  return out


def _ref_diagnostics(trainer, sampler, mask, low, high):
  diffs, k3, tok_out, seq_out, rows = [], [], [], [], 0
  for i in range(trainer.shape[0]):
    d = [trainer[i, j] - sampler[i, j] for j in range(trainer.shape[1]) if mask[i, j] > 0]
    if not d:
      continue
    rows += 1
    diffs += [abs(x) for x in d]
    k3 += [math.exp(x) - 1 - x for x in d]               # r - 1 - log r, r = pi_trainer / pi_sampler
    tok_out += [not low <= math.exp(x) <= high for x in d]
    seq_out.append(not low <= math.exp(sum(d) / len(d)) <= high)
  return {"logp_abs_diff_mean": np.mean(diffs), "logp_abs_diff_max": max(diffs), "kl_k3": np.mean(k3),
          "frac_tokens_out": np.mean(tok_out), "frac_seqs_out": sum(seq_out) / rows}


@pytest.mark.parametrize("mode", mismatch.MODES)
def test_weights_match_float64_reference(mode):
  trainer, sampler, mask = _batch()
  want = _ref_weights(trainer, sampler, mask, mode, LOW, HIGH)
  assert mode == "none" or 0 < (want[mask > 0] != 1).sum()   # the batch exercises the band
  with jax.enable_x64(True):
    got = mismatch.weights(trainer, sampler, mask, mode=mode, low=LOW, high=HIGH)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  got32 = mismatch.weights(*(x.astype(np.float32) for x in (trainer, sampler, mask)), mode=mode, low=LOW, high=HIGH)
  np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-6)
  if mode.endswith("mask"):   # some tokens (token) / whole sequences (sequence) are masked out, some kept
    assert ((want == 0) & (mask > 0)).any() and (want[mask > 0] > 0).any()


def test_diagnostics_match_float64_reference():
  trainer, sampler, mask = _batch()
  want = _ref_diagnostics(trainer, sampler, mask, LOW, HIGH)
  with jax.enable_x64(True):
    got = jax.jit(mismatch.diagnostics)(trainer, sampler, mask, low=LOW, high=HIGH)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
  assert 0 < want["frac_tokens_out"] < 1 and 0 < want["frac_seqs_out"] < 1


def test_no_mismatch_is_all_zero_and_weights_one():
  trainer, _, mask = _batch()
  m = mismatch.diagnostics(trainer, trainer, mask, low=LOW, high=HIGH)
  assert all(float(v) == 0.0 for v in m.values())
  for mode in mismatch.MODES:
    np.testing.assert_array_equal(mismatch.weights(trainer, trainer, mask, mode=mode, low=LOW, high=HIGH), mask)


def test_unknown_mode_raises():
  trainer, sampler, mask = _batch()
  with pytest.raises(ValueError, match="token_truncate"):
    mismatch.weights(trainer, sampler, mask, mode="tis", low=LOW, high=HIGH)


@pytest.mark.parametrize("mode", mismatch.MODES[1:])
@pytest.mark.parametrize("cfg", [dict(clip_eps=0.2, agg="token_mean"),
                                 dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, agg="seq_mean_token_mean")])
def test_grpo_loss_with_correction_weights_matches_reference(mode, cfg):
  """The weights multiply the per-token policy-gradient term (not the KL): value and gradient in float64."""
  trainer, sampler, mask = _batch()
  rng = np.random.default_rng(9)
  logp = trainer + rng.normal(0, 0.1, size=trainer.shape)   # the current policy, after some updates
  ref = trainer + rng.normal(0, 0.2, size=trainer.shape)
  adv = rng.normal(size=trainer.shape[0])
  w = _ref_weights(trainer, sampler, mask, mode, LOW, HIGH)
  f = lambda lp: ref_impl.grpo_loss(lp, trainer, ref, adv, mask, token_weight=w, **cfg)
  with jax.enable_x64(True):
    weights = mismatch.weights(trainer, sampler, mask, mode=mode, low=LOW, high=HIGH)
    loss = lambda lp: grpo.loss(lp, trainer, ref, adv, mask, token_weight=weights, **cfg)[0]
    value, grad = jax.value_and_grad(loss)(jnp.asarray(logp))
  np.testing.assert_allclose(value, f(logp), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(grad, ref_impl.finite_diff(f, logp), rtol=1e-5, atol=1e-7)
