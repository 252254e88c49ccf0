"""Multi-turn rollouts on the tiny Transformer: tokens as sampled, the loss mask, log-probs equal to teacher
forcing on the whole trajectory, the turn structure of a scripted environment, and 1 vs 8 devices."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.transformer import Transformer
from rlj import logprobs, sampler, sharding
from rlj.agents import env as env_lib
from rlj.agents.observations import ObservationFormat
from rlj.agents.rollout import MultiTurnSampler, summary
from rlj.data import encoding, tokenizer as tok_lib
from rlj.turn_sampler import TurnSampler

pytestmark = pytest.mark.usefixtures("fast_compile")

MODEL = Transformer(dataclasses.replace(presets.get("tiny"), dtype="float32"))
G, T_TURN, BUDGET = 2, 6, 24
STOPS = tuple(range(4, 40))      # many stop ids: turns of the random tiny model end early, as real ones do


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.train(["obs: 0123456789 ok\nQ: 1 + 2 =\nA: 3\n"] * 20, vocab_size=60, byte_fallback=False)


@pytest.fixture(scope="module")
def params():
  d = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(MODEL.init(jax.random.key(0), d, d, d + 1)["params"])


class Scripted(env_lib.Environment):
  """Answers turn k with "obs: k" and a reward k + 1; ends after the third turn."""

  def __init__(self, log):
    self.log = log

  def reset(self, example):
    self.example = example
    return None

  def step(self, turn):
    self.log.append(turn)
    if turn.index == 2:
      return env_lib.StepResult(done=True, reward=10.0)
    return env_lib.StepResult(observation=f"obs: {turn.index}", reward=float(turn.index + 1))


class Spy:
  """Wraps a sampler and keeps what each call returned."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  @property
  def config(self):
    return self.inner.config

  def sample(self, params, tok, msk, rng, **kwargs):
    out = self.inner.sample(params, tok, msk, rng, **kwargs)
    ro = out[0] if kwargs.get("return_cache") else out
    self.calls.append((np.asarray(tok), np.asarray(msk), jax.device_get(ro)))
    return out


_BUILT = {}


def _samplers(tokenizer, mesh, greedy, reuse):
  """The samplers of one setting, built once per module (their programs compile once)."""
  key = (mesh is not None, greedy, reuse)
  if key not in _BUILT:
    base = dict(max_new_tokens=T_TURN, eos_id=tokenizer.eos_id, stop_ids=STOPS, pad_id=tokenizer.pad_id,
                greedy=greedy, temperature=1.0)
    first = sampler.Sampler(MODEL, sampler.SamplerConfig(num_samples=G, prompt_buckets=(16,), **base), mesh=mesh)
    cont = sampler.Sampler(MODEL, sampler.SamplerConfig(num_samples=1, prompt_buckets=(32, 48), batch_buckets=(4, 8),
                                                         **base), mesh=mesh)
    turns = TurnSampler(cont, max_slots=64, chunk_buckets=(8, 16)) if reuse else None
    _BUILT[key] = (first, cont, turns)
  return _BUILT[key]


def make(tokenizer, mesh=None, greedy=False, log=None, first_obs=None, reuse=False):
  first, cont, turns = _samplers(tokenizer, mesh, greedy, reuse)
  log = [] if log is None else log

  def make_env():
    e = Scripted(log)
    if first_obs is not None:
      e.reset = lambda example: first_obs
    return e
  obs = ObservationFormat(tokenizer, template="\n{observation}\n")
  return MultiTurnSampler(first=Spy(first), cont=Spy(cont), tokenizer=tokenizer, make_env=make_env,
                          observations=obs, max_turns=4, max_total_tokens=BUDGET, turns=turns)


def prompts(tokenizer, n=4):
  texts = [f"Q: {i} + 2 =" for i in range(n)]
  tok, msk = encoding.left_pad([tokenizer.encode(t, add_bos=True) for t in texts], 12, tokenizer.pad_id)
  return {"prompt_tokens": tok, "prompt_mask": msk, "prompt": np.array(texts, object),
          "answer": np.array([str(i + 2) for i in range(n)], object), "index": np.arange(n)}


