"""Quantile dominance, optimal subsets, verdicts and win rates (ALGORITHMS.md section 10, a reconstruction)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import winrate
from rewards import dominance, quantile


def _qd_ref(a, b, margin):
  return np.mean([float(x > y + margin) - float(x < y - margin) for x, y in zip(a, b)])


def _subsets_ref(q, levels, threshold, margin):
  """Slow set-based filtering with Copeland fallback."""
  a_num = q.shape[0]
  qd = np.array([[[_qd_ref(q[a, k], q[b, k], margin) for b in range(a_num)] for a in range(a_num)]
                 for k in range(q.shape[1])])
  alive = set(range(a_num))
  out = []
  for level in levels:
    def dom(b, a):
      return any(qd[k, b, a] > threshold for k in level) and all(qd[k, b, a] >= 0 for k in level)
    kept = {a for a in alive if not any(dom(b, a) for b in alive)}
    if not kept:
      score = {a: sum(qd[k, a, b] for b in alive for k in level) for a in alive}
      top = max(score.values())
      kept = {a for a in alive if score[a] == top}
    alive = kept
    out.append([a in alive for a in range(a_num)])
  return np.array(out)


def test_vector_and_antisymmetry():
  qa, qb = jnp.array([0.0, 1.0, 2.0, 3.0]), jnp.array([0.5, 1.0, 1.5, 2.0])
  np.testing.assert_allclose(dominance.dominance(qa, qb), 0.25)
  np.testing.assert_allclose(dominance.dominance(qb, qa), -0.25)
  np.testing.assert_allclose(dominance.dominance(qa + 5.0, qa), 1.0)
  np.testing.assert_allclose(quantile.dominance(qa, qb), 0.25)     # re-exported under the contract name


@pytest.mark.parametrize("kw", [dict(), dict(margin=0.3), dict(variant="soft", temperature=0.5),
                                dict(variant="independent"), dict(variant="independent", temperature=0.5)])
def test_matrix_antisymmetric_zero_diagonal(kw):
  q = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3, 6)), jnp.float32)
  qd = dominance.qd_matrix(q, **kw)
  assert qd.shape == (3, 5, 5)
  np.testing.assert_allclose(qd, -jnp.transpose(qd, (0, 2, 1)), atol=1e-6)
  np.testing.assert_allclose(jnp.diagonal(qd, axis1=1, axis2=2), 0.0, atol=1e-6)
  assert np.all(np.abs(np.asarray(qd)) <= 1.0 + 1e-6)


def test_matrix_matches_reference_and_monotone_invariance():
  q = np.round(np.random.default_rng(1).normal(size=(4, 2, 5)), 1)
  qd = dominance.qd_matrix(jnp.asarray(q, jnp.float32), margin=0.15)
  ref = [[[_qd_ref(q[a, k], q[b, k], 0.15) for b in range(4)] for a in range(4)] for k in range(2)]
  np.testing.assert_allclose(qd, ref, atol=1e-6)
  base = dominance.qd_matrix(jnp.asarray(q, jnp.float32))
  np.testing.assert_allclose(dominance.qd_matrix(jnp.asarray(np.exp(q) ** 3, jnp.float32)), base, atol=1e-6)


def test_independent_variant_is_twice_preference_minus_one():
  qa, qb = (jnp.asarray(x, jnp.float32) for x in np.random.default_rng(2).normal(size=(2, 3, 6)))
  for t in (None, 0.4):
    np.testing.assert_allclose(dominance.dominance(qa, qb, variant="independent", temperature=t),
                               2 * quantile.preference_prob(qa, qb, temperature=t) - 1, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    dominance.dominance(qa, qb, variant="soft")


_subsets = jax.jit(dominance.optimal_subsets, static_argnames=("levels", "threshold", "margin"))
_subset = jax.jit(dominance.optimal_subset, static_argnames=("levels",))
_verdicts = jax.jit(dominance.verdicts, static_argnames=("levels", "threshold"))


@pytest.mark.parametrize("levels", [((0,), (1,), (2,)), ((0, 1, 2),), ((1,), (0, 2))])
def test_subsets_match_reference_nonempty_nested(levels):
  rng = np.random.default_rng(sum(map(len, levels)) + len(levels))
  for trial in range(6):
    q = np.round(rng.normal(size=(6, 3, 4)), 1)
    got = np.asarray(_subsets(jnp.asarray(q, jnp.float32), levels, threshold=0.2, margin=0.05))
    np.testing.assert_array_equal(got, _subsets_ref(q, levels, 0.2, 0.05), err_msg=f"trial {trial}")
    assert got[-1].any()
    for prev, cur in zip(got[:-1], got[1:]):
      assert np.all(cur <= prev)


def test_point_masses_reduce_to_lexicographic_argmax():
  rng = np.random.default_rng(3)
  for _ in range(5):
    vals = rng.integers(0, 3, size=(7, 3)).astype(np.float32)
    q = jnp.asarray(np.repeat(vals[:, :, None], 4, axis=2))
    keep = np.asarray(_subset(q, ((0,), (1,), (2,))))
    best = max(map(tuple, vals))
    np.testing.assert_array_equal(keep, [tuple(v) == best for v in vals])


def test_three_cycle_uses_copeland():
  # b beats a, c beats b, a beats c (1/3 each); d is beaten by everyone.
  q = jnp.array([[1.0, 6.0, 8.0], [2.0, 3.0, 9.0], [4.0, 5.0, 7.0], [0.0, 0.0, 0.0]])[:, None, :]
  qd = np.asarray(dominance.qd_matrix(q))[0]
  assert qd[1, 0] > 0 and qd[2, 1] > 0 and qd[0, 2] > 0            # a genuine cycle: nobody is undominated
  np.testing.assert_array_equal(dominance.optimal_subset(q, ((0,),)), [True, True, True, False])
  assert int(dominance.best_candidate(q, ((0,),))) in (0, 1, 2)


def test_verdicts_antisymmetric_reference_and_win_rates():
  rng = np.random.default_rng(4)
  levels = ((1,), (0, 2))
  for _ in range(3):
    q = np.round(rng.normal(size=(5, 3, 4)), 1)
    s = np.asarray(_verdicts(jnp.asarray(q, jnp.float32), levels, threshold=0.2))
    np.testing.assert_array_equal(s, -s.T)
    np.testing.assert_array_equal(np.diag(s), 0)
    for a, b in itertools.permutations(range(5), 2):
      expected = 0
      for level in levels:
        qd = [_qd_ref(q[a, k], q[b, k], 0.0) for k in level]
        if any(x > 0.2 for x in qd) and all(x >= 0 for x in qd):
          expected = 1
        elif any(-x > 0.2 for x in qd) and all(-x >= 0 for x in qd):
          expected = -1
        if expected:
          break
      assert s[a, b] == expected
    r = np.asarray(winrate.win_rates(jnp.asarray(s)[None], kind="verdict", symmetrize=False))[0]
    assert np.all((r >= 0) & (r <= 1))
    np.testing.assert_allclose(r.sum(), 5 / 2, rtol=1e-6)


def test_win_rates_from_preferences_reference():
  p = np.random.default_rng(5).uniform(size=(2, 4, 4))
  p = np.triu(p, 1) + np.tril(1 - np.swapaxes(np.triu(p, 1), 1, 2), -1)
  r = np.asarray(winrate.win_rates(jnp.asarray(p, jnp.float32), symmetrize=False))
  ref = [[sum(p[b, j, k] for k in range(4) if k != j) / 3 for j in range(4)] for b in range(2)]
  np.testing.assert_allclose(r, ref, rtol=1e-5)
  np.testing.assert_allclose(r.sum(-1), [2.0, 2.0], rtol=1e-5)


def test_bad_levels_raise():
  q = jnp.zeros((3, 2, 4))
  for bad in ((), ((0,), ()), ((0, 2),), ((0,), (0,))):
    with pytest.raises(ValueError):
      dominance.optimal_subset(q, bad)
