"""Per-algorithm glue between a rollout and the jitted step: train batches and objectives.

For each algorithm this module says
- how sampled rows and their rewards become a train batch (``make_*_batch``, host-side numpy plus the
  algorithm's jittable advantage / pair-selection function), and
- how the step's log-probs and that batch become ``(loss, metrics)`` (``*_objective``, called inside jit).

Rows are group-major (row b*G + g is completion g of prompt b). Pairwise algorithms keep the two members of
a pair in adjacent rows (2i, 2i+1), so minibatches and micro-batches split whole pairs.

The table ``ALGORITHMS`` below is the one switchboard: ``launch/train.py`` validates ``config.algo.name``
against it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import dno, gdpo, grpo, p3o, winrate

Batch = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Objectives (inside jit): logp [rows, T] + batch -> (loss, metrics)
# ----------------------------------------------------------------------------------------------------------

def policy_gradient_objective(logp, batch, **loss_kwargs):
  """GRPO / GDPO / RLOO: the clipped surrogate of ``algorithms.grpo.loss`` with global normalisers."""
  ref = batch.get("ref_logp")
  return grpo.loss(logp, batch["old_logp"], ref, batch["adv"], batch["mask"], num_tokens=batch["num_tokens"],
                   num_seqs=batch["num_seqs"], **loss_kwargs)


def _pairs(x):
  return x.reshape((x.shape[0] // 2, 2) + x.shape[1:])


def p3o_objective(logp, batch, **loss_kwargs):
  """P3O on adjacent row pairs: ``algorithms.p3o.loss(logp[B,2,T], ...)``."""
  return p3o.loss(_pairs(logp), _pairs(batch["old_logp"]), _pairs(batch["ref_logp"]), batch["pair_rewards"],
                  _pairs(batch["mask"]), **loss_kwargs)


def dno_objective(logp, batch, **loss_kwargs):
  """DNO on (chosen, rejected) row pairs against the previous iterate's log-probs (``ref_logp``)."""
  lp, ref, mask = _pairs(logp), _pairs(batch["ref_logp"]), _pairs(batch["mask"])
  scores = batch["pair_scores"]
  return dno.loss(lp[:, 0], ref[:, 0], mask[:, 0], lp[:, 1], ref[:, 1], mask[:, 1],
                  score_chosen=scores[:, 0], score_rejected=scores[:, 1], valid=batch["pair_valid"], **loss_kwargs)


