"""Train batches on the host: the ``Batcher`` interface of the algorithm rows, and splitting / joining batches.

A batch is a dict of numpy arrays: per-row arrays have the row count first; per-pair arrays (keys ``pair_*``)
have one entry per pair of adjacent rows (2i, 2i+1). ``rlj.rl_algos`` holds the rows that build them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

Batch = dict[str, Any]


class SettingError(ValueError):
  """A setting an algorithm refuses: ``key`` is the config key, ``message`` the reason and the fix."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config key '{key}': {message}")
    self.key, self.message = key, message


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a row reads, as plain values (built by the launcher from the config's ``algo`` section).

  Attributes:
    loss_kwargs: keyword arguments of the objective (config ``algo.kwargs``).
    options: the algorithm's other sections (``algo.advantage``, ``algo.dno``), as plain dicts.
    num_generations: G, completions per prompt.
    max_new_tokens: T, the completion width.
    num_minibatches: optimizer steps per epoch.
    seed: the run's seed (replay draws).
    pad_id: the tokenizer's padding id (batches of different widths are left-padded with it).
  """
  loss_kwargs: Mapping[str, Any]
  options: Mapping[str, Mapping[str, Any]]
  num_generations: int
  max_new_tokens: int
  num_minibatches: int = 1
  seed: int = 0
  pad_id: int = 0


# Per-row rollout arrays a batch carries. ``old_logp`` is absent on the on-policy path (the objective then uses the
# current log-probs under stop-gradient); ``is_weight`` is present only with a mismatch correction.
ROLLOUT_KEYS = ("tokens", "attn_mask", "mask", "old_logp", "is_weight")


class Batcher:
  """Host-side batch building of one run. Stateless here; DNO's (``rlj.dno_replay``) keeps replay pools.

  ``build`` returns the train batch (per-row arrays with the row count first; per-pair arrays named
  ``pair_*``) and metrics. The loop adds ``ref_logp`` for the batch's rows when the row uses a reference.
  """

  def __init__(self, settings: Settings):
    self.settings = settings

  def begin_step(self, step: int, params, ref_params):
    """Called before RL step ``step`` (0-based); returns the reference params to use from now on."""
    del step, params
    return ref_params

  def build(self, rollout: Mapping[str, np.ndarray], values: np.ndarray, weights: np.ndarray,
            step: int) -> tuple[Batch, dict]:
    raise NotImplementedError

  def step_metrics(self, step: int) -> dict:
    del step
    return {}

  def host_state(self) -> dict[str, np.ndarray]:
    """This process's batcher state that a checkpoint must keep (numpy arrays)."""
    return {}

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    del host


def take_units(batch: Batch, idx: np.ndarray, unit: int) -> Batch:
  """The units ``idx`` (rows, or pairs of adjacent rows when ``unit == 2``) of a batch.

  Per-row arrays are indexed by their rows; per-pair arrays (keys ``pair_*``) by ``idx`` itself; 0-d entries
  are values of the whole step (the adaptive KL coefficient) and stay as they are.
  """
  idx = np.asarray(idx, np.int64)
  rows = (idx[:, None] * unit + np.arange(unit)[None]).reshape(-1)
  return {k: v if np.ndim(v) == 0 else v[idx] if k.startswith("pair_") else v[rows] for k, v in batch.items()}


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


def pad_rows_to(batch: Batch, width: int, pad_id: int) -> Batch:
  """Left-pads the token columns of a batch to ``width`` (positions come from the mask)."""
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


