"""The RL loop with DAPO dynamic sampling and the adaptive KL controller: the train step compiles once while
groups are filtered and beta changes, beta follows the controller on the logged KL, and a run saved at step 1 and
resumed gives the steps of an uninterrupted run (beta, the dynamic-sampling counts, the losses)."""
import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from algorithms import kl_control
from launch import builders, checks
from launch.benchmarks import rl_step
from rlj import lifecycle, preemption, rl_loop

pytestmark = pytest.mark.usefixtures("fast_compile")

STEPS, PROMPTS, G = 2, 4, 4
TARGET, HORIZON, BETA0 = 1e-4, 32.0, 0.05
OVERRIDES = {"train.batch_prompts": PROMPTS, "sampler.num_generations": G, "algo.kwargs.kl_coef": BETA0,
             "train.num_minibatches": 2, "train.dynamic_sampling.enabled": True,
             "train.dynamic_sampling.max_extra_rollouts": 1, "algo.kl_control.target": TARGET,
             "algo.kl_control.horizon": HORIZON, "tokenizer.train_records": 200, "data.train_records": 400,
             "sampler.max_new_tokens": 8}


def parity(prompts, completions, **_):
  """0 for every completion of a prompt of even length (a constant group), else the completion's length parity."""
  return [float(len(c) % 2) if len(p) % 2 else 0.0 for p, c in zip(prompts, completions)]


@pytest.fixture(scope="module")
def env():
  config = rl_step.runlocal_config(total_steps=STEPS, overrides=OVERRIDES)
  checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:   # the tokenizer's files
    env = builders.build_env(config, workdir)
    comps = builders.rl_components(config, env, None, rl_step._NullWriter())  # pylint: disable=protected-access
    comps = dataclasses.replace(comps, reward_fns=[("parity", parity)], reward_weights=np.ones(1, np.float32))
    yield config, env, comps, {}


def _trainer(env, total_steps=STEPS):
  """A trainer on a fresh train iterator (the same prompts in the same order every time); every trainer of the
  module shares the first one's compiled programs (the same config compiles the same programs)."""
  config, e, comps, compiled = env
  data = builders.prompt_iterator(config, e, split="train", batch_prompts=PROMPTS, seed=config.seed)
  cfg = dataclasses.replace(builders.loop_config(config, e.tokenizer.pad_id), total_steps=total_steps)
  trainer = rl_loop.Trainer(dataclasses.replace(comps, train_iter=data), cfg)
  compiled.setdefault("programs", (trainer.step_fn, trainer.logp_fn))
  trainer.step_fn, trainer.logp_fn = compiled["programs"]
  return trainer, data


def _fresh_state(e):
  return jax.tree.map(jnp.copy, e.state), jax.tree.map(jnp.copy, e.state.params)


@pytest.fixture(scope="module")
def uninterrupted(env):
  trainer, _ = _trainer(env)
  jitted, shapes = trainer.step_fn, []
  trainer.step_fn = lambda state, batch, rng: shapes.append(
      {k: (v.shape, v.dtype) for k, v in batch.items()}) or jitted(state, batch, rng)
  _, _, history = trainer.run(*_fresh_state(env[1]))
  return history, shapes, jitted._cache_size()  # pylint: disable=protected-access


def test_filtered_groups_keep_the_batch_shape_and_one_compilation(uninterrupted):
  history, shapes, cache_size = uninterrupted
  assert len(history) == STEPS and len(shapes) == STEPS * 2
  assert all(s == shapes[0] for s in shapes) and shapes[0]["kl_coef"][0] == ()
  assert cache_size == 1                                       # beta changed, groups were filtered: no recompile
  assert sum(h["dynamic_sampling/groups_filtered"] for h in history) > 0
  assert sum(h["dynamic_sampling/extra_rollouts"] for h in history) > 0


def test_beta_follows_the_controller_on_the_logged_kl(uninterrupted):
  history, _, _ = uninterrupted
  betas = [h["kl_control/beta"] for h in history]
  assert betas[0] == BETA0
  for prev, cur in zip(history, history[1:]):
    want = kl_control.adaptive_kl_update(prev["kl_control/beta"], prev["kl"], target=TARGET, horizon=HORIZON,
                                         n_steps=PROMPTS * G)
    assert cur["kl_control/beta"] == pytest.approx(want, rel=1e-12)
  assert len(set(betas)) == STEPS


def test_resume_from_step_one_continues_the_uninterrupted_run(env, uninterrupted):
  history, _, _ = uninterrupted
  e = env[1]
  with tempfile.TemporaryDirectory() as tmp, preemption.StopRequest() as stop:
    directory = os.path.join(tmp, "checkpoints")
    trainer, data = _trainer(env, total_steps=1)
    job = lifecycle.Lifecycle(directory, lifecycle.CheckpointPolicy(every_steps=1), job="rl", total_steps=1,
                              stop=stop, data=data)
    trainer.run(*_fresh_state(e), job=job)
    job.close()
    trainer, data = _trainer(env)
    job = lifecycle.Lifecycle(directory, lifecycle.CheckpointPolicy(every_steps=1), job="rl", total_steps=STEPS,
                              stop=stop, data=data)
    state, ref = _fresh_state(e)
    start, state, extra, meta = job.resume(state, {"ref_params": ref})
    assert start == 1 and "kl_control/beta" in meta["host"]
    trainer.load_host_state(meta.get("host"))
    _, _, resumed = trainer.run(state, extra["ref_params"], start_step=start, job=job)
    job.close()
  assert [h["step"] for h in resumed] == list(range(2, STEPS + 1))
  assert env[3]["programs"][0]._cache_size() == 1  # pylint: disable=protected-access
  for got, want in zip(resumed, history[1:]):
    for key in ("kl_control/beta", "kl", "loss", "reward/mean", "dynamic_sampling/groups_filtered",
                "dynamic_sampling/extra_rollouts"):
      assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
