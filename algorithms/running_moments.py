"""Running mean and standard deviation of a stream of batches, for reward scaling (P3O's running reward std).

A batch of n_b values with mean m_b and squared-deviation sum M2_b joins the running (n_a, m_a, M2_a) by the
pairwise update of Chan, Golub and LeVeque ("Updating Formulae and a Pairwise Algorithm for Computing Sample
Variances", 1979; Welford's update when n_b = 1):

  n     = n_a + n_b,   delta = m_b - m_a
  m     = m_a + delta n_b / n
  M2    = M2_a + M2_b + delta^2 n_a n_b / n
  std   = sqrt(M2 / (n - ddof))

so the result equals the mean and std of every value seen so far, without keeping them. The P3O authors' code
keeps such running moments of the rollout scores (trlx's ``RunningMoments``, unbiased std) and divides the
scores by the running std before the pairwise loss ("Pairwise Proximal Policy Optimization", arXiv:2310.00212;
``scale_reward="running"``).

Host side, numpy float64: the state is three scalars that a checkpoint keeps (``rlj.rl_algos.P3OBatcher``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Moments(NamedTuple):
  """Running statistics: ``count`` values, their ``mean`` and ``m2``, the sum of squared deviations from it."""
  count: float = 0.0
  mean: float = 0.0
  m2: float = 0.0


def update(m: Moments, values) -> Moments:
  """``m`` with the finite entries of ``values`` (any shape) added (Chan et al. 1979 pairwise update)."""
  x = np.asarray(values, np.float64).reshape(-1)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return m
  n_b, mean_b = float(x.size), float(x.mean())
  m2_b = float(np.square(x - mean_b).sum())
  n = m.count + n_b
  delta = mean_b - m.mean
  return Moments(count=n, mean=m.mean + delta * n_b / n, m2=m.m2 + m2_b + delta * delta * m.count * n_b / n)


def std(m: Moments, ddof: int = 1) -> float:
  """sqrt(M2 / (n - ddof)); 0 while at most ``ddof`` values were seen (ddof=1: the unbiased std the P3O code
  divides by)."""
  if m.count <= ddof:
    return 0.0
  return float(np.sqrt(max(m.m2, 0.0) / (m.count - ddof)))
