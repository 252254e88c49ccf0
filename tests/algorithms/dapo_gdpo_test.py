"""DAPO options (dynamic sampling, overlong shaping/filtering) and GDPO advantages."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import dapo
from algorithms import gdpo
from algorithms import grpo

import algo_reference as ref_impl

TOL = dict(rtol=1e-5, atol=1e-6)
# jitted once per module (eager op-by-op dispatch is slower on a shared 2-core machine)
_gdpo = jax.jit(gdpo.advantages, static_argnames=("eps", "ddof"))
_gdpo_pre = jax.jit(gdpo.advantages_before_whitening, static_argnames=("eps", "ddof"))
_grpo = jax.jit(grpo.advantages, static_argnames=("scale", "eps", "ddof"))


def test_dynamic_sampling_keep():
  acc = jnp.array([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, np.nan, np.nan], [1, np.nan, np.nan, np.nan]])
  keep = np.asarray(dapo.dynamic_sampling_keep(acc))
  np.testing.assert_array_equal(keep, [False, False, True, True, False])
  adv = np.asarray(_grpo(acc))
  assert np.all(np.any(adv[keep] != 0, axis=-1))  # no survivor has all-zero advantages


def test_overlong_penalty():
  lengths = np.arange(0, 26)
  pen = np.asarray(dapo.overlong_penalty(lengths, max_len=20, buffer_len=8, penalty=0.5))
  want = [0.0 if l <= 12 else (-0.5 * (l - 12) / 8 if l <= 20 else -0.5) for l in lengths]
  np.testing.assert_allclose(pen, want, **TOL)
  assert pen[12] == 0.0 and np.isclose(pen[20], -0.5)
  assert np.all(np.diff(pen) <= 0) and np.max(np.abs(np.diff(pen))) <= 0.5 / 8 + 1e-7  # continuous steps


def test_mask_truncated():
  mask = jnp.ones((3, 4))
  out = np.asarray(dapo.mask_truncated(mask, jnp.array([True, False, True])))
  np.testing.assert_array_equal(out, [[1] * 4, [0] * 4, [1] * 4])


def test_gdpo_vector_and_grpo_collapse():
  r = jnp.array([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
  np.testing.assert_allclose(_gdpo_pre(r).reshape(-1), [-0.7070, 0.7070, -1.4140, 1.4140],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_gdpo(r).reshape(-1), [-0.54768, 0.54768, -1.09536, 1.09536], **TOL)
  summed = _grpo(r.sum(-1))
  np.testing.assert_allclose(summed.reshape(-1), [-0.707, 0.707, -0.707, 0.707], atol=1e-4)  # sums (0,1) ~ (0,2)


def test_gdpo_matches_reference_with_nans_and_weights():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(3, 4, 3)).astype(np.float32)
  r[0, 1, 2] = np.nan  # one missing component
  r[1, :, 1] = np.nan  # a component absent from a whole group
  r[2, 3, :] = np.nan  # a row with no reward at all
  w = np.array([1.0, 0.5, 2.0], np.float32)
  got = np.asarray(_gdpo(r, w))
  np.testing.assert_allclose(got, ref_impl.gdpo_adv(r, w), **TOL)
  assert got[2, 3] == 0.0
  valid = got[~np.all(np.isnan(r), -1)]
  np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(valid.std(ddof=1), 1.0, atol=1e-3)
  np.testing.assert_allclose(_gdpo(r, 7.0 * w), got, rtol=1e-3, atol=1e-3)


def test_gdpo_constant_groups_and_k1():
  r = jnp.array([[[1.0, 2.0]] * 3, [[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]]])
  adv = np.asarray(_gdpo(r))
  assert np.all(adv[0] == 0.0)
  r1 = np.random.default_rng(1).normal(size=(2, 4, 1)).astype(np.float32)
  g, base = np.asarray(_gdpo(r1)).reshape(-1), np.asarray(_grpo(r1[..., 0])).reshape(-1)
  np.testing.assert_allclose(g, base * (g @ base) / (base @ base), rtol=1e-4, atol=1e-5)  # proportional


def test_gdpo_keeps_distinct_combinations():
  """Over every group of G=3 completions with binary (r1, r2), GDPO separates at least as many values as GRPO."""
  combos = list(itertools.product([0.0, 1.0], repeat=2))
  groups = np.array(list(itertools.product(combos, repeat=3)), np.float32)  # [64, 3, 2]
  g = np.round(np.asarray(_gdpo(groups, eps=0.0)), 4)
  s = np.round(np.asarray(_grpo(groups.sum(-1), eps=0.0)), 4)
  assert len(np.unique(g)) > len(np.unique(s))
  # groups GRPO cannot tell apart (same advantages) but whose reward combinations differ stay apart under GDPO
  collapsed = [(i, j) for i in range(64) for j in range(i) if np.array_equal(s[i], s[j])
               and not np.array_equal(groups[i], groups[j])]
  assert collapsed and any(not np.array_equal(g[i], g[j]) for i, j in collapsed)
