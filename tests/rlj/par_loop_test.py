"""PAR in the RL loop (rlj/rl_loop.py with rlj/par_refs.py): a rollout's PAR reward is sigmoid(r - r_ref) against
the frozen reference's greedy completion of its prompt, drawn once; a prompt batch seen again draws nothing, and a
trainer resumed from the host state draws nothing either."""
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import builders, checks, reward_setup
from launch.benchmarks import rl_step
from rewards import par
from rlj import evaluation, rl_loop

pytestmark = [pytest.mark.usefixtures("fast_compile"), pytest.mark.slow]

PROMPTS, G = 4, 4
OVERRIDES = {"train.batch_prompts": PROMPTS, "sampler.num_generations": G, "algo.kwargs.kl_coef": 0.05,
             "tokenizer.train_records": 200, "data.train_records": 400, "sampler.max_new_tokens": 8,
             "rewards": ({"name": "len", "fn": "length_penalty", "par": {}},)}


class Length:
  """The completion's length in characters; remembers the texts of its last call."""

  def __call__(self, prompts, completions, **_):
    self.texts = list(completions)
    return np.array([len(c) for c in completions], np.float32)


def test_rollout_scores_against_the_reference_greedy_completion_once():
  config = rl_step.runlocal_config(total_steps=1, overrides=OVERRIDES)
  checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    env = builders.build_env(config, workdir)
  length = Length()
  fns = [("len", par.ParReward(length))]
  data = builders.prompt_iterator(config, env, split="train", batch_prompts=PROMPTS, seed=config.seed)
  comps = builders.rl_components(config, env, data, rl_step._NullWriter())  # pylint: disable=protected-access
  comps = dataclasses.replace(comps, reward_fns=fns, par=reward_setup.par_references(config, env, fns, comps.sampler))
  draws = []
  sample = comps.par.sampler.sample
  comps.par.sampler.sample = lambda *a: draws.append(1) or sample(*a)
  cfg = builders.loop_config(config, env.tokenizer.pad_id)
  trainer = rl_loop.Trainer(comps, cfg)
  state, ref = env.state, jax.tree.map(jnp.copy, env.state.params)
  prompts = next(data)
  _, rewards, m = trainer.rollout(state, prompts, jax.random.key(1), 0, ref)
  assert draws == [1] and m["par/new_prompts"] == PROMPTS
  # The reference: the greedy completion of the frozen reference, drawn here by the greedy sampler itself.
  greedy = sample(trainer.reference_sampler_params(ref), prompts["prompt_tokens"], prompts["prompt_mask"], jax.random.key(0))
  ref_len = np.array([len(t) for t in evaluation.rollout_texts(env.tokenizer, greedy, comps.sampler.config.stop_set)])
  own_len = np.array([len(t) for t in length.texts]).reshape(PROMPTS, G)
  np.testing.assert_allclose(rewards.values[..., 0], 1 / (1 + np.exp(-(own_len - ref_len[:, None]))), rtol=1e-6)
  # The same prompts again, and after a resume from the host state: nothing is drawn.
  _, again, m = trainer.rollout(state, prompts, jax.random.key(2), 1, ref)
  assert draws == [1] and m["par/new_prompts"] == 0
  host = trainer.host_state()
  assert set(host) >= {"par/len/keys", "par/len/rewards"} and host["par/len/keys"].shape == (PROMPTS,)
  fns2 = [("len", par.ParReward(Length()))]
  comps2 = dataclasses.replace(comps, reward_fns=fns2, par=reward_setup.par_references(config, env, fns2, comps.sampler))
  comps2.par.sampler.sample = lambda *a: draws.append(2) or sample(*a)
  resumed = rl_loop.Trainer(comps2, cfg)
  resumed.load_host_state(host)
  _, _, m = resumed.rollout(state, prompts, jax.random.key(3), 1, ref)
  assert draws == [1] and m["par/new_prompts"] == 0
