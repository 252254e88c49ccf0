"""Where old log-probs come from (``train.old_logp``), the trainer's log-prob pass and the mismatch metrics.

The on-policy path (one epoch, one minibatch) feeds the objective no ``old_logp``: it must give the same loss and
gradients as old log-probs computed by a separate forward pass, and the Trainer must skip that pass.
"""
import dataclasses
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import builders, checks
from launch.benchmarks import rl_step
from models import presets
from models.transformer import Transformer
from rlj import logprobs, rl_algos, rl_loop
from rlj import train_step as ts

pytestmark = pytest.mark.usefixtures("fast_compile")

P, T, N = 3, 5, 8
MODEL = Transformer(presets.get("tiny"))
LOGP_FN = logprobs.make_logp_fn(MODEL.apply, completion_len=T, temperature=0.7)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 128, (N, P + T)).astype(np.int32)
  mask = (np.arange(T)[None] < rng.integers(1, T + 1, (N, 1))).astype(np.float32)
  batch = {"tokens": tokens, "attn_mask": np.concatenate([np.ones((N, P), np.int32), mask.astype(np.int32)], 1),
           "mask": mask, "adv": rng.normal(size=N).astype(np.float32),
           "num_tokens": np.float32(mask.sum()), "num_seqs": np.float32((mask.sum(-1) > 0).sum())}
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("name,kwargs", [
    ("grpo", dict(clip_eps=0.1, agg="seq_mean_token_mean", dual_clip=3.0)), ("gspo", dict(clip_eps=3e-4)),
    pytest.param("grpo", dict(clip_eps=0.2, agg="token_mean"), marks=pytest.mark.slow),
    pytest.param("cispo", dict(clip_eps_high=0.28), marks=pytest.mark.slow)])
def test_on_policy_path_equals_separately_computed_old_logp(name, kwargs):
  """No ``old_logp`` in the batch == ``old_logp`` from a separate forward pass at the same params: loss, metrics
  and gradients agree to float32 rounding (the ratio is exactly 1 on the on-policy path)."""
  params = jax.jit(MODEL.init)(jax.random.key(0), *(jnp.zeros((1, P + T), jnp.int32),) * 2,
                               jnp.ones((1, P + T), jnp.int32))["params"]
  objective = functools.partial(rl_algos.ALGORITHMS[name].objective, **kwargs)
  step = jax.jit(functools.partial(ts.loss_and_grads, logp_fn=LOGP_FN, objective=objective))
  on_policy = _batch()
  separate = {**on_policy, "old_logp": jax.jit(LOGP_FN)(params, on_policy["tokens"], on_policy["attn_mask"])}
  loss_a, m_a, g_a = step(params, on_policy)
  loss_b, m_b, g_b = step(params, separate)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
  for k in m_a:
    np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  if "ratio_max" in m_a:
    assert float(m_a["ratio_min"]) == float(m_a["ratio_max"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_a, g_b)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_a))


class _Recorder:
  """Metrics sink of the loop."""

  def write(self, step, metrics):
    pass

  def close(self):
    pass


@pytest.fixture(scope="module")
def env():
  config = rl_step.runlocal_config(total_steps=2, overrides={"train.batch_prompts": 4})
  checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    env = builders.build_env(config, workdir)
    data = builders.prompt_iterator(config, env, split="train", batch_prompts=4, seed=0)
    comps = builders.rl_components(config, env, data, _Recorder())
    yield config, env, comps


def _run(env, **loop):
  """Two RL steps with ``loop`` overriding the runlocal LoopConfig; counts the trainer's log-prob passes and
  records the keys of every optimizer step's batch."""
  config, env, comps = env
  cfg = dataclasses.replace(builders.loop_config(config, env.tokenizer.pad_id), **loop)
  trainer = rl_loop.Trainer(comps, cfg)
  calls, keys = [], []
  logp_fn, step_fn = trainer.logp_fn, trainer.step_fn
  trainer.logp_fn = lambda *a: calls.append(1) or logp_fn(*a)
  trainer.step_fn = lambda state, batch, rng: keys.append(set(batch)) or step_fn(state, batch, rng)
  _, _, history = trainer.run(jax.tree.map(jnp.copy, env.state), None)
  return len(calls), keys, history


def test_auto_on_policy_runs_no_trainer_pass(env):
  calls, keys, history = _run(env, old_logp="auto", algo_settings=dataclasses.replace(
      builders.algo_settings(env[0]), num_minibatches=1))
  assert calls == 0
  assert all("old_logp" not in k and "is_weight" not in k for k in keys)
  assert not any(k.startswith("mismatch/") for h in history for k in h)
  assert all(h["ratio_min"] == h["ratio_max"] == 1.0 for h in history)


def test_auto_off_policy_recomputes_and_reports_mismatch(env):
  calls, keys, history = _run(env, old_logp="auto")   # runlocal: 2 minibatches
  assert calls == 2 and all("old_logp" in k for k in keys)
  for h in history:   # float32 sampler and trainer: the gap is at rounding level
    assert 0 <= h["mismatch/logp_abs_diff_mean"] <= h["mismatch/logp_abs_diff_max"] < 1e-3
    assert abs(h["mismatch/kl_k3"]) < 1e-6 and h["mismatch/frac_tokens_out"] == h["mismatch/frac_seqs_out"] == 0


