"""The sampler's shared prefill (each prompt prefilled once for its G samples) and its KV-cache phases."""
import jax
import numpy as np
import pytest

from rlj import logprobs, sampler, sharding
# The tiny model and the two left-padded prompts of the sampler's main tests.
from sampler_test import BUCKET, MODEL, PROMPT_MASK, PROMPTS, _full_logits, tiny_params

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

T_NEW = 40


@pytest.fixture(scope="module")
def params():
  return tiny_params()


def _config(**kw):
  return sampler.SamplerConfig(**{"max_new_tokens": T_NEW, "prompt_buckets": (BUCKET,), **kw})


@pytest.mark.parametrize("new_tokens, phases, ends", [
    (512, 4, (128, 256, 384, 511)),     # T - 1 = 511 forward passes in four phases
    (40, 3, (16, 32, 39)),              # boundaries rounded up to 16 steps
    (6, 4, (5,)),                       # too short to split
    (1, 3, ()),                         # no forward pass after the prefill
    (200, 1, (199,)),
])
def test_phase_ends(new_tokens, phases, ends):
  s = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=new_tokens, cache_phases=phases))
  assert s.phase_ends() == ends


def test_default_phases_on_cpu():
  for t, n in ((64, 1), (65, 1), (66, 2), (512, 8), (4096, 8)):
    assert sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=t)).num_cache_phases == n
  with pytest.raises(ValueError, match="cache_phases"):
    sampler.SamplerConfig(max_new_tokens=4, cache_phases=0)


@pytest.mark.parametrize("unrolled", [True, False])
def test_phased_greedy_decoding_equals_full_forward_argmax(params, unrolled):
  """Three cache phases (16, 16 and 7 steps) decode what argmax over repeated full forward passes decodes."""
  tokens = np.concatenate([PROMPTS, np.zeros((2, T_NEW), np.int32)], axis=1)
  mask = np.concatenate([PROMPT_MASK, np.zeros((2, T_NEW), np.int32)], axis=1)
  for t in range(T_NEW):
    tokens[:, 5 + t] = np.asarray(_full_logits(params, tokens, mask))[:, 4 + t].argmax(-1)
    mask[:, 5 + t] = 1
  s = sampler.Sampler(MODEL, _config(greedy=True, cache_phases=3, unrolled_decode=unrolled))
  assert s.phase_ends() == (16, 32, 39)
  r = s.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0))
  np.testing.assert_array_equal(r.completion, tokens[:, 5:])


def test_phased_sampling_logp_matches_teacher_forced_and_one_phase(params):
  """Temperature sampling with G = 3 over three phases: the log-probs equal teacher-forced ones, and the draws
  equal those of a one-phase sampler with the same key."""
  kw = dict(temperature=0.8, num_samples=3, eos_id=7)
  phased = sampler.Sampler(MODEL, _config(cache_phases=3, **kw)).sample(params, PROMPTS, PROMPT_MASK,
                                                                        jax.random.key(9))
  single = sampler.Sampler(MODEL, _config(cache_phases=1, **kw)).sample(params, PROMPTS, PROMPT_MASK,
                                                                        jax.random.key(9))
  np.testing.assert_array_equal(phased.tokens, single.tokens)
  np.testing.assert_allclose(phased.logp, single.logp, rtol=1e-5, atol=1e-5)
  assert int(phased.num_steps) > 16                                     # the draws crossed a phase boundary
  tf = logprobs.completion_logprobs(MODEL.apply, params, phased.tokens, phased.attn_mask, 5, temperature=0.8)
  m = np.asarray(phased.mask)
  np.testing.assert_allclose(np.asarray(phased.logp) * m, np.asarray(tf) * m, rtol=1e-5, atol=1e-5)


def test_phased_sharded_sampling_equals_single_device(params):
  cfg = _config(temperature=1.0, num_samples=4, cache_phases=3)
  rng = jax.random.key(5)
  single = sampler.Sampler(MODEL, cfg).sample(params, PROMPTS, PROMPT_MASK, rng)
  s = sampler.Sampler(MODEL, cfg, mesh=sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)]))
  multi = s.sample(sharding.reshard(params, s.param_shardings()), PROMPTS, PROMPT_MASK, rng)
  np.testing.assert_array_equal(multi.completion, single.completion)
  np.testing.assert_allclose(multi.logp, single.logp, rtol=1e-5, atol=1e-5)


class _Recording(sampler.Sampler):
  """Records the token shape of every model call the program traces."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.calls = []

  def apply_model(self, model, params, tokens, *args, **kwargs):
    self.calls.append(tokens.shape)
    return super().apply_model(model, params, tokens, *args, **kwargs)


def test_each_prompt_is_prefilled_once_for_its_samples(params):
  g = 4
  s = _Recording(MODEL, _config(temperature=1.0, num_samples=g, cache_phases=3))
  r = s.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(1))
  # The prefill runs the B = 2 prompts; each of the three phase loops traces one decode step of B * G rows.
  assert s.calls == [(2, BUCKET)] + [(2 * g, 1)] * 3
  np.testing.assert_array_equal(r.tokens[:, :5], np.repeat(PROMPTS, g, axis=0))
  assert len({tuple(row) for row in np.asarray(r.completion[:g])}) > 1   # the G samples of a prompt differ
