"""One job lifecycle for RL, SFT and reward-model training: initialise-or-resume, the checkpoint tree, the save
hook and the stop request.

  job = lifecycle.Lifecycle(workdir + "/checkpoints", policy, job="rl", total_steps=..., stop=stop, data=it)
  start, state, extra, meta = job.resume(state, extra={"ref_params": ref})    # step 0 and the inputs if none
  on_step_end = job.hook(lambda step, state, ref: job.save(step, state, extra={"ref_params": ref}))
  ... the loop calls on_step_end(done, state, ...) after every step; True means stop ...
  job.close()            # or: with lifecycle.Lifecycle(...) as job: ...

A checkpoint's ``state`` item is ``checkpoint_tree(state, **extra)``: the train state's fields (params, optimizer
state, step, skip counters) plus the job's extra trees (the RL reference). Its ``meta`` record always holds the
job name, the step and the data iterator's state gathered from every process (``host_data.allgather_json``;
each process resumes its own entry), plus what the job adds (a reward model's description, its last eval).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

from rlj import checkpoint, host_data, preemption

_STATE_FIELDS = ("params", "opt_state", "step", "skips_in_row", "skips_total")
_SKIP_FIELDS = ("skips_in_row", "skips_total")   # absent from checkpoints of earlier versions: resumed as 0


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
  """When to save and how many to keep (config keys ``train.ckpt_every``, ``ckpt_every_minutes``,
  ``keep_checkpoints``)."""
  keep: int = 3
  every_steps: int = 0
  every_minutes: float = 0.0


def checkpoint_tree(state, **extra) -> dict:
  """The saved tree: the train state's fields and every extra tree that is not None."""
  tree = {k: getattr(state, k) for k in _STATE_FIELDS}
  tree.update({k: v for k, v in extra.items() if v is not None})
  return tree


def state_from_tree(state, tree: Mapping[str, Any]):
  return state.replace(**{k: tree[k] for k in _STATE_FIELDS})


class Lifecycle:
  """The checkpoints of one job in ``directory``.

  Args:
    directory: the checkpoint folder (``<workdir>/checkpoints``).
    policy: the save policy.
    job: the job's name in every checkpoint's meta ("rl", "sft", "rm").
    total_steps: the job's last step (always saved).
    stop: the run's ``preemption.StopRequest``.
    data: the job's data iterator (``get_state`` / ``set_state``), saved and resumed with the checkpoint.
    label: names the job in the stop message.
    meta: what every checkpoint's meta record of this job carries (the model config and tokenizer that
      ``launch.export`` reads); ``save``'s own ``meta`` is added to it.
  """

  def __init__(self, directory: str, policy: CheckpointPolicy, *, job: str, total_steps: int, stop, data=None,
               label: str | None = None, meta: Mapping[str, Any] | None = None):
    self.ckpt = checkpoint.Checkpointer(directory, max_to_keep=policy.keep, every_steps=policy.every_steps,
                                        every_minutes=policy.every_minutes)
    self.job, self.total_steps, self.stop, self.data = job, int(total_steps), stop, data
    self.label = label or job
    self.meta = dict(meta or {})

  @property
  def directory(self) -> str:
    return self.ckpt.directory

  def resume(self, state, extra: Mapping[str, Any] | None = None) -> tuple[int, Any, dict, dict]:
    """``(start_step, state, extra, meta)`` from the newest checkpoint that restores, or ``(0, state, extra, {})``.

    The data iterator resumes this process's saved position; ``meta["host"]`` holds this process's saved host
    arrays when there were any.
    """
    extra = {k: v for k, v in dict(extra or {}).items()}
    tree = checkpoint_tree(state, **extra)
    saved = self._saved_keys()
    if saved is not None:  # checkpoints written before the skip counters joined the state: restore without them
      tree = {k: v for k, v in tree.items() if k in saved or k not in _SKIP_FIELDS}
    try:
      restored = self.ckpt.restore_latest(tree)
    except BaseException:
      self.close()   # a clean shutdown on every exit path: no orbax threads left behind
      raise
    if restored is None:
      return 0, state, extra, {}
    start, tree, meta = restored
    tree = {**{k: getattr(state, k) for k in _SKIP_FIELDS}, **tree}
    state = state_from_tree(state, tree)
    extra = {k: tree.get(k, v) for k, v in extra.items()}
    if self.data is not None and meta.get("data") is not None:
      self.data.set_state(host_data.own_entry(meta["data"]))
    logging.info("resumed %s from step %d in %s", self.label, start, self.directory)
    return start, state, extra, meta

  def _saved_keys(self) -> set[str] | None:
    """The top-level keys of the newest checkpoint's state tree (None when there is none or it cannot be read)."""
    step = self.ckpt.latest_step()
    saved = None if step is None else self.ckpt.saved_tree(step)
    return None if saved is None else set(saved)

  def save(self, step: int, state, *, extra: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
           host: dict | None = None) -> None:
    """Writes step ``step``: the state and extra trees, the meta record (job, step, every process's data
    position, the job's constructor ``meta`` and this ``meta``) and this process's ``host`` arrays."""
    record = {"job": self.job, "step": step}
    if self.data is not None:
      record["data"] = host_data.allgather_json(self.data.get_state())    # one entry per process
    record.update(self.meta)
    record.update(meta or {})
    self.ckpt.save(step, checkpoint_tree(state, **dict(extra or {})), record, host=host)

  def hook(self, save: Callable[..., None]) -> Callable[..., bool]:
    """The loops' ``on_step_end(done, *state) -> bool`` (``preemption.checkpoint_hook``): saves when due, on the
    last step and on a stop request, and returns True to stop at this step boundary."""
    return preemption.checkpoint_hook(self.ckpt, self.stop, total_steps=self.total_steps, save=save,
                                      label=self.label)

  def close(self) -> None:
    self.ckpt.close()

  def __enter__(self) -> "Lifecycle":
    return self

  def __exit__(self, *exc) -> None:
    self.close()   # every exit path waits for the last save and stops orbax's threads