def test_sampler_old_logp_with_periodic_check(env):
  calls, keys, history = _run(env, old_logp="sampler", mismatch_check_every=2)
  assert calls == 1 and all("old_logp" in k for k in keys)
  assert [any(k.startswith("mismatch/") for k in h) for h in history] == [False, True]


def test_correction_puts_weights_in_the_batch(env):
  calls, keys, history = _run(env, old_logp="auto", mismatch_correction="sequence_mask", mismatch_low=0.9,
                              mismatch_high=1.1)
  assert calls == 2 and all({"old_logp", "is_weight"} <= k for k in keys)
  assert all(abs(h["mismatch/weight_mean"] - 1.0) < 1e-4 for h in history)


def test_packed_trainer_pass_and_updates(env):
  """``packing``: the trainer's pass runs on packed rows (and still equals the sampler's float32 log-probs to
  rounding) and every optimizer step's batch carries its packing."""
  calls, keys, history = _run(env, old_logp="auto", packing=True)
  assert calls == 2 and all({"pack_tokens", "pack_index", "old_logp"} <= k for k in keys)
  for h in history:
    assert 0 <= h["mismatch/logp_abs_diff_mean"] <= h["mismatch/logp_abs_diff_max"] < 1e-3
    assert 0 < h["packing/fill"] <= 1


def test_log_prob_pass_starts_before_the_rewards(env):
  """The trainer's pass over the rollout is dispatched before the host scores it, so an expensive reward runs
  while the device computes the pass (its result is read after the rewards)."""
  config, e, comps = env
  events = []
  wrapped = []
  for name, fn in comps.reward_fns:
    def timed(*a, _fn=fn, **k):
      events.append("reward")
      return _fn(*a, **k)
    wrapped.append((name, timed))
  original = comps.reward_fns
  comps.reward_fns = wrapped
  try:
    cfg = dataclasses.replace(builders.loop_config(config, e.tokenizer.pad_id), old_logp="auto", total_steps=1)
    trainer = rl_loop.Trainer(comps, cfg)
    logp_fn = trainer.logp_fn
    trainer.logp_fn = lambda *a: events.append("logp") or logp_fn(*a)
    trainer.run(jax.tree.map(jnp.copy, e.state), None)
  finally:
    comps.reward_fns = original
  assert events[0] == "logp" and "reward" in events


def test_sample_ahead_samples_the_next_rollout_before_the_rewards_with_the_pre_update_policy(env):
  """``sample_ahead``: step k dispatches rollout k + 1 before the host scores rollout k, with the policy before
  update k; so rollout k + 1 comes from the policy one update behind the one it trains, and ``auto`` takes the
  sampler's log-probs as the old ones."""
  config, e, comps = env
  events, sampled_with, updated_from, prompts_seen = [], [], [], []
  checksum = lambda tree: float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree)))  # noqa

  class Spy:
    def __init__(self, inner):
      self.inner = inner

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def sample(self, params, prompt_tokens, *a, **k):
      events.append("sample")
      sampled_with.append(checksum(params))
      prompts_seen.append(np.asarray(prompt_tokens).copy())
      return self.inner.sample(params, prompt_tokens, *a, **k)

  def length_reward(prompts, completions, **_):   # varies within groups, so every update moves the policy
    events.append("reward")
    return np.array([len(c) for c in completions], np.float32)

  saved = comps.sampler, comps.reward_fns, comps.train_iter
  start = comps.train_iter.get_state()
  comps.sampler, comps.reward_fns = Spy(comps.sampler), [("length", length_reward)]
  try:
    cfg = dataclasses.replace(builders.loop_config(config, e.tokenizer.pad_id), sample_ahead=True, total_steps=3)
    trainer = rl_loop.Trainer(comps, cfg)
    step_fn, keys = trainer.step_fn, []
    trainer.step_fn = lambda state, batch, rng: (updated_from.append(checksum(state.params)), keys.append(set(batch)),
                                                 step_fn(state, batch, rng))[-1]
    _, _, history = trainer.run(jax.tree.map(jnp.copy, e.state), None)
  finally:
    comps.sampler, comps.reward_fns, comps.train_iter = saved
  assert events[:3] == ["sample", "sample", "reward"] and events.count("sample") == 3
  per_step = len(updated_from) // 3                      # optimizer steps per RL step (runlocal: 2 minibatches)
  theta = updated_from[::per_step]                       # the policy at the start of each RL step
  assert theta[0] != theta[1] != theta[2]
  np.testing.assert_allclose(sampled_with, [theta[0], theta[0], theta[1]], rtol=1e-12)
  assert [h["sample_ahead/stale"] for h in history] == [0.0, 1.0, 1.0]
  assert cfg.old_logp_source == "sampler" and all("old_logp" in k for k in keys)
  comps.train_iter.set_state(start)                      # the prompt batches, in order, each once
  want = [next(comps.train_iter)["prompt_tokens"] for _ in range(3)]
  assert len(prompts_seen) == 3 and all(np.array_equal(a, b) for a, b in zip(prompts_seen, want))
