"""Checkpoints with orbax: sharded train state plus a JSON record (data iterator state, loop counters).

A checkpoint is a step directory written by ``orbax.checkpoint.CheckpointManager`` with two items:
``state`` (any pytree of jax arrays, restored straight into given shardings, whatever mesh wrote it) and
``meta`` (JSON, written by process 0). Per-process host state that differs between processes (DNO's replay
pools of sampled rows) goes to ``<directory>.host/<step>/process_<i>.npz`` beside it.

Saves are asynchronous (the device-to-host copy happens inside ``save``, so the caller may donate the state's
buffers right after); a step directory appears only once complete, so a process killed mid-save leaves the
previous checkpoint as the newest. ``wait()`` blocks until the last save is durable.

When to save (``due``): every ``every_steps`` steps, every ``every_minutes`` minutes of wall time (decided
on process 0 and broadcast, so every process agrees), and always on the final step or a stop request
(``rlj.preemption``). The RNG needs no saving: the key of step ``s`` is ``fold_in(root(seed), s)``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils


class NonFiniteCheckpointError(ValueError):
  """Raised instead of writing a checkpoint whose arrays hold NaN or Inf."""


class CheckpointMismatchError(ValueError):
  """A checkpoint that reads fine holds another tree (other leaves or shapes) than the one asked for: the job's
  config changed, the checkpoint is not corrupt. Nothing is moved or deleted."""


class Checkpointer:
  """``CheckpointManager`` with keep-N, every-N-steps / every-M-minutes saves and newest-first fallback.

  Args:
    directory: the step directories' parent (local path or ``gs://``).
    max_to_keep: newest checkpoints kept; older ones are deleted after a save.
    every_steps: ``due(step)`` when ``step`` is a multiple (0: never by step count).
    every_minutes: ``due(step)`` when this much wall time passed since the last save or since start-up
      (0: never by time).
    async_save: write in a background thread after the device-to-host copy.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, every_steps: int = 0, every_minutes: float = 0.0,
               async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.every_steps, self.every_minutes = int(every_steps), float(every_minutes)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    self._last_save_time = time.monotonic()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def due(self, step: int) -> bool:
    """Whether the step/time policy asks for a save at ``step`` (the same answer on every process)."""
    by_steps = bool(self.every_steps) and step % self.every_steps == 0
    by_time = bool(self.every_minutes) and time.monotonic() - self._last_save_time >= 60.0 * self.every_minutes
    if self.every_minutes and jax.process_count() > 1:  # clocks differ: process 0 decides
      by_time = bool(multihost_utils.broadcast_one_to_all(np.int32(by_time)))
    return by_steps or by_time

  def reached_preemption(self, step: int) -> bool:
    """True on every process once the runtime's preemption notice (multi-host TPU jobs) reached ``step``."""
    return bool(self._mngr.reached_preemption(step))

  def save(self, step: int, state: Any, meta: dict | None = None, *, host: dict | None = None,
           force: bool = True) -> bool:
    """Saves ``state`` (device arrays) and ``meta`` (JSON) as ``step``; ``host``: this process's numpy arrays.

    Raises:
      NonFiniteCheckpointError: when a floating array of ``state`` holds NaN or Inf (nothing is written).
    """
    if not _all_finite(state):
      raise NonFiniteCheckpointError(f"refusing to write checkpoint step {step} to {self.directory}: the state "
                                     f"holds NaN or Inf values")
    if host is not None:
      path = self._host_path(step)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "wb") as f:
        np.savez(f, **host)
      os.replace(path + ".tmp", path)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
    saved = self._mngr.save(step, args=args, force=force)
    self._last_save_time = time.monotonic()
    self._prune_host_state()
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the shardings/dtypes of ``abstract_state`` (ShapeDtypeStructs or arrays).

    The target shardings may differ from the ones that wrote the checkpoint (another mesh shape or device
    count). This process's host arrays, when saved, come back as ``meta["host"]``.
    """
    abstract = jax.tree.map(_as_abstract, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    out = self._mngr.restore(step, args=args)
    meta = dict(out["meta"] or {})
    if os.path.exists(self._host_path(step)):
      with np.load(self._host_path(step)) as z:
        meta["host"] = {k: z[k] for k in z.files}
    return out["state"], meta

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores.

    A checkpoint that fails (truncated or corrupted files) is reported with a warning, moved aside to
    ``<directory>.corrupt/<step>`` (kept for inspection; the next save at that step must not collide with it),
    and the previous one is tried. "Corrupt" means its files fail to read for a tree of the saved structure: a
    checkpoint whose saved leaves or shapes differ from ``abstract_state`` is another job's, not a damaged one.

    Raises:
      CheckpointMismatchError: the newest checkpoint's saved tree differs from ``abstract_state`` (nothing is
        moved).
    """
    for step in reversed(self.all_steps()):
      difference = self.structure_difference(step, abstract_state)
      if difference:
        raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} holds another state than this "
                                      f"job builds ({difference}); nothing was moved or deleted")
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except  # a truncated or corrupted step directory
        _quiet_closed_loop_callbacks()
        logging.warning("checkpoint at step %d in %s failed to restore (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, str(e)[:500])
        self._set_aside(step)
    return None

  def structure_difference(self, step: int, abstract_state: Any) -> str | None:
    """How step ``step``'s saved tree differs from ``abstract_state`` (leaf paths and shapes), or None when it
    matches or its metadata cannot be read (a restore then reports the damage)."""
    saved = self.saved_tree(step)
    if saved is None:
      return None
    return describe_difference(_leaf_shapes(saved), _leaf_shapes(abstract_state))

  def saved_tree(self, step: int) -> dict | None:
    """Step ``step``'s saved ``state`` tree as metadata (leaves with shape and dtype), or None when it cannot be
    read."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that the item folder has no top-level metadata
    try:
      with ocp.StandardCheckpointer() as reader:
        return dict(reader.metadata(os.path.join(self.directory, str(step), "state")).item_metadata)
    except Exception:  # pylint: disable=broad-except  # unreadable metadata: a damaged step, restore decides
      return None
    finally:
      absl_logging.set_verbosity(verbosity)

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0 and "://" not in self.directory:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        dst = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        logging.warning("moved the unreadable checkpoint to %s", dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"rlj_checkpoint_set_aside_{step}")
    self._mngr.reload()

  def _host_path(self, step: int) -> str:
    return os.path.join(self.directory + ".host", str(step), f"process_{jax.process_index()}.npz")

  def _prune_host_state(self) -> None:
    root = self.directory + ".host"
    if "://" in root or not os.path.isdir(root):
      return
    kept = self._mngr.all_steps()
    if not kept:
      return
    for name in os.listdir(root):  # the step being written asynchronously is newer than every kept one
      if name.isdigit() and int(name) < min(kept):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


@jax.jit
def _finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
  """One replicated scalar per save: every floating array of ``tree`` is finite."""
  leaves = [x for x in jax.tree.leaves(tree)
            if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)]
  return not leaves or bool(_finite(leaves))


def _quiet_closed_loop_callbacks() -> None:
  """After a failed restore, reads still in flight report back to the event loop orbax already closed; Python then
  prints "Exception ignored ... RuntimeError: Event loop is closed" with a traceback. That one exception is
  expected and harmless (the failure was reported and handled): drop it, pass every other one on."""
  previous = sys.unraisablehook
  if getattr(previous, "rlj_closed_loop_filter", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)
  hook.rlj_closed_loop_filter = True
  sys.unraisablehook = hook


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
  """``{"params.layers.mlp.kernel": shape}`` for every leaf (dict keys, attributes and indices alike)."""
  return {".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def describe_difference(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 3) -> str | None:
  """The first ``limit`` differing leaves of two ``{path: shape}`` maps, in words; None when equal."""
  parts = []
  for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params"), p)):
    if path not in wanted:
      parts.append(f"{path}: saved {saved[path]}, not in this job's state")
    elif path not in saved:
      parts.append(f"{path}: not saved, this job has {wanted[path]}")
    elif saved[path] != wanted[path]:
      parts.append(f"{path}: saved {saved[path]}, this job {wanted[path]}")
  if not parts:
    return None
  more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
  return "; ".join(parts[:limit]) + more


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_params(directory: str, abstract_params: Any, *, item: str = "params",
                   step: int | None = None) -> tuple[Any, dict]:
  """Loads the params of the newest checkpoint (or of ``step``) in ``directory`` (an rlj policy / SFT /
  reward-model run).

  The checkpoint's ``state`` is a dict holding ``item`` (the trainers save ``{"params": ..., ...}``); only
  that subtree is read.

  Raises:
    FileNotFoundError: naming the directory when it holds no checkpoint (or none at ``step``).
  """
  ckpt = Checkpointer(directory, async_save=False)
  if step is None:
    step = ckpt.latest_step()
  elif step not in ckpt.all_steps():
    steps = ckpt.all_steps()
    ckpt.close()
    raise FileNotFoundError(f"no rlj checkpoint at step {step} in {directory!r} (it has steps {steps})")
  if step is None:
    ckpt.close()
    raise FileNotFoundError(f"no rlj checkpoint found in {directory!r}")
  abstract = {item: jax.tree.map(_as_abstract, abstract_params)}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True),
      meta=ocp.args.JsonRestore())
  out = ckpt._mngr.restore(step, args=args)  # pylint: disable=protected-access
  ckpt.close()
  return out["state"][item], dict(out["meta"] or {})
