"""The job lifecycle: resume restores the state with its skip counters, and reads checkpoints written before the
counters joined the state."""
import os

import jax.numpy as jnp
import numpy as np
import optax

from rlj import checkpoint, lifecycle, preemption, train_state


def _state(scale=1.0):
  params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * scale}
  return train_state.TrainState.create(params, optax.adam(1e-3))


def test_resume_restores_state_and_skip_counters(tmp_path):
  with preemption.StopRequest() as stop:
    job = lifecycle.Lifecycle(str(tmp_path / "ck"), lifecycle.CheckpointPolicy(), job="sft", total_steps=5,
                              stop=stop)
    saved = _state(2.0).replace(step=jnp.int32(4), skips_in_row=jnp.int32(1), skips_total=jnp.int32(3))
    job.save(4, saved, meta={"note": "x"})
    job.close()
    job = lifecycle.Lifecycle(str(tmp_path / "ck"), lifecycle.CheckpointPolicy(), job="sft", total_steps=5,
                              stop=stop)
    start, state, _, meta = job.resume(_state())
    job.close()
  assert start == 4 and meta["job"] == "sft" and meta["note"] == "x"
  np.testing.assert_array_equal(state.params["w"], saved.params["w"])
  assert (int(state.step), int(state.skips_in_row), int(state.skips_total)) == (4, 1, 3)


def test_resume_reads_a_checkpoint_without_skip_counters(tmp_path):
  """A workdir of an earlier version (params, opt_state, step only) resumes, counters from 0; nothing is set
  aside as corrupt."""
  old = _state(3.0).replace(step=jnp.int32(7))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ckpt.save(7, {"params": old.params, "opt_state": old.opt_state, "step": old.step}, {"job": "rl", "step": 7})
  ckpt.close()
  with preemption.StopRequest() as stop:
    job = lifecycle.Lifecycle(str(tmp_path / "ck"), lifecycle.CheckpointPolicy(), job="rl", total_steps=9,
                              stop=stop)
    start, state, extra, _ = job.resume(_state(), {"ref_params": None})
    job.close()
  assert start == 7 and extra == {"ref_params": None}
  np.testing.assert_array_equal(state.params["w"], old.params["w"])
  assert (int(state.step), int(state.skips_in_row), int(state.skips_total)) == (7, 0, 0)
  assert not os.path.exists(str(tmp_path / "ck") + ".corrupt")
