"""Distributional (quantile) reward losses, preference probabilities and risk-aware scalarisations.

A distributional reward head outputs quantiles q(tau_i) of the reward distribution of a response. This module
holds the IQN quantile Huber loss (ALGORITHMS.md section 8), the pairwise preference loss built from two sets of
quantiles (section 9), and the scalarisations an RL consumer applies (mean, CVaR, lower quantile). Quantile
dominance and optimal subsets (section 10) live in ``rewards.dominance`` and are re-exported here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rewards.dominance import dominance, optimal_subset  # noqa: F401  (re-exported, ARCHITECTURE.md contract)


def midpoint_taus(n: int) -> jax.Array:
  """The fixed quantile grid tau_i = (2i - 1) / (2n), i = 1..n, as a float32 [n] array."""
  return (2.0 * jnp.arange(1, n + 1, dtype=jnp.float32) - 1.0) / (2.0 * n)


def sample_taus(rng: jax.Array, shape, *, max_tau: float = 1.0) -> jax.Array:
  """IQN quantile fractions tau ~ U(0, max_tau); max_tau = alpha < 1 gives a risk-averse (CVaR_alpha) head."""
  return jax.random.uniform(rng, shape, jnp.float32, 0.0, max_tau)


def huber_loss(pred: jax.Array, taus: jax.Array, target: jax.Array, *, kappa: float = 1.0) -> jax.Array:
  """Quantile Huber loss of IQN: a sum over predicted quantiles and a mean over target samples.

  delta_ij = sg(T_j) - Z(tau_i),  H(d) = d^2/2 if |d| <= kappa else kappa (|d| - kappa/2),
  rho_tau(d) = |tau - sg(1{d < 0})| * H(d) / kappa,   L = sum_i (1/M) sum_j rho_{tau_i}(delta_ij),
  with Z = pred, tau = taus, T = target; kappa = 0 gives the pinball loss |tau - 1{d < 0}| * |d|.

  See "Implicit Quantile Networks for Distributional Reinforcement Learning" (arXiv:1806.06923), Eq. 3-4,
  and "Distributional Reinforcement Learning with Quantile Regression" (arXiv:1710.10044), Eq. 9-10.

  Args:
    pred: [..., N] predicted quantile values at ``taus``.
    taus: [..., N] quantile fractions in (0, 1).
    target: [..., M] target samples (gradient stopped).
    kappa: Huber threshold (static Python float; 0 selects the pinball loss).

  Returns:
    Scalar float32: the per-example loss averaged over the leading (batch) dimensions.

  Warning:
    This project divides the Huber term by kappa (as google/dopamine does); rlax's ``huber_param`` does not, so
    the two agree only at kappa = 1.
  """
  pred = jnp.asarray(pred, jnp.float32)
  taus = jnp.asarray(taus, jnp.float32)
  target = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
  if pred.shape != taus.shape or pred.shape[:-1] != target.shape[:-1]:
    raise ValueError(f"pred {pred.shape} and taus {taus.shape} must be [..., N], target {target.shape} [..., M]")
  delta = target[..., None, :] - pred[..., :, None]                  # [..., N, M]
  weight = jnp.abs(taus[..., :, None] - jax.lax.stop_gradient((delta < 0).astype(jnp.float32)))
  abs_d = jnp.abs(delta)
  if kappa == 0:
    per = weight * abs_d
  else:
    huber = jnp.where(abs_d <= kappa, 0.5 * jnp.square(delta), kappa * (abs_d - 0.5 * kappa))
    per = weight * huber / kappa
  per_example = jnp.sum(jnp.mean(per, axis=-1), axis=-1)             # [...]
  return jnp.mean(per_example)


def _pair_diffs(q_a: jax.Array, q_b: jax.Array) -> jax.Array:
  """All differences q_a(tau_i) - q_b(tau_j) as [..., N_a, N_b] in float32 (leading dims broadcast)."""
  q_a = jnp.asarray(q_a, jnp.float32)
  q_b = jnp.asarray(q_b, jnp.float32)
  if q_a.ndim != q_b.ndim:
    raise ValueError(f"q_a {q_a.shape} and q_b {q_b.shape} must have the same rank")
  lead = jnp.broadcast_shapes(q_a.shape[:-1], q_b.shape[:-1])        # e.g. [B, G, 1] x [B, 1, G]
  q_a = jnp.broadcast_to(q_a, lead + q_a.shape[-1:])
  q_b = jnp.broadcast_to(q_b, lead + q_b.shape[-1:])
  return q_a[..., :, None] - q_b[..., None, :]


def preference_prob(q_a: jax.Array, q_b: jax.Array, *, temperature: float | None = None) -> jax.Array:
  """P(a > b) for independent reward distributions given by quantiles.

  Soft: P = (1/N^2) sum_{i,j} sigmoid((q_a(tau_i) - q_b(tau_j)) / T);  hard (temperature=None):
  P = (1/N^2) sum_{i,j} [1{q_a(tau_i) > q_b(tau_j)} + 1/2 1{q_a(tau_i) = q_b(tau_j)}].

  [inferred] quantile form of distributional preference learning ("Distributional Preference Learning:
  Understanding and Accounting for Hidden Context in RLHF", arXiv:2312.08358, Sec. 4; its categorical head
  uses the same half-tie rule).

  Args:
    q_a: [..., N] quantiles of response a on a shared (or exchangeable) tau grid.
    q_b: [..., N'] quantiles of response b (leading dimensions broadcast against q_a's, same rank).
    temperature: T of the soft probability; None gives the hard probability (a metric, zero gradient).

  Returns:
    [...] float32 probabilities; P(a > b) + P(b > a) = 1.
  """
  diff = _pair_diffs(q_a, q_b)                                       # [..., N, N']
  if temperature is None:
    wins = (diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32)
  else:
    wins = jax.nn.sigmoid(diff / temperature)
  return jnp.mean(wins, axis=(-2, -1))


def pairwise_log_prob(q_chosen: jax.Array, q_rejected: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """log P(chosen > rejected) = logsumexp_{i,j} log sigmoid(Delta_ij / T) - log N - log N', stably; [...]."""
  diff = _pair_diffs(q_chosen, q_rejected)                           # [..., N, N']
  n_a, n_b = diff.shape[-2], diff.shape[-1]
  lse = jax.nn.logsumexp(jax.nn.log_sigmoid(diff / temperature), axis=(-2, -1))
  return lse - math.log(n_a) - math.log(n_b)