def sft_objective(logp, batch):
  """Supervised fine-tuning: mean negative log-likelihood over the target tokens."""
  mask = batch["mask"].astype(jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  nll = -(logp * mask).sum() / n
  return nll, {"nll": nll, "target_tokens": mask.sum()}


# ----------------------------------------------------------------------------------------------------------
# Scalar rewards and advantages (host side; the advantage functions are jitted once per shape)
# ----------------------------------------------------------------------------------------------------------

_grpo_adv = jax.jit(grpo.advantages, static_argnames=("scale", "eps", "ddof"))
_rloo_adv = jax.jit(grpo.rloo_advantages)
_gdpo_adv = jax.jit(gdpo.advantages, static_argnames=("eps", "ddof"))
_win_rates = jax.jit(winrate.win_rates, static_argnames=("kind", "hard", "symmetrize"))
_select = jax.jit(dno.select_pairs, static_argnames=("min_chosen_score", "min_margin", "min_margin_policy_chosen",
                                                     "max_pairs"))


def scalar_rewards(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """[B, G, K] -> [B, G]: weighted sum; NaN components contribute 0, rows with every component NaN stay NaN."""
  all_nan = np.all(np.isnan(values), axis=-1)
  total = np.nansum(values * weights, axis=-1).astype(np.float32)
  return np.where(all_nan, np.nan, total)


def group_win_rates(scores: np.ndarray) -> np.ndarray:
  """Pref-GRPO style rewards from scalar scores: each completion's win rate against its group [B, G]."""
  prefs = (scores[:, :, None] > scores[:, None, :]).astype(np.float32)
  prefs += 0.5 * (scores[:, :, None] == scores[:, None, :])
  return np.asarray(_win_rates(jnp.asarray(prefs), kind="prob", hard=False, symmetrize=True))


def advantages(name: str, values: np.ndarray, weights: np.ndarray, adv_kwargs: Mapping[str, Any]) -> np.ndarray:
  """Per-completion advantages [B, G] for the policy-gradient algorithms.

  grpo: GRPO on the weighted reward sum (``adv_kwargs``: scale, eps, ddof; ``estimator="rloo"`` for RLOO;
  ``win_rate=True`` replaces the sum by in-group win rates). gdpo: per-reward normalisation then whitening.
  """
  kw = adv_kwargs  # every key comes from the config section algo.advantage
  if name == "gdpo":
    return np.asarray(_gdpo_adv(jnp.asarray(values), jnp.asarray(weights), eps=kw["eps"], ddof=kw["ddof"]))
  r = scalar_rewards(values, weights)
  if kw["win_rate"]:
    r = group_win_rates(np.nan_to_num(r, nan=-np.inf))
  if kw["estimator"] == "rloo":
    return np.asarray(_rloo_adv(jnp.asarray(r)))
  return np.asarray(_grpo_adv(jnp.asarray(r), scale=kw["scale"], eps=kw["eps"], ddof=kw["ddof"]))


# ----------------------------------------------------------------------------------------------------------
# Train batches (host numpy)
# ----------------------------------------------------------------------------------------------------------

def policy_gradient_batch(rollout: Mapping[str, np.ndarray], adv: np.ndarray) -> Batch:
  """Rows of a rollout + advantages [B, G] -> the GRPO/GDPO train batch."""
  batch = {k: rollout[k] for k in ("tokens", "attn_mask", "mask", "old_logp", "ref_logp") if k in rollout}
  batch["adv"] = adv.reshape(-1).astype(np.float32)
  return batch


def p3o_batch(rollout: Mapping[str, np.ndarray], values: np.ndarray, weights: np.ndarray) -> Batch:
  """Disjoint pairs (2j, 2j+1) inside each group; the pair's rewards are the weighted reward sums."""
  b, g = values.shape[:2]
  if g % 2:
    raise ValueError(f"P3O pairs completions: config key sampler.num_generations must be even, got {g}")
  r = np.nan_to_num(scalar_rewards(values, weights), nan=0.0)
  if "ref_logp" not in rollout:
    raise ValueError("P3O's KL-regularised reward difference needs reference log-probs: set "
                     "config key algo.kwargs.kl_coef > 0")
  batch = {k: rollout[k] for k in ("tokens", "attn_mask", "mask", "old_logp", "ref_logp")}
  batch["pair_rewards"] = r.reshape(b * g // 2, 2).astype(np.float32)
  return batch


def dno_pairs(rollout: Mapping[str, np.ndarray], values: np.ndarray, weights: np.ndarray, *,
              min_chosen_score: float, min_margin: float, max_pairs: int, win_rate: bool) -> tuple[Batch, dict]:
  """Large-margin (chosen, rejected) pairs of one rollout, as interleaved rows with a ``pair_valid`` mask."""
  scores = scalar_rewards(values, weights)
  missing = np.isnan(scores)             # every component missing: the completion is in no pair
  if win_rate:
    scores = np.where(missing, np.nan, group_win_rates(np.where(missing, -np.inf, scores)))
  b, g = scores.shape
  chosen, rejected, valid = (np.asarray(x) for x in _select(
      jnp.asarray(scores), min_chosen_score=float(min_chosen_score), min_margin=float(min_margin),
      max_pairs=int(max_pairs)))
  base = (np.arange(b) * g)[:, None]
  rows = np.stack([base + chosen, base + rejected], axis=-1).reshape(-1)       # [B*M*2] interleaved
  batch = {k: rollout[k][rows] for k in ("tokens", "attn_mask", "mask")}
  sc = np.stack([np.take_along_axis(scores, chosen, 1), np.take_along_axis(scores, rejected, 1)], -1)
  batch["pair_scores"] = np.where(valid[..., None], sc, 0.0).reshape(-1, 2).astype(np.float32)
  batch["pair_valid"] = valid.reshape(-1).astype(np.float32)
  return batch, {"dno/valid_pairs": float(valid.sum()), "dno/prompts_with_pairs": float(valid.any(1).mean())}


def pad_rows_to(batch: Batch, width: int, pad_id: int) -> Batch:
  """Left-pads the token columns of a pair batch to ``width`` (positions come from the mask)."""
  s = batch["tokens"].shape[1]
  if s == width:
    return batch
  extra = width - s
  out = dict(batch)
  out["tokens"] = np.pad(batch["tokens"], ((0, 0), (extra, 0)), constant_values=pad_id)
  out["attn_mask"] = np.pad(batch["attn_mask"], ((0, 0), (extra, 0)))
  return out


def concat_batches(batches: list[Batch], pad_id: int) -> Batch:
  width = max(b["tokens"].shape[1] for b in batches)
  batches = [pad_rows_to(b, width, pad_id) for b in batches]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One row of the switchboard.

  Attributes:
    objective: ``(logp, batch, **loss_kwargs) -> (loss, metrics)`` used inside the jitted step.
    unit: rows that must stay together when batches are shuffled and split (1 row, or 2 for a pair).
    sum_microbatches: whether micro-batch gradients add up (the loss is normalised by whole-step counts).
    needs_old_logp: whether the objective reads ``old_logp``.
  """
  objective: Callable
  unit: int
  sum_microbatches: bool
  needs_old_logp: bool


ALGORITHMS = {
    "grpo": Algorithm(policy_gradient_objective, unit=1, sum_microbatches=True, needs_old_logp=True),
    "gdpo": Algorithm(policy_gradient_objective, unit=1, sum_microbatches=True, needs_old_logp=True),
    "p3o": Algorithm(p3o_objective, unit=2, sum_microbatches=False, needs_old_logp=True),
    "dno": Algorithm(dno_objective, unit=2, sum_microbatches=False, needs_old_logp=False),
}


def pick(table: Mapping[str, Any], name: str, what: str):
  """``table[name]`` or a ValueError naming the valid choices and the config key."""
  if name not in table:
    raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
  return table[name]


def take_units(batch: Batch, idx: np.ndarray, unit: int) -> Batch:
  """The units ``idx`` (rows, or pairs of adjacent rows when ``unit == 2``) of a batch.

  Per-row arrays are indexed by their rows; per-pair arrays (keys ``pair_*``) by ``idx`` itself.
  """
  idx = np.asarray(idx, np.int64)
  rows = (idx[:, None] * unit + np.arange(unit)[None]).reshape(-1)
  return {k: v[idx] if k.startswith("pair_") else v[rows] for k, v in batch.items()}


def minibatches(batch: Batch, *, num_minibatches: int, unit: int, rng: np.random.Generator,
                shuffle: bool = True) -> list[Batch]:
  """Splits a batch into ``num_minibatches`` optimizer-step batches of whole units (rows or pairs).

  Per-row arrays have the row count as leading dim; per-pair arrays (``pair_*``) have rows / 2. Adds the
  step normalisers ``num_tokens`` (mask sum) and ``num_seqs`` (rows with a token) of each minibatch.
  """
  rows = batch["tokens"].shape[0]
  units = rows // unit
  if units % num_minibatches:
    raise ValueError(f"{units} {'pairs' if unit == 2 else 'rows'} do not split into train.num_minibatches="
                     f"{num_minibatches}")
  order = rng.permutation(units) if shuffle else np.arange(units)
  out = []
  for part in np.split(order, num_minibatches):
    mb = take_units(batch, part, unit)
    m = mb["mask"]
    mb["num_tokens"] = np.float32(max(m.sum(), 1.0))
    mb["num_seqs"] = np.float32(max((m.sum(-1) > 0).sum(), 1))
    out.append(mb)
  return out