def test_trained_tokens_are_the_sampled_ones_and_the_mask_covers_exactly_them(tokenizer, params):
  ms = make(tokenizer)
  batch = prompts(tokenizer)
  ar = ms.sample(params, batch, jax.random.key(1))
  ro = ar.rollout
  n, p = 4 * G, batch["prompt_tokens"].shape[1]
  assert ro.tokens.shape == (n, p + BUDGET) and ro.mask.shape == (n, BUDGET)
  # Rebuild each trajectory from what the samplers returned and what the environment said: no other tokens.
  expected = [[] for _ in range(n)]
  model_flags = [[] for _ in range(n)]
  first_tok, _, first = ms.first.calls[0]
  for r in range(n):
    ids = first.completion[r][first.mask[r] > 0].tolist()
    expected[r] += ids
    model_flags[r] += [1] * len(ids)
  rows = list(range(n))
  for turn, (ctx, ctx_mask, out) in enumerate(ms.cont.calls, start=1):
    # The context of every continued row is its prompt and its trajectory so far, exactly.
    live = [r for r in rows if ar.stats["turns"][r] > turn]
    live_now = [r for r in rows if ar.stats["turns"][r] >= turn + 1]
    assert live == live_now
    for k, r in enumerate(live):
      obs = tokenizer.encode(f"\nobs: {turn - 1}\n")
      expected[r] += obs
      model_flags[r] += [0] * len(obs)
      prompt = batch["prompt_tokens"][r // G][batch["prompt_mask"][r // G] > 0].tolist()
      assert ctx[k][ctx_mask[k] > 0].tolist() == prompt + expected[r]
      ids = out.completion[k][out.mask[k] > 0].tolist()
      expected[r] += ids
      model_flags[r] += [1] * len(ids)
  for r in range(n):
    expected[r], model_flags[r] = expected[r][:BUDGET], model_flags[r][:BUDGET]   # a last turn cut by the budget
    k = len(expected[r])
    assert ro.completion[r, :k].tolist() == expected[r]
    assert ro.mask[r].tolist() == model_flags[r] + [0] * (BUDGET - k)
    assert ro.attn_mask[r, p:].tolist() == [1] * k + [0] * (BUDGET - k)
  assert ro.lengths.tolist() == ro.mask.sum(1).astype(int).tolist()


@pytest.mark.parametrize("reuse", [False, True], ids=["reprefill", "kv_reuse"])
def test_sampler_logprobs_equal_teacher_forced_logprobs_of_the_whole_trajectory(tokenizer, params, reuse):
  ms = make(tokenizer, reuse=reuse)
  ar = ms.sample(params, prompts(tokenizer), jax.random.key(2))
  if reuse:
    assert not ms.cont.calls                     # every later turn continued from the cache
  ro = ar.rollout
  assert (ar.stats["turns"] >= 2).any()           # some trajectories are multi-turn
  p = ro.tokens.shape[1] - BUDGET
  tf = logprobs.completion_logprobs(MODEL.apply, params, jnp.asarray(ro.tokens), jnp.asarray(ro.attn_mask), p,
                                    temperature=1.0)
  np.testing.assert_allclose(np.asarray(tf) * ro.mask, ro.logp, atol=1e-5)
  assert (ro.logp[ro.mask == 0] == 0).all()


def test_scripted_environment_turn_structure_and_rewards(tokenizer, params):
  log = []
  ar = make(tokenizer, log=log).sample(params, prompts(tokenizer), jax.random.key(3))
  turns = ar.stats["turns"]
  assert set(turns.tolist()) <= {1.0, 2.0, 3.0}
  for r in range(len(turns)):
    k = int(turns[r])
    if ar.stats["turn_cut"][r] == 0 and ar.stats["hit_budget"][r] == 0:
      assert k == 3 and ar.turn_rewards[r] == 1 + 2 + 10   # the script ends after its third turn
    else:
      assert ar.turn_rewards[r] == sum(range(1, k + 1))   # each answered turn k (0-based) gave k + 1
  assert sorted(t.index for t in log) == sorted(i for k in turns.astype(int) for i in range(k))
  m = summary(ar)
  assert m["agent/turns"] == pytest.approx(turns.mean())
  assert m["agent/reward_per_turn"] == pytest.approx(ar.turn_rewards.sum() / turns.sum())


def test_a_first_observation_from_reset_precedes_the_first_turn(tokenizer, params):
  ms = make(tokenizer, first_obs="obs: 12")
  ar = ms.sample(params, prompts(tokenizer), jax.random.key(4))
  first_obs = tokenizer.encode("\nobs: 12\n")
  assert not ms.first.calls                     # every row is continued from its own context
  for r in range(4 * G):
    assert ar.rollout.completion[r, :len(first_obs)].tolist() == first_obs
    assert ar.rollout.mask[r, :len(first_obs)].sum() == 0


def test_eight_devices_equal_one_device(tokenizer, params):
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  one = make(tokenizer, greedy=True).sample(params, prompts(tokenizer), jax.random.key(5))
  eight = make(tokenizer, mesh=mesh, greedy=True, reuse=True).sample(params, prompts(tokenizer), jax.random.key(5))
  np.testing.assert_array_equal(one.rollout.tokens, eight.rollout.tokens)
  np.testing.assert_array_equal(one.rollout.mask, eight.rollout.mask)
  np.testing.assert_allclose(one.rollout.logp, eight.rollout.logp, atol=1e-5)
  assert jax.device_count() == 8


def test_kv_cache_reuse_gives_the_trajectories_of_re_prefilling(tokenizer, params):
  again = make(tokenizer, greedy=True).sample(params, prompts(tokenizer), jax.random.key(6))
  reused = make(tokenizer, greedy=True, reuse=True).sample(params, prompts(tokenizer), jax.random.key(6))
  assert (again.stats["turns"] >= 2).any()
  np.testing.assert_array_equal(again.rollout.tokens, reused.rollout.tokens)
  np.testing.assert_array_equal(again.rollout.mask, reused.rollout.mask)
  np.testing.assert_allclose(again.rollout.logp, reused.rollout.logp, atol=1e-5)