def pairwise_loss(q_chosen: jax.Array, q_rejected: jax.Array, *, temperature: float = 1.0,
                  center_coef: float = 0.0, mean_anchor_coef: float = 0.0):
  """Pairwise distributional preference loss -log P(chosen > rejected) from quantiles.

  L = -mean_b log[(1/N^2) sum_{i,j} sigmoid((q_w(tau_i) - q_l(tau_j)) / T)]
      + c * mean_b (mean q_w + mean q_l)^2 + a * mean_b softplus(-(mean q_w - mean q_l)),
  with T = temperature, c = center_coef (reward centring on the means, ALGORITHMS.md section 7) and
  a = mean_anchor_coef (a Bradley-Terry term on the means that keeps the BT scale).

  [inferred] quantile form of "Distributional Preference Learning" (arXiv:2312.08358, Sec. 4); with N = 1 and
  T = 1 it is exactly the Bradley-Terry loss ``rewards.bradley_terry.loss``.

  Args:
    q_chosen: [B, N] quantiles of the preferred responses.
    q_rejected: [B, N] quantiles of the dispreferred responses.
    temperature: T_p of the soft comparison.
    center_coef: centring weight on the response means.
    mean_anchor_coef: weight of the Bradley-Terry anchor on the response means.

  Returns:
    (loss, metrics): ``accuracy`` is strict on the hard probability (P_hard > 0.5), ``mean_accuracy`` strict on
    the means, ``pref_prob`` the mean soft probability, plus ``crossing`` (mean quantile-crossing penalty).

  Warning:
    Assumes Z_w and Z_l independent (all N^2 cross pairs count), unlike same-tau comparisons used by quantile
    dominance (``rewards.dominance``).
  """
  q_w = jnp.asarray(q_chosen, jnp.float32)
  q_l = jnp.asarray(q_rejected, jnp.float32)
  if q_w.ndim != 2 or q_w.shape != q_l.shape:
    raise ValueError(f"q_chosen {q_w.shape} and q_rejected {q_l.shape} must both be [B, N]")
  log_p = pairwise_log_prob(q_w, q_l, temperature=temperature)      # [B]
  mean_w, mean_l = jnp.mean(q_w, axis=-1), jnp.mean(q_l, axis=-1)   # [B]
  nll = -jnp.mean(log_p)
  center = jnp.mean(jnp.square(mean_w + mean_l))
  anchor = jnp.mean(jax.nn.softplus(-(mean_w - mean_l)))
  total = nll + center_coef * center + mean_anchor_coef * anchor
  hard = preference_prob(q_w, q_l)
  metrics = {
      "nll": nll,
      "center": center,
      "anchor": anchor,
      "accuracy": jnp.mean((hard > 0.5).astype(jnp.float32)),
      "mean_accuracy": jnp.mean((mean_w > mean_l).astype(jnp.float32)),
      "pref_prob": jnp.mean(jnp.exp(log_p)),
      "margin": jnp.mean(mean_w - mean_l),
      "crossing": 0.5 * (crossing_penalty(q_w) + crossing_penalty(q_l)),
  }
  return total, metrics


