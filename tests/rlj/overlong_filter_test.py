"""``train.mask_truncated`` (DAPO's overlong filtering) in the RL loop: the rows cut at max_new_tokens leave the
batch's loss mask while their rewards still shape their groups' advantages, and the launcher refuses it in one
line where it cannot apply."""
import dataclasses
import tempfile

import jax
import numpy as np
import pytest

from launch import builders, checks
from launch.benchmarks import rl_step
from rlj import rl_loop, rollout_stats

pytestmark = pytest.mark.usefixtures("fast_compile")

PROMPTS, G, T = 4, 4, 4
OVERRIDES = {"train.batch_prompts": PROMPTS, "sampler.num_generations": G, "sampler.max_new_tokens": T,
             "train.mask_truncated": True, "tokenizer.train_records": 200, "data.train_records": 400,
             "sampler.stop_tokens": tuple(range(3, 30))}   # a scratch policy then stops about every fourth token


def length_reward(prompts, completions, **_):
  return [float(len(c)) for c in completions]


def test_cut_rows_leave_the_loss_and_keep_their_rewards():
  config = rl_step.runlocal_config(total_steps=1, overrides=OVERRIDES)
  checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    env = builders.build_env(config, workdir)
    data = builders.prompt_iterator(config, env, split="train", batch_prompts=PROMPTS, seed=config.seed)
    comps = builders.rl_components(config, env, data, rl_step._NullWriter())  # pylint: disable=protected-access
    comps = dataclasses.replace(comps, reward_fns=[("len", length_reward)], reward_weights=np.ones(1, np.float32))
    cfg = builders.loop_config(config, env.tokenizer.pad_id)
    assert cfg.mask_truncated
    trainer = rl_loop.Trainer(comps, cfg)
    seen = {}
    sample = trainer.sample

    def recording_sample(*args, **kw):
      out = sample(*args, **kw)
      seen["rollout"] = out[0]
      return out

    trainer.sample = recording_sample
    arrays, rewards, _ = trainer.rollout(env.state, next(data), jax.random.key(0))
  ro = seen["rollout"]
  sampled_mask = np.asarray(ro.mask).astype(np.float32)
  cut = rollout_stats.truncated(np.asarray(ro.completion), sampled_mask, max_new_tokens=T,
                                stop_ids=comps.sampler.config.stop_set)
  assert cut.any() and not cut.all(), "the test needs both cut and stopped rows"
  np.testing.assert_array_equal(arrays["mask"][cut], 0)
  np.testing.assert_array_equal(arrays["mask"][~cut], sampled_mask[~cut])
  # Every completion keeps its reward, the cut ones included (the advantages are those of the whole group).
  assert rewards.values.shape[:2] == (PROMPTS, G) and np.isfinite(rewards.values).all()
  assert (rewards.values.reshape(-1)[cut] > 0).all()


def test_a_pairwise_algorithm_is_refused_in_one_line():
  config = rl_step.runlocal_config(total_steps=1, overrides={"train.mask_truncated": True, "algo.name": "dno"})
  with pytest.raises(SystemExit) as e:
    checks.validate(config)
  assert "train.mask_truncated" in str(e.value) and "pairs" in str(e.value) and "\n" not in str(e.value)
