"""DNO-Prct: DPO-style contrastive loss against the previous iterate, and large-margin pair selection.

Source: "Direct Nash Optimization: Teaching Language Models to Self-Improve with General Preferences"
(arXiv:2404.03715), Algorithm 2 (DNO-Prct) and Algorithm 1 / Eq. 8 (soft labels). Shape letters: B pairs or
prompts, C candidates per prompt, M selected pair slots, T completion tokens.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from algorithms import common


def _seq_log_ratio(logp, ref_logp, mask):
  chex.assert_rank([logp, ref_logp, mask], 2)
  chex.assert_equal_shape([logp, ref_logp, mask])
  logp, ref_logp, mask = common.f32(logp, ref_logp, mask)
  return jnp.sum(mask * (logp - jax.lax.stop_gradient(ref_logp)), axis=-1)  # [B]


def loss(logp_chosen: jax.Array, ref_logp_chosen: jax.Array, mask_chosen: jax.Array, logp_rejected: jax.Array,
         ref_logp_rejected: jax.Array, mask_rejected: jax.Array, *, beta: float = 0.1, soft_labels: bool = False,
         score_chosen: Optional[jax.Array] = None, score_rejected: Optional[jax.Array] = None,
         label: Optional[jax.Array] = None, valid: Optional[jax.Array] = None):
  """DNO-Prct pair loss; the reference is the PREVIOUS ITERATE pi_t, not the SFT model.

    h = [log pi(y+) - log pi_t(y+)] - [log pi(y-) - log pi_t(y-)]       (sequence sums over the mask)
    hard:  L = -log sigmoid(beta h) = softplus(-beta h)                  (Algorithm 2, line 6; DPO objective)
    soft:  L = -[l log sigmoid(beta h) + (1 - l) log sigmoid(-beta h)],  l = sigmoid(r_t(y+) - r_t(y-))  (Eq. 8)

  beta is eta in the paper (0.1 or 0.05). At the start of an iteration (pi = pi_t) L = log 2 for every pair.

  Args:
    logp_chosen, ref_logp_chosen, mask_chosen: [B, T] token log-probs of y+ under pi and pi_t, and its mask.
    logp_rejected, ref_logp_rejected, mask_rejected: [B, T] the same for y-.
    beta: inverse temperature.
    soft_labels: use the soft-label loss with l = sigmoid(score_chosen - score_rejected) (win rates r_t).
    score_chosen, score_rejected: [B] scores (e.g. win rates), required when soft_labels and `label` is None.
    label: [B] explicit probability that y+ beats y- (overrides the scores; 1 gives the hard loss).
    valid: [B] pair mask (e.g. from `select_pairs`); the loss averages over valid pairs only.

  Returns:
    (loss, metrics): float32 scalar and a dict of float32 scalars.

  Warning:
    TRL `DPOTrainer` (loss_type "sigmoid") and OpenRLHF `DPOLoss` compute the same value when their ref_model is
    the previous checkpoint; DPO proper keeps pi_SFT as reference for the whole run. The paper's undefined
    "alpha 0.005" is not reproduced.
  """
  h_c = _seq_log_ratio(logp_chosen, ref_logp_chosen, mask_chosen)
  h_r = _seq_log_ratio(logp_rejected, ref_logp_rejected, mask_rejected)
  chex.assert_equal_shape([h_c, h_r])
  logits = beta * (h_c - h_r)  # [B]
  if label is None and soft_labels:
    if score_chosen is None or score_rejected is None:
      raise ValueError("soft_labels=True needs score_chosen and score_rejected (or an explicit label)")
    label = jax.nn.sigmoid(common.f32(score_chosen) - common.f32(score_rejected))
  if label is None:
    per_pair = jax.nn.softplus(-logits)
  else:
    label = jax.lax.stop_gradient(common.f32(label))
    chex.assert_equal_shape([label, logits])
    per_pair = label * jax.nn.softplus(-logits) + (1.0 - label) * jax.nn.softplus(logits)
  w = jnp.ones_like(per_pair) if valid is None else common.f32(valid)
  chex.assert_equal_shape([w, per_pair])
  total = common.masked_mean(per_pair, w)
  metrics = {
      "accuracy": common.masked_mean(logits > 0, w),
      "margin": common.masked_mean(jax.lax.stop_gradient(logits), w),
      "log_ratio_chosen": common.masked_mean(jax.lax.stop_gradient(h_c), w),
      "log_ratio_rejected": common.masked_mean(jax.lax.stop_gradient(h_r), w),
      "num_pairs": jnp.sum(w),
  }
  return total, metrics


def select_pairs(scores: jax.Array, *, min_chosen_score, min_margin, min_margin_policy_chosen=None,
                 from_policy: Optional[jax.Array] = None, rejected_only: Optional[jax.Array] = None,
                 max_pairs: Optional[int] = None):
  """Large-margin preference pairs from per-candidate scores, with fixed output shapes (jittable).

  An ordered pair (i, j), i != j, qualifies when
    scores[i] >= min_chosen_score,
    scores[j] <= scores[i] - m_i,  m_i = min_margin_policy_chosen if from_policy[i] (and that is set) else min_margin,
    and candidate i is not `rejected_only`.
  Every qualifying pair is returned (teacher > student, student > teacher, student > student). Valid pairs come
  first, sorted by decreasing margin, ties in the order (0,1), (0,2), ..., (1,0), ...; the output is a
  deterministic function of the inputs. DNO (arXiv:2404.03715), Algorithm 2, line 4; the paper uses a 6-point
  score with min_chosen_score=5, min_margin=2 and min_margin_policy_chosen=1; with win-rate scores the
  thresholds are in [0, 1].

  Args:
    scores: [B, C] scores per candidate (NaN candidates never qualify).
    min_chosen_score: lowest score of a chosen response.
    min_margin: smallest score margin of a pair.
    min_margin_policy_chosen: relaxed margin when the chosen response is a policy sample; None keeps min_margin.
    from_policy: [B, C] bool, True for policy samples (False for a teacher response); None = no candidate is
      flagged, so `min_margin` applies everywhere.
    rejected_only: [B, C] bool, candidates that may only be rejected (e.g. degenerate, repetitive samples).
    max_pairs: number of slots M (a Python int); None = C * (C - 1), every ordered pair.

  Returns:
    (chosen_idx [B, M] int32, rejected_idx [B, M] int32, valid [B, M] bool); indices of invalid slots are
    arbitrary but in range, so gather first and mask afterwards.
  """
  chex.assert_rank(scores, 2)
  s = common.f32(scores)
  num_c = s.shape[1]
  ii, jj = np.nonzero(~np.eye(num_c, dtype=bool))  # every ordered pair, row-major
  num_m = ii.size if max_pairs is None else int(max_pairs)
  s_i, s_j = s[:, ii], s[:, jj]  # [B, C(C-1)]
  margin = jnp.full_like(s_i, min_margin)
  if from_policy is not None:
    chex.assert_equal_shape([from_policy, scores])
    if min_margin_policy_chosen is not None:
      margin = jnp.where(from_policy[:, ii], min_margin_policy_chosen, margin)
  qualifies = (s_i >= min_chosen_score) & (s_j <= s_i - margin)
  if rejected_only is not None:
    chex.assert_equal_shape([rejected_only, scores])
    qualifies = qualifies & ~rejected_only[:, ii]
  key = jnp.where(qualifies, -(s_i - s_j), jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)[:, :num_m]  # [B, M]
  chosen = jnp.asarray(ii, jnp.int32)[order]
  rejected = jnp.asarray(jj, jnp.int32)[order]
  return chosen, rejected, jnp.take_along_axis(qualifies, order, axis=-1)


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Gathers per-candidate arrays for selected pairs: x [B, C, ...], idx [B, M] -> [B, M, ...]."""
  chex.assert_rank(idx, 2)
  expand = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, expand, axis=1)
