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

from algorithms import cispo, common, gdpo, grpo, gspo, p3o, process, running_moments, winrate
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


def batch_kl_coef(batch, loss_kwargs):
  """``loss_kwargs`` with ``kl_coef`` taken from the batch when it carries one: the adaptive KL controller's beta
  (``rlj.kl_controller``), a traced scalar, so a new value does not recompile the step."""
  if "kl_coef" not in batch:
    return loss_kwargs
  return {**loss_kwargs, "kl_coef": batch["kl_coef"]}


def policy_gradient_objective(logp, batch, **loss_kwargs):
  """GRPO / GDPO / RLOO: the clipped surrogate of ``algorithms.grpo.loss`` with global normalisers (and the
  batch's ``is_weight``, the sampler-trainer mismatch correction, when it has one)."""
  loss_kwargs = batch_kl_coef(batch, loss_kwargs)
  ref = batch.get("ref_logp")
  return grpo.loss(logp, old_logp_of(logp, batch), ref, batch["adv"], batch["mask"], num_tokens=batch["num_tokens"],
                   num_seqs=batch["num_seqs"], token_weight=batch.get("is_weight"), **loss_kwargs)


def gspo_objective(logp, batch, **loss_kwargs):
  """GSPO / GSPO-token (``algorithms.gspo.loss``) normalised by the whole step's sequence count."""
  loss_kwargs = batch_kl_coef(batch, loss_kwargs)
  return gspo.loss(logp, old_logp_of(logp, batch), batch.get("ref_logp"), batch["adv"], batch["mask"],
                   num_seqs=batch["num_seqs"], **loss_kwargs)


def cispo_objective(logp, batch, **loss_kwargs):
  """CISPO (``algorithms.cispo.loss``) normalised by the whole step's token / sequence counts."""
  loss_kwargs = batch_kl_coef(batch, loss_kwargs)
  return cispo.loss(logp, old_logp_of(logp, batch), batch.get("ref_logp"), batch["adv"], batch["mask"],
                    num_tokens=batch["num_tokens"], num_seqs=batch["num_seqs"], **loss_kwargs)


def p3o_objective(logp, batch, **loss_kwargs):
  """P3O on adjacent row pairs: ``algorithms.p3o.loss(logp[B,2,T], ...)``."""
  loss_kwargs = batch_kl_coef(batch, loss_kwargs)
  pairs = common.adjacent_pairs
  return p3o.loss(pairs(logp), pairs(old_logp_of(logp, batch)), pairs(batch["ref_logp"]), batch["pair_rewards"],
                  pairs(batch["mask"]), **loss_kwargs)


def dno_objective(logp, batch, **loss_kwargs):
  """DNO (``rlj.dno_replay.objective``) plus the diagnostic ``kl``: the loss has no KL term, so the metric is
  ``reference_kl`` over the valid pairs' completion tokens (its reference is the previous iterate)."""
  loss, metrics = dno_replay.objective(logp, batch, **loss_kwargs)
  rows_valid = jnp.repeat(batch["pair_valid"], 2)[:, None]              # pairs are adjacent rows (2i, 2i+1)
  metrics["kl"] = reference_kl(logp, batch["ref_logp"], batch["mask"] * rows_valid)
  return loss, metrics


def reference_kl(logp, ref_logp, mask):
  """A diagnostic of KL(pi_theta || pi_ref) for objectives without a KL term: the token mean of the k3 estimate
  (Schulman, "Approximating KL Divergence", 2020; ``algorithms.kl.estimate``) on the batch's tokens, from
  the log-probs the step computes anyway (no gradient, no extra forward pass). The tokens come from the
  sampler, so it is unbiased for the policy that sampled them (the current one before its first update)."""
  kl = kl_lib.estimate(jax.lax.stop_gradient(logp), ref_logp, "k3")
  return common.masked_mean(kl, mask)


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
_process_adv = jax.jit(process.advantages, static_argnames=("num_tokens", "scale", "eps", "ddof"))


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


