"""A rollout in sequential chunks of prompts (rlj.sampler_chunks) is the one-call rollout in the same row order:
greedy tokens equal, each sampled chunk is the inner sampler's call on its prompts, and a bad chunk count stops."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.transformer import Transformer
from rlj import sampler
from rlj.sampler_chunks import ChunkedSampler

pytestmark = pytest.mark.usefixtures("fast_compile")

MODEL = Transformer(dataclasses.replace(presets.get("tiny"), dtype="float32"))
G = 2
PROMPTS = np.array([[0, 0, 31, 32, 33], [41, 42, 43, 44, 45], [0, 7, 8, 9, 10], [0, 0, 0, 50, 51]], np.int32)
PROMPT_MASK = (PROMPTS > 0).astype(np.int32)


@pytest.fixture(scope="module")
def params():
  d = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(MODEL.init(jax.random.key(0), d, d, d + 1)["params"])


def _sampler(greedy):
  return sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=6, num_samples=G, greedy=greedy, eos_id=1,
                                                      prompt_buckets=(8,)))


def test_chunks_keep_the_rows_of_one_call(params):
  inner = _sampler(True)
  one = inner.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0))
  two = ChunkedSampler(inner, 2).sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0))
  for f in ("tokens", "completion", "mask", "lengths", "prompt_mask", "attn_mask"):
    np.testing.assert_array_equal(np.asarray(getattr(two, f)), np.asarray(getattr(one, f)), err_msg=f)
  np.testing.assert_allclose(np.asarray(two.logp), np.asarray(one.logp), atol=1e-5)
  assert int(two.num_steps) == int(one.num_steps)

  inner = _sampler(False)
  rng = jax.random.key(5)
  four = ChunkedSampler(inner, 4).sample(params, PROMPTS, PROMPT_MASK, rng)
  for i in range(4):   # chunk i: the inner call on prompt i with fold_in(rng, i), at rows i * G .. i * G + G - 1
    alone = inner.sample(params, PROMPTS[i:i + 1], PROMPT_MASK[i:i + 1], jax.random.fold_in(rng, i))
    np.testing.assert_array_equal(np.asarray(four.tokens)[i * G:(i + 1) * G], np.asarray(alone.tokens))
    np.testing.assert_allclose(np.asarray(four.logp)[i * G:(i + 1) * G], np.asarray(alone.logp), atol=1e-6)
  with pytest.raises(ValueError, match="does not divide"):
    ChunkedSampler(inner, 3).sample(params, PROMPTS, PROMPT_MASK, rng)
