"""Tests for rlj.sampling_filters: the sampled distribution is softmax(logits / T) on the kept set."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlj import sampling_filters

LOGITS = np.array([2.0, 1.5, 1.0, 0.3, -0.5, -1.0, 0.9, -2.0], np.float32)   # V = 8, no ties


def _reference_q(logits, temperature, top_k, top_p):
  """Slow numpy reference of the sampling distribution q."""
  z = logits.astype(np.float64) / temperature
  order = sorted(range(len(z)), key=lambda i: -z[i])
  kept = order[:top_k] if top_k else order
  p = np.exp(z[kept] - z[kept].max())
  p /= p.sum()
  nucleus, mass = [], 0.0
  for i, pi in zip(kept, p):
    if mass < top_p:
      nucleus.append(i)
    mass += pi
  q = np.zeros(len(z))
  e = np.exp(z[nucleus] - z[nucleus].max())
  q[nucleus] = e / e.sum()
  return q


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "num"))
def _draw(rng, temperature, top_k, top_p, num):
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (num, LOGITS.shape[0]))
  return sampling_filters.sample_token(rng, logits, temperature=temperature, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9),
])
def test_empirical_frequencies_match_filtered_softmax(temperature, top_k, top_p):
  """M = 40,000 draws; each frequency must lie within 5 binomial standard deviations of q.

  Per token, P(|freq - q| > 5 sigma) < 6e-7, so with 8 tokens and 5 cases a false failure has probability
  below 3e-5. Tokens outside the kept set must never be drawn, and the returned log-probs must equal log q.
  """
  m = 40_000
  q = _reference_q(LOGITS, temperature, top_k, top_p)
  tokens, logp = _draw(jax.random.key(0), temperature, top_k, top_p, m)
  counts = np.bincount(np.asarray(tokens), minlength=len(LOGITS))
  freq = counts / m
  sigma = np.sqrt(q * (1 - q) / m)
  assert np.all(np.abs(freq - q) <= 5 * sigma + 1e-12), (freq, q)
  assert np.all(counts[q == 0] == 0)
  np.testing.assert_allclose(logp, np.log(q[np.asarray(tokens)]), rtol=1e-5, atol=1e-6)


def test_filter_logits_matches_reference_and_greedy():
  logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
  for temperature, top_k, top_p in [(0.5, 2, 1.0), (1.0, 0, 0.5), (2.0, 4, 0.7)]:
    z = sampling_filters.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    q = np.exp(np.asarray(jax.nn.log_softmax(z, axis=-1)))
    np.testing.assert_allclose(q[0], _reference_q(LOGITS, temperature, top_k, top_p), atol=1e-6)
    np.testing.assert_allclose(q[1], _reference_q(LOGITS[::-1], temperature, top_k, top_p), atol=1e-6)
  tok, logp = sampling_filters.sample_token(jax.random.key(1), logits, temperature=0.7, greedy=True)
  np.testing.assert_array_equal(tok, [0, 7])
  np.testing.assert_allclose(logp, np.log(_reference_q(LOGITS, 0.7, 0, 1.0)[0]), rtol=1e-5)


def test_invalid_settings_raise():
  with pytest.raises(ValueError, match="temperature"):
    sampling_filters.filter_logits(jnp.zeros((1, 4)), temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling_filters.filter_logits(jnp.zeros((1, 4)), temperature=1.0, top_p=0.0)


def test_first_argmax_is_argmax_with_ties_infs_and_nans():
  rng = np.random.default_rng(7)
  x = rng.integers(-3, 3, size=(64, 50)).astype(np.float32)        # many ties: the first maximum wins
  x[0] = -np.inf
  x[1, 10] = np.inf
  x[2, [5, 9]] = np.nan                                             # NaN counts as the maximum, first one
  x[3, 7] = np.nan
  x[3, 8] = np.inf
  np.testing.assert_array_equal(sampling_filters.first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
  assert int(sampling_filters.first_argmax(jnp.asarray(x))[2]) == 5


def test_two_level_categorical_matches_softmax_across_blocks():
  """V = 300 in blocks of 32 (a partial last block), with a whole block and scattered tokens at -inf:
  M = 40,000 draws per case, each frequency within 5 binomial standard deviations of softmax(z), no -inf
  token ever drawn, and the returned logsumexp equal to the reference. The default block size too."""
  rng = np.random.default_rng(11)
  v, m = 300, 40_000
  z = (rng.standard_normal(v) * 2.0).astype(np.float32)
  z[64:96] = -np.inf                                                 # block 2 empty
  z[rng.choice(v, 40, replace=False)] = -np.inf
  z[5] = 3.5                                                         # one heavy token
  q = np.where(np.isinf(z), 0.0, np.exp(z.astype(np.float64) - z.max()))
  q /= q.sum()
  logits = jnp.broadcast_to(jnp.asarray(z), (m, v))
  for block in (32, None):
    tokens, lse = jax.jit(functools.partial(sampling_filters.categorical, block=block))(jax.random.key(3), logits)
    counts = np.bincount(np.asarray(tokens), minlength=v)
    assert counts.sum() == m and np.all(counts[q == 0] == 0)
    sigma = np.sqrt(q * (1 - q) / m)
    assert np.all(np.abs(counts / m - q) <= 5 * sigma + 1e-12)
    np.testing.assert_allclose(np.asarray(lse), np.log(np.sum(np.exp(z[q > 0].astype(np.float64)))), rtol=1e-6)


def test_inverse_cdf_search_never_lands_on_an_empty_entry():
  """The index search of the two-level draw: first cumulative mass above the target; a target at or past the
  total (float rounding) falls back to the last entry with mass, never to a trailing empty one."""
  mass = jnp.asarray([[0.0, 0.5, 0.0, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
  cum = jnp.cumsum(mass, axis=-1)
  # pylint: disable=protected-access
  last = sampling_filters._last_positive(mass)
  np.testing.assert_array_equal(last, [3, 0])
  search = lambda t: np.asarray(sampling_filters._first_above(cum, jnp.asarray(t), last))
  np.testing.assert_array_equal(search([0.0, 0.0]), [1, 0])
  np.testing.assert_array_equal(search([0.49, 0.99]), [1, 0])
  np.testing.assert_array_equal(search([0.5, 0.5]), [3, 0])
  np.testing.assert_array_equal(search([0.75, 1.0]), [3, 0])          # at the total
  np.testing.assert_array_equal(search([0.8, 1.5]), [3, 0])           # past it
