"""A reward model as a process reward model (``rlj.rm_reward.make_step_reward_fn``): each step's reward is the
model's score of the prompt and the completion's prefix ending at that step, against re-laid prefix rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.reward_model import RewardModel
from rlj import rm_reward

pytestmark = pytest.mark.usefixtures("fast_compile")

P, T, N = 3, 5, 4


def test_step_rewards_are_scores_of_the_prefixes():
  rng = np.random.default_rng(0)
  tokens, mask = np.zeros((N, P + T), np.int32), np.zeros((N, P + T), np.int32)
  prompts, comps = [], []
  for i in range(N):                       # prompts left-padded to P, completions right-padded to T
    p_len, c_len = int(rng.integers(1, P + 1)), int(rng.integers(2, T + 1))
    prompts.append(rng.integers(3, 100, p_len))
    comps.append(rng.integers(3, 100, c_len))
    tokens[i, P - p_len:P], mask[i, P - p_len:P] = prompts[-1], 1
    tokens[i, P:P + c_len], mask[i, P:P + c_len] = comps[-1], 1
  step_ends = [[0, len(comps[0]) - 1], [len(comps[1]) - 1], [0, 1, len(comps[2]) - 1], [1, len(comps[3]) - 1]]
  model = RewardModel(presets.get("tiny"), kind="bt")
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask))["params"]
  fn = rm_reward.make_step_reward_fn(model, params, {"num_taus": 0, "tokenizer_path": "tok.model"})
  got = fn(["p"] * N, ["c"] * N, steps=[["s"] * len(e) for e in step_ends], step_ends=step_ends, tokens=tokens,
           attn_mask=mask, completion_mask=mask[:, P:])
  assert [len(g) for g in got] == [len(e) for e in step_ends]
  # independent: each prefix as its own row, left-aligned and right-padded, scored by the model directly
  width = P + T
  rows = [np.concatenate([prompts[i], comps[i][:e + 1]]) for i in range(N) for e in step_ends[i]]
  ref_tokens = np.zeros((len(rows), width), np.int32)
  ref_mask = np.zeros((len(rows), width), np.int32)
  for k, r in enumerate(rows):
    ref_tokens[k, :len(r)], ref_mask[k, :len(r)] = r, 1
  want = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ref_tokens), jnp.asarray(ref_mask)))
  np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-5)
  assert len(np.unique(np.round(want, 4))) > 1
