"""DAPO's dynamic sampling in the RL loop: train only on groups whose rewards differ, sampling more prompts to
fill the batch (config keys ``train.dynamic_sampling.enabled`` / ``max_extra_rollouts``).

DAPO ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476, Sec. 3.2 and the
constraint 0 < |{o_i | is_equivalent(a, o_i)}| < G of Eq. 11): a group whose G rewards are all equal has
group-normalised advantages of 0, so it adds no policy gradient and only shrinks the effective batch. Each RL
step therefore keeps the groups whose weighted total reward is not constant (``algorithms.dapo.
dynamic_sampling_keep``), and while fewer than B are kept, rolls out the next prompt batch of the same train
iterator (the same sampler shape every time), at most ``max_extra_rollouts`` times per step. The batch is the
first B kept groups in sampling order; kept groups beyond B are dropped.

When the bound is hit with fewer than B kept groups, the step still trains on a batch of exactly B groups (the
compiled shape): the missing ones are filled with filtered groups (in sampling order) whose completion mask is
zeroed and whose rewards are set missing (NaN). Masked, they add nothing to any term of the loss (policy
gradient, KL penalty) nor to its normalisers (``num_tokens`` / ``num_seqs`` count masked tokens and rows), so the
update equals training on the kept groups alone; missing rewards keep them out of batch-level statistics
(Lite-PPO's batch std, GDPO's whitening) and give them advantage 0. Keeping them unmasked would also have given a
zero policy gradient under group normalisation, but they would still add KL gradient and dilute the token-mean
normaliser. The step logs ``dynamic_sampling/bound_hit`` and a warning line.

Every process rolls out its own prompts; the rewards of the whole batch are gathered on every process
(``Trainer.rollout``), so the keep decisions, the number of extra rollouts and the batch are the same
everywhere. RNG: rollout k > 0 of a step samples with ``fold_in(rng_sample, k)`` (the first uses the step's
own sampling key, as without dynamic sampling), so a resumed run replays the same rollouts; the data iterator's
position, saved with every checkpoint, covers the extra prompt batches.

Only rows with group-normalised advantages allow it (``rlj.rl_algos.Algorithm.dynamic_sampling``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import dapo
from rewards import combine
from rlj.batches import pad_rows_to

_keep = jax.jit(dapo.dynamic_sampling_keep)


@dataclasses.dataclass(frozen=True)
class DynamicSampling:
  """``train.dynamic_sampling``: ``enabled``, and ``max_extra_rollouts`` (extra sampler calls per RL step)."""
  enabled: bool = False
  max_extra_rollouts: int = 4


def keep_groups(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """bool [B]: groups whose weighted total rewards (``combine.weighted_total`` of ``values`` [B, G, K]) are not
  all equal, with at least two of them present (``algorithms.dapo.dynamic_sampling_keep``)."""
  return np.asarray(_keep(jnp.asarray(combine.weighted_total(values, weights))))


def plan(keeps: Sequence[np.ndarray], num_groups: int) -> tuple[list[tuple[int, int]], int]:
  """The batch's groups as ``(rollout, group)``: the first ``num_groups`` kept groups in sampling order, then,
  when there are fewer, filtered groups in sampling order as fillers. Returns ``(picks, number of fillers)``."""
  kept = [(r, int(g)) for r, keep in enumerate(keeps) for g in np.flatnonzero(keep)][:num_groups]
  fillers = [(r, int(g)) for r, keep in enumerate(keeps) for g in np.flatnonzero(~keep)][:num_groups - len(kept)]
  return kept + fillers, len(fillers)


def assemble(parts: Sequence[tuple[dict, np.ndarray]], picks: Sequence[tuple[int, int]], num_fillers: int, *,
             group_size: int, pad_id: int) -> tuple[dict, np.ndarray]:
  """The picked groups' rows of several rollouts (``(arrays, values [B, G, K])`` each) as one rollout; the last
  ``num_fillers`` groups get a zero completion mask and missing (NaN) rewards."""
  g = group_size
  width = max(arrays["tokens"].shape[1] for arrays, _ in parts)   # prompt buckets may differ between rollouts
  padded = [pad_rows_to(arrays, width, pad_id) for arrays, _ in parts]
  arrays = {k: np.concatenate([padded[r][k][grp * g:(grp + 1) * g] for r, grp in picks]) for k in padded[0]}
  values = np.stack([parts[r][1][grp] for r, grp in picks]).astype(np.float32)
  if num_fillers:
    arrays["mask"][-num_fillers * g:] = 0        # a fresh array (np.concatenate): the rollouts' stay as they are
    values[-num_fillers:] = np.nan
  return arrays, values


# Metrics that add up over the rollouts of a step; the others describe the step's first rollout.
def _additive(key: str) -> bool:
  return key.startswith("time/") or key == "sampled_tokens" or key.endswith("/errors")


class DynamicSampler:
  """Runs one step's rollouts: one without dynamic sampling, up to ``1 + max_extra_rollouts`` with it."""

  def __init__(self, cfg: DynamicSampling, *, weights: np.ndarray, group_size: int, pad_id: int):
    self.cfg, self.weights, self.group_size, self.pad_id = cfg, np.asarray(weights), group_size, pad_id

  def collect(self, rollout: Callable[[Any], tuple[dict, Any, dict]], rng, step: int) -> tuple[dict, Any, dict]:
    """``rollout(rng) -> (arrays, rewards, metrics)`` (each call on the next prompt batch) -> the step's."""
    first = rollout(rng)
    if not self.cfg.enabled:
      return first
    runs, keeps = [first], [keep_groups(first[1].values, self.weights)]
    need = keeps[0].shape[0]
    while sum(int(k.sum()) for k in keeps) < need and len(runs) <= self.cfg.max_extra_rollouts:
      runs.append(rollout(jax.random.fold_in(rng, len(runs))))
      keeps.append(keep_groups(runs[-1][1].values, self.weights))
    picks, fillers = plan(keeps, need)
    arrays, values = assemble([(a, r.values) for a, r, _ in runs], picks, fillers, group_size=self.group_size,
                              pad_id=self.pad_id)
    metrics = dict(first[2])
    for _, _, m in runs[1:]:
      for k, v in m.items():
        if _additive(k) and k in metrics:
          metrics[k] += v
    kept = sum(int(k.sum()) for k in keeps)
    metrics.update({
        "dynamic_sampling/extra_rollouts": float(len(runs) - 1),
        "dynamic_sampling/groups_filtered": float(sum(int((~k).sum()) for k in keeps)),
        "dynamic_sampling/groups_kept": float(need - fillers),
        "dynamic_sampling/groups_unused": float(max(kept - need, 0)),
        "dynamic_sampling/filler_groups": float(fillers),
        "dynamic_sampling/bound_hit": float(fillers > 0),
    })
    if fillers and jax.process_index() == 0:
      logging.warning("RL step %d: dynamic sampling found %d of %d groups with distinct rewards in %d rollouts "
                      "(train.dynamic_sampling.max_extra_rollouts=%d); the step trains on them, the other %d "
                      "groups of its batch are masked", step + 1, need - fillers, need, len(runs),
                      self.cfg.max_extra_rollouts, fillers)
    return arrays, first[1]._replace(values=values), metrics
