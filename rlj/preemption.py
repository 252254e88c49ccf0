"""Stop requests: SIGTERM (and the runtime's multi-host preemption notice) -> save at the next step boundary.

Cloud TPU VMs and most schedulers send SIGTERM some time before they kill a job. ``StopRequest`` turns the
signal into a flag that the training loops read between steps; the launcher then writes a checkpoint at that
step and exits cleanly, and the next launch with the same workdir resumes from it. A second SIGTERM (or
SIGINT) while the first is pending restores the default handler and re-raises, so an impatient operator
can still kill the job at once.

On a multi-process job every process must stop at the same step (a checkpoint is a collective), so
``requested`` combines the local flags of all processes and orbax's preemption sync point (the notice
JAX's distributed runtime receives on TPU pods).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlj import metrics_writer


class StopRequest:
  """Flags SIGTERM / SIGINT until ``close()``; use as a context manager around a training loop.

  Args:
    signals: the signals that request a stop (default SIGTERM and SIGINT).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
      for s in signals:
        self._previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # second request: stop waiting for the step boundary
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL) or signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.signum = signum
    logging.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

  @property
  def local(self) -> bool:
    return self.signum is not None

  def requested(self, step: int, reached_preemption: Callable[[int], bool] | None = None) -> bool:
    """Whether to stop after ``step``; the same answer on every process.

    Args:
      step: the step just finished.
      reached_preemption: e.g. ``Checkpointer.reached_preemption`` (orbax's sync point over JAX's
        preemption notice; only meaningful on multi-host runtimes).
    """
    stop = self.local
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.asarray(int(stop), np.int32))
      stop = bool(np.any(flags))
    if not stop and reached_preemption is not None:
      stop = bool(reached_preemption(step))
    return stop

  def close(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def checkpoint_hook(ckpt, stop: StopRequest, *, total_steps: int, save: Callable[..., None], label: str):
  """The loops' ``on_step_end(done, *state) -> bool``: ``save(done, *state)`` when ``ckpt.due(done)``, on the
  final step and on a stop request; after a stop request it waits for the save, says how to resume and
  returns True (stop at this step boundary).

  Args:
    ckpt: a ``rlj.checkpoint.Checkpointer`` (save policy and the runtime's preemption notice).
    stop: this process's stop request.
    total_steps: the run's last step.
    save: writes the checkpoint of step ``done`` from the loop's state arguments.
    label: names the job in the stop message.
  """
  def hook(done: int, *state) -> bool:
    stopping = stop.requested(done, ckpt.reached_preemption) and done < total_steps
    if stopping or done == total_steps or ckpt.due(done):
      save(done, *state)
    if stopping:
      ckpt.wait()
      metrics_writer.console_print(f"stopped at step {done} of {total_steps} ({label}): checkpoint saved in "
                                   f"{ckpt.directory}; relaunch with the same --workdir to resume")
    return stopping
  return hook