def crossing_penalty(q: jax.Array) -> jax.Array:
  """Quantile-crossing penalty mean_b sum_i relu(q_i - q_{i+1}) for quantiles on an ascending grid; scalar."""
  q = jnp.asarray(q, jnp.float32)
  return jnp.mean(jnp.sum(jax.nn.relu(q[..., :-1] - q[..., 1:]), axis=-1))


def scalarize(q: jax.Array, *, kind: str = "mean", alpha: float = 0.25) -> jax.Array:
  """Turns quantiles on the midpoint grid into one scalar reward per row.

  ``mean``: risk-neutral (1/N) sum_i q(tau_i).  ``cvar``: mean of the lowest ceil(alpha N) quantiles.
  ``quantile``: the lower quantile q(alpha), linearly interpolated between midpoint-grid quantiles (clamped
  at the ends).  Quantiles are sorted first, so crossing heads still give monotone risk measures.

  Args:
    q: [..., N] quantiles at ``midpoint_taus(N)``.
    kind: "mean" | "cvar" | "quantile".
    alpha: risk level in (0, 1] for "cvar" and "quantile" (static).

  Returns:
    [...] float32 scalar rewards.
  """
  q = jnp.asarray(q, jnp.float32)
  n = q.shape[-1]
  if kind == "mean":
    return jnp.mean(q, axis=-1)
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"alpha must be in (0, 1], got {alpha}")
  q_sorted = jnp.sort(q, axis=-1)
  if kind == "cvar":
    k = max(1, math.ceil(alpha * n - 1e-9))
    return jnp.mean(q_sorted[..., :k], axis=-1)
  if kind == "quantile":
    pos = min(max(alpha * n - 0.5, 0.0), n - 1.0)                    # fractional index on the midpoint grid
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    w = pos - lo
    return (1.0 - w) * q_sorted[..., lo] + w * q_sorted[..., hi]
  raise ValueError(f"unknown scalarisation {kind!r}; choose one of ['cvar', 'mean', 'quantile']")