def process_advantages(rollout: Mapping[str, np.ndarray], num_generations: int,
                       adv_kwargs: Mapping[str, Any]) -> np.ndarray:
  """Per-token advantages [N, T] of GRPO with process supervision (``algo.advantage.estimator="process"``,
  ``algorithms.process.advantages``) from the rollout's ``step_rewards`` / ``step_ends`` [N, S] (S step slots:
  NaN / -1 past a row's last step; ``rewards.steps``)."""
  if "step_rewards" not in rollout:
    raise ValueError("algo.advantage.estimator='process' needs the rollout's step rewards (step_rewards, "
                     "step_ends from rewards.steps); this rollout has none")
  r, ends = np.asarray(rollout["step_rewards"], np.float32), np.asarray(rollout["step_ends"], np.int32)
  n, s = r.shape
  shape = (n // num_generations, num_generations, s)
  mask = (ends >= 0).astype(np.float32)
  kw = adv_kwargs
  adv = _process_adv(jnp.asarray(r.reshape(shape)), jnp.asarray(mask.reshape(shape)),
                     jnp.asarray(ends.reshape(shape)), num_tokens=int(rollout["mask"].shape[1]),
                     scale=kw["scale"], eps=kw["eps"], ddof=kw["ddof"])
  return np.asarray(adv)


# ----------------------------------------------------------------------------------------------------------
# Batchers: rollout rows + rewards -> a train batch (host numpy)
# ----------------------------------------------------------------------------------------------------------

class GroupBatcher(Batcher):
  """GRPO / GDPO (and GSPO / CISPO, on GRPO's advantages): every rollout row with its advantage; with
  ``algo.advantage.estimator="process"`` (GRPO) its per-token advantages [N, T] from the step rewards."""

  def __init__(self, settings: Settings, name: str):
    super().__init__(settings)
    self.name = name

  def build(self, rollout, values, weights, step):
    adv_kwargs = self.settings.options["advantage"]
    if adv_kwargs["estimator"] == "process":   # per-token advantages [N, T] from step rewards
      adv = process_advantages(rollout, self.settings.num_generations, adv_kwargs)
      batch = policy_gradient_batch(rollout, np.zeros(adv.shape[0], np.float32))
      batch["adv"] = adv.astype(np.float32)
      ends = np.asarray(rollout["step_ends"])
      mask = np.asarray(rollout["mask"]) > 0
      scored = np.asarray(rollout["step_rewards"])[ends >= 0]
      scored = scored[~np.isnan(scored)]
      return batch, {"adv/abs_mean": float(np.abs(adv[mask]).mean()) if mask.any() else 0.0,
                     "process/steps_mean": float((ends >= 0).sum(-1).mean()),
                     "process/step_reward_mean": float(scored.mean()) if scored.size else 0.0}
    adv = advantages(self.name, values, weights, adv_kwargs)
    m = {"adv/abs_mean": float(np.abs(adv).mean()), "adv/distinct": float(len(np.unique(adv.round(4))))}
    if self.name == "gdpo":  # GDPO's resolution against GRPO on the summed reward, same rollout
      base = advantages("grpo", values, weights, adv_kwargs)
      m["adv/distinct_grpo_sum"] = float(len(np.unique(base.round(4))))
    return policy_gradient_batch(rollout, adv), m


P3O_REWARD_NORMS = ("none", "diff_std", "score_std")


class P3OBatcher(Batcher):
  """P3O: disjoint pairs (2j, 2j+1) inside each group with their weighted reward sums, divided by a running std
  when ``algo.p3o.reward_norm`` asks for one:

  - "diff_std": the std of the pairs' reward differences r_1 - r_2, over every pair of every step so far;
  - "score_std": the std of the rewards themselves, over every completion so far: the P3O authors' code
    (arXiv:2310.00212; their trlx trainer keeps ``RunningMoments`` of the rollout scores and divides the scores
    by its std, ``scale_reward="running"``);
  - "none": the raw rewards.

  The pairwise loss only sees r_1 - r_2, and it is invariant to a per-prompt constant added to both; the
  differences' std is the scale of what the loss sees, while the scores' std also counts the spread between
  prompts. Both are running (``algorithms.running_moments``, unbiased as in the authors' code) and include this
  step's values (update, then scale, as the authors do); while the std is 0 (fewer than two values, or all
  equal) the rewards stay as they are. The moments come from the gathered rewards of the whole batch, so every
  process holds the same; they are host state, kept in every checkpoint.
  """

  def __init__(self, settings: Settings):
    super().__init__(settings)
    self.norm = dict(settings.options.get("p3o", {})).get("reward_norm", "none")
    self.moments = running_moments.Moments()

  def build(self, rollout, values, weights, step):
    batch = p3o_batch(rollout, values, weights)
    if self.norm == "none":
      return batch, {}
    r = batch["pair_rewards"].astype(np.float64)                               # [pairs, 2]
    self.moments = running_moments.update(self.moments, r[:, 0] - r[:, 1] if self.norm == "diff_std" else r)
    std = running_moments.std(self.moments)
    if std > 0:
      batch["pair_rewards"] = (r / std).astype(np.float32)
    return batch, {"p3o/reward_std": std, "p3o/reward_norm_count": self.moments.count}

  def host_state(self) -> dict[str, np.ndarray]:
    if self.norm == "none":
      return {}
    return {f"p3o_norm/{k}": np.float64(v) for k, v in self.moments._asdict().items()}

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    if self.norm != "none" and "p3o_norm/count" in host:
      fields = running_moments.Moments._fields
      self.moments = running_moments.Moments(**{k: float(host[f"p3o_norm/{k}"]) for k in fields})


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


ESTIMATORS = ("grpo", "rloo", "process")   # algo.advantage.estimator


def _check_group(s: Settings, *, process_ok: bool = False) -> None:
  _check_estimator(s)
  if s.num_generations < 2:
    raise SettingError("sampler.num_generations", f"the algorithm compares completions of a prompt: needs >= 2, "
                       f"got {s.num_generations}")
  adv = s.options["advantage"]
  if adv["scale"] not in grpo.SCALES:
    raise SettingError("algo.advantage.scale", f"{adv['scale']!r}; choose one of {grpo.SCALES}")
  if adv["estimator"] not in ESTIMATORS:
    raise SettingError("algo.advantage.estimator", f"{adv['estimator']!r}; choose {' | '.join(ESTIMATORS)}")
  if adv["estimator"] == "process":
    _check_process(s, process_ok)


def _check_process(s: Settings, process_ok: bool) -> None:
  """``algo.advantage.estimator="process"``: the GRPO row only (its loss takes per-token advantages), step
  rewards from ``algo.process`` split at a non-empty separator, no win rates."""
  if not process_ok:
    raise SettingError("algo.advantage.estimator", "'process' gives per-token advantages, which only "
                       "algo.name='grpo' takes; use grpo, or estimator grpo | rloo")
  if s.options["advantage"].get("win_rate"):
    raise SettingError("algo.advantage.win_rate", "win rates rank whole completions; process supervision "
                       "normalises step rewards: set it False, or estimator grpo")
  proc = dict(s.options.get("process", {}))
  sep = proc.get("separator")
  if not isinstance(sep, str) or not sep:
    raise SettingError("algo.process.separator", f"{sep!r}; the text that ends a step, a non-empty string "
                       f"(e.g. '\\n')")
  if not proc.get("rewards"):
    raise SettingError("algo.process.rewards", "estimator 'process' needs at least one step reward spec, "
                       "fields as in rewards, whose function returns one reward per step (rewards/steps.py), "
                       "e.g. ({'name': 'steps', 'fn': 'rewards.steps:arithmetic_steps'},)")


def _check_p3o(s: Settings) -> None:
  _check_estimator(s)
  if s.num_generations % 2 or s.num_generations < 2:
    raise SettingError("sampler.num_generations", f"p3o pairs completions: needs an even number, got "
                       f"{s.num_generations}")
  if not kl_coef_positive(s.loss_kwargs):
    raise SettingError("algo.kwargs.kl_coef", "P3O's KL-regularised reward difference needs reference log-probs: "
                       "set it > 0")
  norm = dict(s.options.get("p3o", {})).get("reward_norm", "none")
  if norm not in P3O_REWARD_NORMS:
    raise SettingError("algo.p3o.reward_norm", f"{norm!r}; choose {' | '.join(P3O_REWARD_NORMS)}")


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
    dynamic_sampling: whether DAPO's dynamic sampling may filter its groups (``rlj.dynamic_sampling``): its
      advantages are group-normalised, so a group of equal rewards adds no policy gradient.
    adaptive_kl: whether its objective takes ``kl_coef`` from the batch as the weight of a KL term and reports
      that KL as ``kl`` (``rlj.kl_controller``).
    sample_ahead: whether a rollout may be sampled one step ahead (``rlj.sample_ahead``); not where the batcher
      changes its state (the reference, replay pools) at step boundaries that such a rollout would cross.
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
  dynamic_sampling: bool = False
  adaptive_kl: bool = False
  sample_ahead: bool = True

  def loss_kwargs(self, settings: Settings) -> dict:
    return {**self.loss_defaults(settings), **dict(settings.loss_kwargs)}


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(policy_gradient_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive,
                      check=lambda s: _check_group(s, process_ok=True),
                      loss_defaults=_group_loss_defaults, token_weights=True, dynamic_sampling=True,
                      adaptive_kl=True),
    "gdpo": Algorithm(policy_gradient_objective, lambda s: GroupBatcher(s, "gdpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                      loss_defaults=_group_loss_defaults, token_weights=True, dynamic_sampling=True,
                      adaptive_kl=True),
    "gspo": Algorithm(gspo_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                      needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                      dynamic_sampling=True, adaptive_kl=True),
    "cispo": Algorithm(cispo_objective, lambda s: GroupBatcher(s, "grpo"), unit=1, sum_microbatches=True,
                       needs_old_logp=True, uses_reference=kl_coef_positive, check=_check_group,
                       loss_defaults=_group_loss_defaults, dynamic_sampling=True, adaptive_kl=True),
    "p3o": Algorithm(p3o_objective, P3OBatcher, unit=2, sum_microbatches=False, needs_old_logp=True,
                     uses_reference=kl_coef_positive, check=_check_p3o, adaptive_kl=True),
    "dno": Algorithm(dno_objective, dno_replay.DnoBatcher, unit=2, sum_microbatches=False,
                     needs_old_logp=False, uses_reference=lambda kw: True, fixed_rows=False,
                     check=dno_replay.check, sample_ahead=False),
}


def get(name: str) -> Algorithm:
  """The row of algorithm ``name``; SettingError naming ``algo.name`` and the choices otherwise."""
  if name not in ALGORITHMS:
    raise SettingError("algo.name", f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
  return ALGORITHMS[name]
