"""DNO's row of the switchboard: its objective, pair selection, replay pools and the reference swap.

DNO-Prct (arXiv:2404.03715, Algorithm 2): iteration ``t`` covers ``algo.dno.iteration_steps`` RL steps; the
reference is the policy at the start of the iteration (pi_t). Each step keeps the large-margin (chosen,
rejected) pairs of its rollout (``algorithms.dno.select_pairs``) as adjacent rows, and pairs of earlier
iterations are replayed with the configured fractions (their reference log-probs are recomputed under pi_t by
the loop, like the new pairs'). ALGORITHMS.md §6.

The replay pools are host state: ``DnoBatcher.host_state`` / ``load_host_state`` put them in checkpoints.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import common, dno, winrate
from rewards import combine
from rlj.batches import Batch, Batcher, SettingError, Settings, concat_batches, take_units

_select = jax.jit(dno.select_pairs, static_argnames=("min_chosen_score", "min_margin", "min_margin_policy_chosen",
                                                     "max_pairs"))
_win_rates = jax.jit(winrate.win_rates_from_scores)


def objective(logp, batch, **loss_kwargs):
  """DNO on (chosen, rejected) row pairs against the previous iterate's log-probs (``ref_logp``)."""
  pairs = common.adjacent_pairs
  lp, ref, mask = pairs(logp), pairs(batch["ref_logp"]), pairs(batch["mask"])
  scores = batch["pair_scores"]
  return dno.loss(lp[:, 0], ref[:, 0], mask[:, 0], lp[:, 1], ref[:, 1], mask[:, 1],
                  score_chosen=scores[:, 0], score_rejected=scores[:, 1], valid=batch["pair_valid"], **loss_kwargs)


def check(s: Settings) -> None:
  if s.num_generations < 2:
    raise SettingError("sampler.num_generations", f"dno compares completions of a prompt: needs >= 2, got "
                       f"{s.num_generations}")
  d = s.options["dno"]
  if int(d["iteration_steps"]) < 1:
    raise SettingError("algo.dno.iteration_steps", f"{d['iteration_steps']}; an iteration has >= 1 RL step")
  if any(not 0 <= float(f) <= 1 for f in d["replay"]):
    raise SettingError("algo.dno.replay", f"{tuple(d['replay'])}; fractions of a step's pairs, each in [0, 1]")


def select_pairs(rollout: Mapping[str, np.ndarray], values: np.ndarray, weights: np.ndarray, *,
                 min_chosen_score: float, min_margin: float, max_pairs: int, win_rate: bool) -> tuple[Batch, dict]:
  """Large-margin (chosen, rejected) pairs of one rollout, as interleaved rows with a ``pair_valid`` mask."""
  scores = combine.weighted_total(values, weights)
  missing = np.isnan(scores)             # every component missing: the completion is in no pair
  if win_rate:
    scores = np.where(missing, np.nan, np.asarray(_win_rates(np.where(missing, -np.inf, scores))))
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


class DnoBatcher(Batcher):
  """Pairs of this step plus replayed pairs of earlier iterations; swaps the reference between iterations.

  Attributes:
    history: pair pools of finished iterations (newest last; as many as ``replay`` has fractions).
    current: the valid pairs of the running iteration's steps.
  """

  def __init__(self, settings: Settings):
    super().__init__(settings)
    d = settings.options["dno"]
    self.iteration_steps = int(d["iteration_steps"])
    self.replay = tuple(float(f) for f in d["replay"])
    self.select = dict(min_chosen_score=d["min_chosen_score"], min_margin=d["min_margin"],
                       max_pairs=d["max_pairs"], win_rate=d["win_rate"])
    self.history: list[Batch] = []
    self.current: list[Batch] = []

  def begin_step(self, step: int, params, ref_params):
    """At an iteration boundary the step's pairs join the replay history and pi_{t+1} (a copy of the params,
    whose buffers the train step donates) becomes the reference."""
    if step == 0 or step % self.iteration_steps:
      return ref_params
    if self.current:
      self.history.append(concat_batches(self.current, self.settings.pad_id))
      self.history = self.history[-max(len(self.replay), 1):]
    self.current = []
    return jax.tree.map(jnp.copy, params)

  def build(self, rollout, values, weights, step):
    s = self.settings
    batch, m = select_pairs(rollout, values, weights, **self.select)
    self.current.append(take_units(batch, np.flatnonzero(batch["pair_valid"] > 0), 2))
    parts, n_pairs = [batch], batch["pair_valid"].shape[0]
    per = max(s.num_minibatches, 1)
    for back, frac in enumerate(self.replay):
      if back >= len(self.history) or frac <= 0:
        continue
      pool = self.history[-(back + 1)]
      pool_pairs = pool["pair_valid"].shape[0]
      want = int(frac * n_pairs) // per * per
      if pool_pairs == 0 or want == 0:
        continue
      pick = np.random.default_rng([s.seed, step, back]).choice(pool_pairs, size=want, replace=pool_pairs < want)
      parts.append(take_units(pool, pick, 2))
      m[f"dno/replay_pairs_{back + 1}"] = float(want)
    return (concat_batches(parts, s.pad_id) if len(parts) > 1 else batch), m

  def step_metrics(self, step: int) -> dict:
    return {"dno/iteration": float(step // self.iteration_steps)}

  def host_state(self) -> dict[str, np.ndarray]:
    out = {"dno_pools": np.int64(len(self.history)), "dno_current": np.int64(len(self.current))}
    for name, pools in (("hist", self.history), ("cur", self.current)):
      for j, pool in enumerate(pools):
        out.update({f"dno_{name}{j}/{k}": np.asarray(v) for k, v in pool.items()})
    return out

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    def pools(name, n):
      return [{k.split("/", 1)[1]: v for k, v in host.items() if k.startswith(f"dno_{name}{j}/")} for j in range(n)]
    self.history = pools("hist", int(host.get("dno_pools", 0)))
    self.current = pools("cur", int(host.get("dno_current", 0)))
