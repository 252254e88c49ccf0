"""Checkpoints with orbax: sharded train state plus a JSON record (data iterator state, RNG, loop counters).

A checkpoint is a step directory written by ``orbax.checkpoint.CheckpointManager`` with two items:
``state`` (any pytree of jax arrays, restored straight into given shardings) and ``meta`` (JSON).
Saves are asynchronous; ``wait()`` blocks until the last one is durable.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over ``CheckpointManager``: keep-N, every-N-steps, newest-first fallback on restore."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
    return self._mngr.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the shardings/dtypes of ``abstract_state`` (ShapeDtypeStructs or arrays)."""
    abstract = jax.tree.map(_as_abstract, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    out = self._mngr.restore(step, args=args)
    return out["state"], dict(out["meta"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores; a broken one is reported and the previous is tried."""
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # a truncated or corrupted step directory
        logging.warning("checkpoint at step %d in %s failed to restore (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, e)
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_params(directory: str, abstract_params: Any, *, item: str = "params") -> tuple[Any, dict]:
  """Loads the params of the newest checkpoint in ``directory`` (an rlj policy / SFT / reward-model run).

  The checkpoint's ``state`` is a dict holding ``item`` (the trainers save ``{"params": ..., ...}``); only
  that subtree is read.

  Raises:
    FileNotFoundError: naming the directory when it holds no checkpoint.
  """
  ckpt = Checkpointer(directory, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no rlj checkpoint found in {directory!r}")
  abstract = {item: jax.tree.map(_as_abstract, abstract_params)}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True),
      meta=ocp.args.JsonRestore())
  out = ckpt._mngr.restore(step, args=args)  # pylint: disable=protected-access
  ckpt.close()
  return out["state"][item], dict(out["meta"] or {})
