"""Win-rate rewards from pairwise preferences within a group (Pref-GRPO style).

Any pairwise preference model P(y_j > y_j' | x) -- a Bradley-Terry head, a distributional head's P(Z_a > Z_b), an
LLM judge, or quantile-dominance verdicts -- becomes a scalar reward per completion that GRPO (or GDPO, one
component per objective) can normalise. Shape letters: B prompts, G generations per prompt.

Source: "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning"
(arXiv:2508.20751): its reward is a completion's win rate against the rest of its group.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from algorithms import common

KINDS = ("prob", "verdict")


def win_rates(prefs: jax.Array, *, kind: str = "prob", hard: bool = False, symmetrize: bool = True) -> jax.Array:
  """Each completion's mean win probability against the other completions of its group.

    p_jj'  = prefs[b, j, j']                       kind="prob":    P(y_j > y_j') in [0, 1]
    p_jj'  = (1 + prefs[b, j, j']) / 2             kind="verdict": s(y_j, y_j') in [-1, 1], antisymmetric
    p_jj' <- (p_jj' + 1 - p_j'j) / 2               symmetrize=True (so that p_jj' + p_j'j = 1 exactly)
    p_jj' <- 1[p_jj' > 1/2] + 1[p_jj' = 1/2] / 2   hard=True (count wins, ties count half)
    r_j    = (1 / (G - 1)) * sum_{j' != j} p_jj'

  The diagonal is ignored. With symmetric preferences the rewards lie in [0, 1] and sum to G/2 in every group.

  Args:
    prefs: [B, G, G] pairwise preferences (row j against column j').
    kind: "prob" or "verdict".
    hard: count wins instead of averaging probabilities.
    symmetrize: average both orders of evaluation (a model queried on (a, b) and (b, a) need not be consistent).

  Returns:
    float32 [B, G] win-rate rewards.

  Warning:
    Pref-GRPO counts wins of a preference model's hard verdicts; `hard=False` (the default here) keeps the soft
    probability, which is smoother and equal in expectation when the model is calibrated.
  """
  chex.assert_rank(prefs, 3)
  chex.assert_axis_dimension(prefs, 2, prefs.shape[1])
  p = common.f32(prefs)
  if kind == "verdict":
    p = 0.5 * (1.0 + p)
  elif kind != "prob":
    raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
  if symmetrize:
    p = 0.5 * (p + 1.0 - jnp.swapaxes(p, 1, 2))
  if hard:
    p = jnp.where(p > 0.5, 1.0, jnp.where(p == 0.5, 0.5, 0.0))
  num_g = p.shape[1]
  off_diag = 1.0 - jnp.eye(num_g, dtype=p.dtype)
  return jnp.einsum("bjk,jk->bj", p, off_diag) / (num_g - 1)


def preference_matrix(pref_fn: Callable[[jax.Array, jax.Array], jax.Array], items: jax.Array) -> jax.Array:
  """Evaluates a pairwise preference function on every ordered pair of a group.

  Args:
    pref_fn: (a[...], b[...]) -> scalar P(a > b) for one pair (vmapped here), e.g. a reward head's
      `sigmoid(r(a) - r(b))` or `rewards.quantile.preference_prob`.
    items: [B, G, ...] per-completion features (scores, quantiles, embeddings).

  Returns:
    [B, G, G] with entry [b, j, j'] = pref_fn(items[b, j], items[b, j']).
  """
  against = jax.vmap(pref_fn, in_axes=(None, 0))  # one a against every b
  rows = jax.vmap(against, in_axes=(0, None))  # every a
  return jax.vmap(rows)(items, items)


def win_rates_from_scores(scores: jax.Array) -> jax.Array:
  """Win rates from scalar scores [B, G]: P(j beats j') = 1[s_j > s_j'] + 1[s_j = s_j'] / 2, then ``win_rates``.

  The hard preference of a scorer with no noise model (a verifier, a reward sum): ties count half, and a score of
  -inf (a missing reward) loses to every scored completion.
  """
  chex.assert_rank(scores, 2)
  s = common.f32(scores)
  prefs = (s[:, :, None] > s[:, None, :]).astype(jnp.float32)
  prefs = prefs + 0.5 * (s[:, :, None] == s[:, None, :]).astype(jnp.float32)
  return win_rates(prefs, kind="prob", hard=False, symmetrize=True)
