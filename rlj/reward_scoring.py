"""Reward-model scoring of sampled completions, and group rewards built from quantile comparisons.

The scorer is one jitted function of (params, tokens [N, S], attn_mask [N, S]): a scalar reward per response
for a Bradley-Terry model, quantiles at fixed taus for an IQN model. The sampler's ``Rollout`` already holds
both arrays (``tokens`` = prompt + completion, ``attn_mask`` = prompt mask + completion mask), and the reward
model reads the feature at the last real token (the completion's EOS) whatever the padding.

From IQN quantiles of the G completions of each prompt the RL step can form:
- pairwise preference probabilities P(j > j') (``group_preferences``), independent coupling, ALGORITHMS.md 9;
- quantile-dominance verdicts under a preorder of objectives (``group_verdicts``), ALGORITHMS.md 10;
- Pref-GRPO win-rate rewards [B, G] from either (``win_rate_rewards``), or a risk-aware scalar per row
  (``rewards.quantile.scalarize``) for the usual scalar-reward algorithms.
Rows are group-major (row b * G + g is completion g of prompt b).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from algorithms import winrate
from models.reward_model import RewardModel
from rewards import dominance, quantile


def score(params: Any, tokens: jax.Array, attn_mask: jax.Array, *, model: RewardModel,
          taus: Optional[jax.Array] = None) -> jax.Array:
  """Rewards of N full sequences: [N] (BT) or [N, Q] quantiles at ``taus`` (IQN), float32."""
  if model.kind == "bt":
    return model.apply({"params": params}, tokens, attn_mask)
  return model.apply({"params": params}, tokens, attn_mask, taus)


def make_scorer(model: RewardModel, *, num_taus: int = 32, taus: Optional[jax.Array] = None):
  """A jitted ``f(params, tokens [N, S], attn_mask [N, S])`` for a reward model.

  IQN models are evaluated at ``taus`` (default: the midpoint grid of ``num_taus``), so outputs are
  deterministic and comparable across a group. Inputs keep whatever shardings they carry (params sharded
  by ``rlj.sharding``, rows over the batch axes); the jit follows them.
  """
  if model.kind == "iqn" and taus is None:
    taus = quantile.midpoint_taus(num_taus)
  fn = functools.partial(score, model=model, taus=None if model.kind == "bt" else taus)
  return jax.jit(fn)


def score_rollout(scorer, params: Any, rollout: Any) -> jax.Array:
  """Scores a sampler ``Rollout`` (anything with ``tokens`` and ``attn_mask`` [N, P + T])."""
  return scorer(params, rollout.tokens, rollout.attn_mask)


def _groups(x: jax.Array, num_generations: int) -> jax.Array:
  n = x.shape[0]
  if num_generations < 2 or n % num_generations:
    raise ValueError(f"{n} rows do not split into groups of G={num_generations} >= 2")
  return x.reshape((n // num_generations, num_generations) + x.shape[1:])


def group_preferences(q: jax.Array, num_generations: int, *, temperature: Optional[float] = None) -> jax.Array:
  """P(completion j beats j') within each group from quantiles: [N, Q] -> [B, G, G].

  ``rewards.quantile.preference_prob`` on every ordered pair (hard with ties 1/2 when temperature is None);
  P[j, j'] + P[j', j] = 1 and the diagonal is 1/2.
  """
  qg = _groups(jnp.asarray(q, jnp.float32), num_generations)        # [B, G, Q]
  return quantile.preference_prob(qg[:, :, None, :], qg[:, None, :, :], temperature=temperature)


def group_verdicts(q: jax.Array, num_generations: int, levels: Sequence[Sequence[int]], *,
                   threshold: float = 0.0, **qd_kwargs) -> jax.Array:
  """Quantile-dominance verdicts s[b, j, j'] in {-1, 0, 1} within each group: [N, K, Q] -> [B, G, G].

  ``rewards.dominance.verdicts`` per group (K objectives on a shared tau grid, ``levels`` the preorder).
  [reconstruction] see ``rewards.dominance``.
  """
  qg = _groups(jnp.asarray(q, jnp.float32), num_generations)        # [B, G, K, Q]
  if qg.ndim != 4:
    raise ValueError(f"q must be [N, K, Q], got {q.shape}")
  fn = functools.partial(dominance.verdicts, levels=levels, threshold=threshold, **qd_kwargs)
  return jax.vmap(fn)(qg)


def win_rate_rewards(q: jax.Array, num_generations: int, *, method: str = "preference",
                     temperature: Optional[float] = None, levels: Optional[Sequence[Sequence[int]]] = None,
                     threshold: float = 0.0, **qd_kwargs) -> jax.Array:
  """Pref-GRPO group rewards r_j = (1/(G-1)) sum_{j' != j} w(j, j') in [0, 1]: [B, G], summing to G/2.

  Args:
    q: [N, Q] quantiles (method "preference") or [N, K, Q] (method "qd"; [N, Q] is taken as K = 1).
    num_generations: G.
    method: "preference" (w = P(j > j'), ``group_preferences``) or "qd" (w = (1 + s(j, j')) / 2 with the
      verdicts of ``group_verdicts``).
    temperature: soft preference temperature (None: hard).
    levels, threshold, qd_kwargs: the preorder and QD options of method "qd" (default: one level with
      every objective, i.e. Pareto).

  See "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning"
  (arXiv:2508.20751); the QD variant is [inferred] (ALGORITHMS.md section 10).
  """
  q = jnp.asarray(q, jnp.float32)
  if method == "preference":
    return winrate.win_rates(group_preferences(q, num_generations, temperature=temperature), symmetrize=False)
  if method == "qd":
    if q.ndim == 2:
      q = q[:, None, :]
    if levels is None:
      levels = (tuple(range(q.shape[1])),)
    s = group_verdicts(q, num_generations, levels, threshold=threshold, **qd_kwargs)
    return winrate.win_rates(s, kind="verdict", symmetrize=False)
  raise ValueError(f"unknown win-rate method {method!r}; choose one of ['preference', 'qd']")
