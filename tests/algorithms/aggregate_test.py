"""Loss aggregation: the ALGORITHMS.md vector, full-length agreement, reference, and micro-batch split invariance."""
import functools

import jax
import numpy as np
import pytest

from algorithms import common
from algorithms import grpo

import algo_reference as ref_impl

MODES = common.AGG_MODES


def _vector_inputs():
  loss = np.zeros((2, 7), np.float32)
  mask = np.zeros((2, 7), np.float32)
  loss[0, :], loss[1, :] = 1.0, 2.0
  mask[0, :4], mask[1, :] = 1.0, 1.0
  loss[0, 4:] = 1e6  # values under the mask must not leak
  return loss, mask


def test_vector():
  loss, mask = _vector_inputs()
  want = {"seq_mean_token_mean": 1.5, "token_mean": 18 / 11, "dr_grpo": 18 / 14, "seq_mean_token_sum": 9.0}
  for agg, value in want.items():
    np.testing.assert_allclose(common.aggregate(loss, mask, agg=agg, max_len=7), value, rtol=1e-5, atol=1e-6)


def test_full_length_rows_agree():
  rng = np.random.default_rng(1)
  loss = rng.normal(size=(4, 6)).astype(np.float32)
  mask = np.ones((4, 6), np.float32)
  vals = {agg: float(common.aggregate(loss, mask, agg=agg, max_len=6)) for agg in MODES}
  np.testing.assert_allclose(vals["seq_mean_token_mean"], vals["token_mean"], rtol=1e-5)
  np.testing.assert_allclose(vals["dr_grpo"], vals["token_mean"], rtol=1e-5)
  np.testing.assert_allclose(vals["seq_mean_token_sum"], 6 * vals["token_mean"], rtol=1e-5)


def test_matches_reference_with_empty_rows_and_errors():
  rng = np.random.default_rng(2)
  loss = rng.normal(size=(5, 8)).astype(np.float32)
  mask = (rng.random((5, 8)) < 0.6).astype(np.float32)
  mask[2] = 0.0  # a fully masked row is neither summed nor counted
  for agg in MODES:
    got = common.aggregate(loss, mask, agg=agg, max_len=10)
    want = ref_impl.aggregate(loss.astype(np.float64), mask, agg, max_len=10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="max_len"):
    common.aggregate(loss, mask, agg="dr_grpo")
  with pytest.raises(ValueError, match="unknown agg"):
    common.aggregate(loss, mask, agg="mean")


def _batch(n=8, t=8, seed=3):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, size=(n, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.2, size=(n, t))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.3, size=(n, t))).astype(np.float32)
  adv = rng.normal(size=(n,)).astype(np.float32)
  lens = rng.integers(1, t + 1, size=n)
  lens[n // 2] = 0
  mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.float32)
  return logp, old, ref, adv, mask


@functools.partial(jax.jit, static_argnames=("agg",))
def _value_and_grad(logp, old, ref, adv, mask, num_tokens, num_seqs, *, agg):
  fn = lambda lp: grpo.loss(lp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1, agg=agg, num_tokens=num_tokens,
                            num_seqs=num_seqs, max_len=10)[0]
  return jax.value_and_grad(fn)(logp)


def test_micro_batches_sum_to_full_batch():
  logp, old, ref, adv, mask = _batch()
  n_tok, n_seq = mask.sum(), float((mask.sum(-1) > 0).sum())
  for agg in MODES:
    full, g_full = _value_and_grad(logp, old, ref, adv, mask, n_tok, n_seq, agg=agg)
    parts = [_value_and_grad(*(x[s] for x in (logp, old, ref, adv, mask)), n_tok, n_seq, agg=agg)
             for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([parts[0][1], parts[1][1]]), g_full, rtol=1e-5, atol=1e-7)
