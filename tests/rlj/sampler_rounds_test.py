"""Sampling in rounds (rlj.sampler_rounds) on the tiny Transformer: greedy rounds give the one-shot sampler's
completions, sampled rounds give log-probs equal to teacher forcing, and stopped rows leave the batch."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.transformer import Transformer
from rlj import logprobs, sampler
from rlj.sampler_rounds import RoundSampler
from rlj.turn_sampler import TurnSampler

pytestmark = pytest.mark.usefixtures("fast_compile")

MODEL = Transformer(dataclasses.replace(presets.get("tiny"), dtype="float32"))
T, ROUND, G = 12, 4, 4
STOPS = tuple(range(10, 22))     # about 1 token in 10 stops a row: lengths spread over the rounds
PROMPTS = np.array([[0, 0, 31, 32, 33], [41, 42, 43, 44, 45]], np.int32)
PROMPT_MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)


@pytest.fixture(scope="module")
def params():
  d = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(MODEL.init(jax.random.key(0), d, d, d + 1)["params"])


def _config(t, g, greedy, **kw):
  return sampler.SamplerConfig(max_new_tokens=t, num_samples=g, greedy=greedy, eos_id=1, stop_ids=STOPS,
                               prompt_buckets=(8,), **kw)


def _rounds(greedy):
  first = sampler.Sampler(MODEL, _config(ROUND, G, greedy))
  cont = sampler.Sampler(MODEL, _config(ROUND, 1, greedy, batch_buckets=(2, 4, 8)))
  return RoundSampler(first, TurnSampler(cont, max_slots=32, chunk_buckets=(1,)), max_new_tokens=T)


def test_greedy_rounds_equal_the_one_shot_sampler(params):
  one = sampler.Sampler(MODEL, _config(T, G, True)).sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0))
  rs = _rounds(True)
  ro = rs.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(one.tokens), ro.tokens)
  np.testing.assert_array_equal(np.asarray(one.mask), ro.mask)
  np.testing.assert_allclose(np.asarray(one.logp), ro.logp, atol=1e-5)
  assert ro.tokens.shape == (2 * G, PROMPTS.shape[1] + T)


def test_sampled_rounds_have_teacher_forced_logprobs_and_drop_stopped_rows(params):
  rs = _rounds(False)
  ro = rs.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(3))
  lengths = ro.mask.sum(1)
  assert lengths.min() < T and (lengths > ROUND).any()      # rows stopped in different rounds
  tf = logprobs.completion_logprobs(MODEL.apply, params, jnp.asarray(ro.tokens), jnp.asarray(ro.attn_mask),
                                    PROMPTS.shape[1], temperature=1.0)
  np.testing.assert_allclose(np.asarray(tf) * ro.mask, ro.logp, atol=1e-5)
  # Each row's mask is a prefix ending at its first stop id (or at T).
  for row, m in zip(ro.completion, ro.mask):
    k = int(m.sum())
    assert m[:k].all() and not m[k:].any()
    assert k == T or row[k - 1] in STOPS + (1,)
  assert rs.rows_decoded < 2 * G * T            # later rounds ran on fewer rows
