"""The algorithm switchboard: one row per RL algorithm, and the host-side batch building the rows share.

A row (``Algorithm``) owns everything that differs between algorithms:
- ``objective``: ``(logp, batch, **loss_kwargs) -> (loss, metrics)`` inside the jitted step;
- ``batcher``: how a rollout and its rewards become a train batch (``Batcher``; DNO's keeps replay pools and
  swaps the reference, ``rlj/dno_replay.py``);
- ``uses_reference``: whether reference log-probs are computed (on the batch's rows, after it is built);
- ``unit``: rows that stay together when batches are shuffled and split (1, or 2 for pairs);
- ``check``: the settings it refuses, as ``SettingError(config key, message)`` before anything is built.

The loop (``rlj/rl_loop.py``), the launcher and ``launch.aot`` only read rows: adding an algorithm is its loss
in ``algorithms/`` plus one row in ``ALGORITHMS`` below.

Rows are group-major (row b*G + g is completion g of prompt b). Pairwise algorithms keep the two members of a
pair in adjacent rows (2i, 2i+1), so minibatches and micro-batches split whole pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import cispo, common, gdpo, grpo, gspo, p3o, winrate
from algorithms import kl as kl_lib
from rewards import combine
from rlj import dno_replay
from rlj.batches import ROLLOUT_KEYS, Batch, Batcher, SettingError, Settings

# ----------------------------------------------------------------------------------------------------------
# Objectives (inside jit): logp [rows, T] + batch -> (loss, metrics)
# ----------------------------------------------------------------------------------------------------------

def old_logp_of(logp, batch):
  """The batch's ``old_logp``; without one the update is on-policy (one epoch, one minibatch) and the old
  log-probs are the current ones under stop-gradient: ratio 1 in value, the policy gradient in gradient."""
  old = batch.get("old_logp")
  return jax.lax.stop_gradient(logp) if old is None else old


def policy_gradient_objective(logp, batch, **loss_kwargs):
  """GRPO / GDPO / RLOO: the clipped surrogate of ``algorithms.grpo.loss`` with global normalisers (and the
  batch's ``is_weight``, the sampler-trainer mismatch correction, when it has one)."""
  ref = batch.get("ref_logp")
  return grpo.loss(logp, old_logp_of(logp, batch), ref, batch["adv"], batch["mask"], num_tokens=batch["num_tokens"],
                   num_seqs=batch["num_seqs"], token_weight=batch.get("is_weight"), **loss_kwargs)


def gspo_objective(logp, batch, **loss_kwargs):
  """GSPO / GSPO-token (``algorithms.gspo.loss``) normalised by the whole step's sequence count."""
  return gspo.loss(logp, old_logp_of(logp, batch), batch.get("ref_logp"), batch["adv"], batch["mask"],
                   num_seqs=batch["num_seqs"], **loss_kwargs)


def cispo_objective(logp, batch, **loss_kwargs):
  """CISPO (``algorithms.cispo.loss``) normalised by the whole step's token / sequence counts."""
  return cispo.loss(logp, old_logp_of(logp, batch), batch.get("ref_logp"), batch["adv"], batch["mask"],
                    num_tokens=batch["num_tokens"], num_seqs=batch["num_seqs"], **loss_kwargs)


def p3o_objective(logp, batch, **loss_kwargs):
  """P3O on adjacent row pairs: ``algorithms.p3o.loss(logp[B,2,T], ...)``."""
  pairs = common.adjacent_pairs
  return p3o.loss(pairs(logp), pairs(old_logp_of(logp, batch)), pairs(batch["ref_logp"]), batch["pair_rewards"],
                  pairs(batch["mask"]), **loss_kwargs)


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
_win_rates = jax.jit(winrate.win_rates_from_scores)


def group_win_rates(scores: np.ndarray) -> np.ndarray:
  """Pref-GRPO style rewards from scalar scores: each completion's win rate against its group [B, G]
  (``algorithms.winrate.win_rates_from_scores``)."""
  return np.asarray(_win_rates(jnp.asarray(scores)))


def advantages(name: str, values: np.ndarray, weights: np.ndarray, adv_kwargs: Mapping[str, Any]) -> np.ndarray:
  """Per-completion advantages [B, G] for the policy-gradient algorithms.

  grpo: GRPO on the weighted reward sum (``adv_kwargs``: scale, eps, ddof; ``estimator="rloo"`` for RLOO;
  ``win_rate=True`` replaces the sum by in-group win rates). gdpo: per-reward normalisation then whitening.
  """
  kw = adv_kwargs  # every key comes from the config section algo.advantage
  if name == "gdpo":
    return np.asarray(_gdpo_adv(jnp.asarray(values), jnp.asarray(weights), eps=kw["eps"], ddof=kw["ddof"]))
  r = combine.weighted_total(values, weights)
  if kw["win_rate"]:
    r = group_win_rates(np.nan_to_num(r, nan=-np.inf))
  if kw["estimator"] == "rloo":
    return np.asarray(_rloo_adv(jnp.asarray(r)))
  return np.asarray(_grpo_adv(jnp.asarray(r), scale=kw["scale"], eps=kw["eps"], ddof=kw["ddof"]))


# ----------------------------------------------------------------------------------------------------------
# Batchers: rollout rows + rewards -> a train batch (host numpy)
# ----------------------------------------------------------------------------------------------------------

class GroupBatcher(Batcher):
  """GRPO / GDPO (and GSPO / CISPO, on GRPO's advantages): every rollout row with its advantage."""

  def __init__(self, settings: Settings, name: str):
    super().__init__(settings)
    self.name = name

  def build(self, rollout, values, weights, step):
    adv_kwargs = self.settings.options["advantage"]
    adv = advantages(self.name, values, weights, adv_kwargs)
    m = {"adv/abs_mean": float(np.abs(adv).mean()), "adv/distinct": float(len(np.unique(adv.round(4))))}
    if self.name == "gdpo":  # GDPO's resolution against GRPO on the summed reward, same rollout
      base = advantages("grpo", values, weights, adv_kwargs)
      m["adv/distinct_grpo_sum"] = float(len(np.unique(base.round(4))))
    return policy_gradient_batch(rollout, adv), m


class P3OBatcher(Batcher):
  """P3O: disjoint pairs (2j, 2j+1) inside each group with their weighted reward sums."""

  def build(self, rollout, values, weights, step):
    return p3o_batch(rollout, values, weights), {}


def policy_gradient_batch(rollout: Mapping[str, np.ndarray], adv: np.ndarray) -> Batch:
  """Rows of a rollout + advantages [B, G] -> the GRPO/GDPO train batch."""
  batch = {k: rollout[k] for k in ROLLOUT_KEYS if k in rollout}
  batch["adv"] = adv.reshape(-1).astype(np.float32)
  return batch


def p3o_batch(rollout: Mapping[str, np.ndarray], values: np.ndarray, weights: np.ndarray) -> Batch:
  """Disjoint pairs (2j, 2j+1) inside each group; the pair's rewards are the weighted reward sums (missing: 0)."""
  b, g = values.shape[:2]
  r = np.nan_to_num(combine.weighted_total(values, weights), nan=0.0)
  batch = {k: rollout[k] for k in ROLLOUT_KEYS if k in rollout}
  batch["pair_rewards"] = np.asarray(p3o.pair_up(r.reshape(b * g), g)).astype(np.float32)
  return batch


# ----------------------------------------------------------------------------------------------------------
# Checks and reference use
# ----------------------------------------------------------------------------------------------------------

def kl_coef_positive(loss_kwargs: Mapping[str, Any]) -> bool:
  return float(loss_kwargs.get("kl_coef", 0.0)) > 0


def _check_estimator(s: Settings) -> None:
  kind = s.loss_kwargs.get("kl_estimator", None)
  if kind is not None and kind not in kl_lib.KINDS:
    raise SettingError("algo.kwargs.kl_estimator", f"unknown estimator {kind!r}; choose one of {kl_lib.KINDS}")


def _check_group(s: Settings) -> None:
  _check_estimator(s)
  if s.num_generations < 2:
    raise SettingError("sampler.num_generations", f"the algorithm compares completions of a prompt: needs >= 2, "
                       f"got {s.num_generations}")
  adv = s.options["advantage"]
  if adv["scale"] not in grpo.SCALES:
    raise SettingError("algo.advantage.scale", f"{adv['scale']!r}; choose one of {grpo.SCALES}")
  if adv["estimator"] not in ("grpo", "rloo"):
    raise SettingError("algo.advantage.estimator", f"{adv['estimator']!r}; choose grpo | rloo")


def _check_p3o(s: Settings) -> None:
  _check_estimator(s)
  if s.num_generations % 2 or s.num_generations < 2:
    raise SettingError("sampler.num_generations", f"p3o pairs completions: needs an even number, got "
                       f"{s.num_generations}")
  if not kl_coef_positive(s.loss_kwargs):
    raise SettingError("algo.kwargs.kl_coef", "P3O's KL-regularised reward difference needs reference log-probs: "
                       "set it > 0")


def _group_loss_defaults(s: Settings) -> dict:
  return {"max_len": s.max_new_tokens}   # Dr. GRPO's constant normaliser


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One row of the switchboard.

  Attributes:
    objective: ``(logp, batch, **loss_kwargs) -> (loss, metrics)`` used inside the jitted step.
    batcher: ``Settings -> Batcher`` (one per run).
    unit: rows that must stay together when batches are shuffled and split (1 row, or 2 for a pair).
    sum_microbatches: whether micro-batch gradients add up (the loss is normalised by whole-step counts).
    needs_old_logp: whether the objective reads ``old_logp``.
    token_weights: whether the objective applies the batch's ``is_weight`` (the mismatch correction).
    uses_reference: ``loss_kwargs -> bool``: whether a reference model's log-probs enter the batch.
    fixed_rows: whether the batch has the rollout's rows (False: a varying number of selected pairs).
    check: ``Settings -> None``, raising ``SettingError``.
    loss_defaults: ``Settings -> dict`` of objective keyword arguments the config may leave out.
  """
  objective: Callable
  batcher: Callable[[Settings], Batcher]
  unit: int
  sum_microbatches: bool
  needs_old_logp: bool
  uses_reference: Callable[[Mapping[str, Any]], bool]
  fixed_rows: bool = True
  token_weights: bool = False
  check: Callable[[Settings], None] = lambda s: None
  loss_defaults: Callable[[Settings], dict] = lambda s: {}

  def loss_kwargs(self, settings: Settings) -> dict:
    return {**self.loss_defaults(settings), **dict(settings.loss_kwargs)}


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(policy_gradient_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                      loss_defaults=_group_loss_defaults, token_weights=True),
    "gdpo": Algorithm(policy_gradient_objective, lambda s: GroupBatcher(s, "gdpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                      loss_defaults=_group_loss_defaults, token_weights=True),
    "gspo": Algorithm(gspo_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group),
    "cispo": Algorithm(cispo_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                       needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                       loss_defaults=_group_loss_defaults),
    "p3o": Algorithm(p3o_objective, P3OBatcher, unit=2, sum_microbatches=False, needs_old_logp=True,
                     uses_reference=kl_coef_positive, check=_check_p3o),
    "dno": Algorithm(dno_replay.objective, dno_replay.DnoBatcher, unit=2, sum_microbatches=False,
                     needs_old_logp=False, uses_reference=lambda kw: True, fixed_rows=False,
                     check=dno_replay.check),
}


def get(name: str) -> Algorithm:
  """The row of algorithm ``name``; SettingError naming ``algo.name`` and the choices otherwise."""
  if name not in ALGORITHMS:
    raise SettingError("algo.name", f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
  return ALGORITHMS[name]
