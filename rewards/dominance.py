"""Quantile Dominance (QD), optimal subsets under a preorder of objectives, and group win rates.

[reconstruction] Everything here is rebuilt from the abstract of Abouelazm et al., "Beyond Scalar Rewards:
Distributional Reinforcement Learning with Preordered Objectives for Safe and Reliable Autonomous Driving"
(arXiv:2603.20230): only the abstract was available, so the definitions follow ALGORITHMS.md section 10 and stay
swappable until checked against the full paper.

Candidates are the A completions of one prompt (or A actions); objectives are K quantile heads evaluated on a
shared tau grid, so ``q`` has shape [A, K, N]. ``levels`` lists the preorder's equivalence classes of objective
indices, highest priority first: one objective per level is lexicographic, a single level is pure Pareto.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

VARIANTS = ("same_tau", "soft", "independent")
Levels = Sequence[Sequence[int]]


def dominance(q_a: jax.Array, q_b: jax.Array, *, margin: float = 0.0, variant: str = "same_tau",
              temperature: float | None = None) -> jax.Array:
  """Quantile Dominance QD(a, b) in [-1, 1] of candidate a over candidate b on one objective.

  same_tau (default, comonotone coupling): QD = (1/N) sum_i [1{q_a(tau_i) > q_b(tau_i) + m}
  - 1{q_a(tau_i) < q_b(tau_i) - m}], m = margin.  soft: (1/N) sum_i tanh((q_a(tau_i) - q_b(tau_i)) / T).
  independent: 2 P(Z_a > Z_b) - 1 over all N^2 cross pairs, hard (T = None, ties count 1/2) or soft
  (2 sigmoid(d/T) - 1 = tanh(d / 2T)), i.e. 2 * ``rewards.quantile.preference_prob`` - 1.

  [reconstruction] from the abstract of arXiv:2603.20230 (see the module docstring).

  Args:
    q_a: [..., N] quantiles of candidate a.
    q_b: [..., N] quantiles of candidate b on the same tau grid (broadcast against q_a).
    margin: m >= 0, differences within +-m count as ties (same_tau only).
    variant: "same_tau" | "soft" | "independent".
    temperature: T of the soft variants (required by "soft").

  Returns:
    [...] float32 in [-1, 1]; QD(a, a) = 0 and QD(a, b) = -QD(b, a) for every variant.
  """
  q_a, q_b = jnp.broadcast_arrays(jnp.asarray(q_a, jnp.float32), jnp.asarray(q_b, jnp.float32))
  if variant == "same_tau":
    d = q_a - q_b
    return jnp.mean((d > margin).astype(jnp.float32) - (d < -margin).astype(jnp.float32), axis=-1)
  if variant == "soft":
    if temperature is None:
      raise ValueError("variant='soft' needs a temperature")
    return jnp.mean(jnp.tanh((q_a - q_b) / temperature), axis=-1)
  if variant == "independent":
    d = q_a[..., :, None] - q_b[..., None, :]                        # [..., N, N]
    s = jnp.sign(d) if temperature is None else jnp.tanh(d / (2.0 * temperature))
    return jnp.mean(s, axis=(-2, -1))
  raise ValueError(f"unknown QD variant {variant!r}; choose one of {sorted(VARIANTS)}")


def qd_matrix(q: jax.Array, **kwargs) -> jax.Array:
  """All pairwise QD values: qd[k, a, b] = QD_k(a, b) for q [A, K, N]; returns [K, A, A].

  ``kwargs`` go to ``dominance`` (margin, variant, temperature).
  """
  q = jnp.asarray(q, jnp.float32)
  if q.ndim != 3:
    raise ValueError(f"q must be [A, K, N], got {q.shape}")
  qk = jnp.transpose(q, (1, 0, 2))                                   # [K, A, N]
  return dominance(qk[:, :, None, :], qk[:, None, :, :], **kwargs)   # [K, A, A]


def _check_levels(levels: Levels, num_objectives: int) -> list[list[int]]:
  out = [list(level) for level in levels]
  if not out or any(not level for level in out):
    raise ValueError(f"levels must be a non-empty list of non-empty lists of objective indices, got {levels}")
  flat = [k for level in out for k in level]
  if any(not 0 <= k < num_objectives for k in flat) or len(set(flat)) != len(flat):
    raise ValueError(f"levels {levels} must name distinct objectives in [0, {num_objectives})")
  return out


def _dominates(qd_level: jax.Array, threshold: float) -> jax.Array:
  """dom[a, b]: a dominates b on one level, i.e. some QD_k(a, b) > threshold and every QD_k(a, b) >= 0."""
  return jnp.any(qd_level > threshold, axis=0) & jnp.all(qd_level >= 0, axis=0)   # [A, A]


def optimal_subsets(q: jax.Array, levels: Levels, *, threshold: float = 0.0, **kwargs) -> jax.Array:
  """Nested optimal subsets A_1 ⊇ ... ⊇ A_Lambda of candidates, one per preorder level.

  Starting from A_0 = all candidates, A_l keeps the members of A_{l-1} that no member of A_{l-1} dominates on
  level l (b dominates a iff QD_k(b, a) > threshold for some k in l and QD_k'(b, a) >= 0 for all k' in l). QD
  dominance can cycle; when A_l would be empty, the Copeland winners argmax_{a in A_{l-1}} sum_{b in A_{l-1}}
  sum_{k in l} QD_k(a, b) (ties kept) are taken instead, so no subset is empty.

  [reconstruction] from the abstract of arXiv:2603.20230 (see the module docstring).

  Args:
    q: [A, K, N] quantiles of A candidates under K objectives on a shared tau grid.
    levels: the preorder, a list of lists of objective indices, highest priority first (static).
    threshold: delta in [0, 1): the QD a dominance needs on at least one objective of the level.
    **kwargs: margin / variant / temperature of ``dominance``.

  Returns:
    [Lambda, A] bool, row l = membership of A_{l+1}.
  """
  qd = qd_matrix(q, **kwargs)                                        # [K, A, A]
  lv = _check_levels(levels, qd.shape[0])
  alive = jnp.ones(qd.shape[1], bool)                                # [A]
  out = []
  for level in lv:
    qd_l = qd[jnp.asarray(level)]                                    # [k_l, A, A]
    dom = _dominates(qd_l, threshold)                                # dom[b, a]
    dominated = jnp.any(dom & alive[:, None], axis=0)                # by a live candidate
    kept = alive & ~dominated
    pair = alive[:, None] & alive[None, :]
    score = jnp.sum(jnp.where(pair, jnp.sum(qd_l, axis=0), 0.0), axis=1)          # Copeland, [A]
    best = jnp.max(jnp.where(alive, score, -jnp.inf))
    copeland = alive & (score == best)
    alive = jnp.where(jnp.any(kept), kept, copeland)
    out.append(alive)
  return jnp.stack(out)


def optimal_subset(q: jax.Array, levels: Levels, *, threshold: float = 0.0, **kwargs) -> jax.Array:
  """The final optimal subset A_Lambda of ``optimal_subsets``: keep mask [A] bool, never empty."""
  return optimal_subsets(q, levels, threshold=threshold, **kwargs)[-1]


def best_candidate(q: jax.Array, levels: Levels, *, threshold: float = 0.0, **kwargs) -> jax.Array:
  """One pick from A_Lambda: top Copeland score on the last level within A_Lambda, then the best mean.

  The tie-break mean is taken over the quantiles of the last level's objectives. Returns an int32 index.
  """
  keep = optimal_subset(q, levels, threshold=threshold, **kwargs)    # [A]
  last = list(levels[-1])
  qd_l = qd_matrix(q, **kwargs)[jnp.asarray(last)]                   # [k_l, A, A]
  score = jnp.sum(jnp.where(keep[:, None] & keep[None, :], jnp.sum(qd_l, axis=0), 0.0), axis=1)
  top = keep & (score == jnp.max(jnp.where(keep, score, -jnp.inf)))
  mean = jnp.mean(jnp.asarray(q, jnp.float32)[:, jnp.asarray(last), :], axis=(1, 2))  # [A]
  return jnp.argmax(jnp.where(top, mean, -jnp.inf)).astype(jnp.int32)


def verdicts(q: jax.Array, levels: Levels, *, threshold: float = 0.0, **kwargs) -> jax.Array:
  """Pairwise verdicts s[a, b] in {-1, 0, +1}: the first level (in priority order) where one dominates decides.

  [inferred] ALGORITHMS.md section 10, "From QD to training signals". s is antisymmetric with a zero diagonal.

  Args:
    q: [A, K, N] quantiles; levels, threshold, kwargs as in ``optimal_subsets``.

  Returns:
    [A, A] float32.
  """
  qd = qd_matrix(q, **kwargs)
  lv = _check_levels(levels, qd.shape[0])
  s = jnp.zeros(qd.shape[1:], jnp.float32)
  for level in lv:
    dom = _dominates(qd[jnp.asarray(level)], threshold)              # dom[a, b]
    v = dom.astype(jnp.float32) - dom.T.astype(jnp.float32)
    s = jnp.where(s == 0, v, s)
  return s
