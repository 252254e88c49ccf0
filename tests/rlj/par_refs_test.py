"""PAR's reference rewards in the loop (rlj/par_refs.py): each prompt's references are drawn and scored once, from
the policy the settings name, and the cache comes back from a checkpoint's host state, so a resume draws none.

A stand-in sampler writes completion j of prompt b with weights w as the token ``v_b + 100 w + j`` (v_b: the prompt's
last token) followed by EOS, and the wrapped reward reads that number back, so every cached value says which
prompt, which weights and which sample it came from.
"""
import types

import numpy as np
import pytest

from rewards import combine, par
from rlj import par_refs
from rlj.sampler_config import Rollout

EOS = 1


class Tokenizer:
  eos_ids = (EOS,)

  def decode(self, ids, stop_at_eos=False):
    return " ".join(str(int(i)) for i in ids)


class Sampler:
  def __init__(self, num_samples: int, greedy: bool):
    self.config = types.SimpleNamespace(num_samples=num_samples, greedy=greedy, stop_set=(EOS,))
    self.calls = []

  def sample(self, params, prompt_tokens, prompt_mask, rng):
    self.calls.append((params, len(prompt_tokens)))
    s = self.config.num_samples
    prompt = np.repeat(np.asarray(prompt_tokens, np.int32), s, axis=0)
    first = prompt[:, -1] + 100 * params + np.tile(np.arange(s), len(prompt_tokens))
    completion = np.stack([first, np.full_like(first, EOS), np.zeros_like(first)], axis=1).astype(np.int32)
    mask = np.array([[1, 1, 0]] * len(first), np.float32)
    pmask = np.ones_like(prompt)
    return Rollout(tokens=np.concatenate([prompt, completion], 1), completion=completion, logp=np.zeros_like(mask),
                   mask=mask, lengths=mask.sum(1).astype(np.int32), prompt_mask=pmask,
                   attn_mask=np.concatenate([pmask, mask.astype(np.int32)], 1), num_steps=np.int32(2))


class Scorer:
  """The completion's number as its reward; NaN for the answer "skip" (not applicable). Counts the rows it scored."""

  def __init__(self):
    self.rows = 0

  def __call__(self, prompts, completions, *, answers, tokens, **_):
    assert len(tokens) == len(completions)        # the sampler's token rows of the very same completions
    self.rows += len(completions)
    return np.array([np.nan if a == "skip" else float(c) for c, a in zip(completions, answers)], np.float32)


def _batch(prompts, answers, last_tokens):
  toks = np.array([[7, t] for t in last_tokens], np.int32)
  return {"prompt": np.array(prompts), "answer": np.array(answers), "prompt_tokens": toks,
          "prompt_mask": np.ones_like(toks)}


def _references(settings, sampler, scorer):
  return par_refs.ParReferences([("r", par.ParReward(scorer, settings))], sampler=sampler, tokenizer=Tokenizer())


def test_each_prompt_is_referenced_once_and_a_resume_draws_none(tmp_path):
  scorer, sampler = Scorer(), Sampler(num_samples=1, greedy=True)
  refs = _references(par.ParSettings(), sampler, scorer)
  weights_asked = []
  kw = dict(rng=None, policy_weights=lambda: 7,
            reference_weights=lambda: weights_asked.append(0) or 0)   # the frozen reference: w = 0
  first = _batch(["a", "b", "s"], ["1", "2", "skip"], [5, 6, 8])
  m = refs.prepare(first, **kw)
  assert sampler.calls == [(0, 3)] and scorer.rows == 3 and weights_asked == [0]
  assert m["par/new_prompts"] == 3 and m["par/cached_prompts"] == 3 and m["par/r/ref_reward"] == 5.5
  fn = refs.rewards[0][1]
  keys = [par.prompt_key(p, a) for p, a in [("a", "1"), ("b", "2"), ("s", "skip")]]
  np.testing.assert_array_equal(fn.cache.get(keys), [[5.0], [6.0], [np.nan]])
  # Seen again: nothing is drawn or scored.
  m = refs.prepare(first, **kw)
  assert len(sampler.calls) == 1 and scorer.rows == 3 and m["par/new_prompts"] == 0
  assert "time/par_references" not in m
  # An old prompt and a new one (twice): the batch is drawn once, the new prompt is scored and cached once.
  m = refs.prepare(_batch(["b", "c", "c"], ["2", "3", "3"], [60, 9, 9]), **kw)
  assert sampler.calls[-1] == (0, 3) and scorer.rows == 4 and m["par/new_prompts"] == 1
  np.testing.assert_array_equal(fn.cache.get(keys[1:2] + [par.prompt_key("c", "3")]), [[6.0], [9.0]])
  # A PAR reward of a rollout row: sigmoid(r - r_ref) against its prompt's reference; NaN where it has none.
  out = combine.compute([("r", fn)], ["a", "a", "s", "s"], ["5", "7", "5", "7"], num_generations=2,
                        answers=["1", "1", "skip", "skip"], tokens=np.zeros((4, 3)))
  np.testing.assert_allclose(out.values[0, :, 0], [0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-6)
  assert np.isnan(out.values[1]).all()
  # Checkpoint and resume: the host state through an npz file, into a fresh run's references.
  np.savez(tmp_path / "host.npz", **refs.host_state(), other=np.float64(1.0))
  with np.load(tmp_path / "host.npz") as z:
    host = {k: z[k] for k in z.files}
  scorer2, sampler2 = Scorer(), Sampler(num_samples=1, greedy=True)
  resumed = _references(par.ParSettings(), sampler2, scorer2)
  resumed.load_host_state(host)
  m = resumed.prepare(_batch(["a", "b", "c", "s"], ["1", "2", "3", "skip"], [50, 60, 90, 80]), **kw)
  assert sampler2.calls == [] and scorer2.rows == 0 and m["par/new_prompts"] == 0
  np.testing.assert_array_equal(resumed.rewards[0][1].cache.get(keys), fn.cache.get(keys))


def test_sampled_references_are_the_first_num_refs_samples_of_the_current_policy():
  scorer, sampler = Scorer(), Sampler(num_samples=4, greedy=False)
  refs = _references(par.ParSettings(num_refs=2, decode="sample", source="policy"), sampler, scorer)

  def no_reference():
    raise AssertionError("source='policy' must not read the reference")

  refs.prepare(_batch(["a", "b"], ["1", "2"], [5, 6]), rng=None, policy_weights=lambda: 3,
               reference_weights=no_reference)
  assert sampler.calls == [(3, 2)] and scorer.rows == 4            # 2 of the 4 samples of each prompt
  fn = refs.rewards[0][1]
  np.testing.assert_array_equal(fn.cache.get([par.prompt_key("a", "1"), par.prompt_key("b", "2")]),
                                [[305.0, 306.0], [306.0, 307.0]])


def test_rewards_share_settings_that_fit_the_sampler():
  greedy, sampled = Sampler(1, greedy=True), Sampler(4, greedy=False)
  with pytest.raises(ValueError, match="same settings"):
    par_refs.ParReferences([("a", par.ParReward(Scorer())), ("b", par.ParReward(Scorer(), par.ParSettings(
        source="policy")))], sampler=greedy, tokenizer=Tokenizer())
  with pytest.raises(ValueError, match="greedy sampler"):
    _references(par.ParSettings(), sampled, Scorer())
  with pytest.raises(ValueError, match="at least as many"):
    _references(par.ParSettings(num_refs=5, decode="sample"), sampled, Scorer())
