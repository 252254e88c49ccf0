"""Tests for rlj.sampler on the tiny Transformer: cache decode vs full forwards, log-probs, stops, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.transformer import Transformer
from rlj import logprobs, sampler, sharding

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

T_NEW = 6
BUCKET = 8
CFG = presets.get("tiny")
MODEL = Transformer(CFG)
# Two left-padded prompts of lengths 3 and 5 in a width-5 array.
PROMPTS = np.array([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]], np.int32)
PROMPT_MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)


def tiny_params():
  d = jnp.zeros((1, 4), jnp.int32)
  return nn.unbox(MODEL.init(jax.random.key(0), d, d, d + 1)["params"])


@pytest.fixture(scope="module")
def params():
  return tiny_params()


@jax.jit
def _full_logits(params, tokens, mask):
  return MODEL.apply({"params": params}, tokens, logprobs.positions_from_mask(mask), mask)[0]


def _greedy_reference(params, prompts, prompt_mask, steps):
  """Argmax decoding by repeated full forward passes over a fixed-width buffer (no cache)."""
  b, p = prompts.shape
  tokens = np.concatenate([prompts, np.zeros((b, steps), np.int32)], axis=1)
  mask = np.concatenate([prompt_mask, np.zeros((b, steps), np.int32)], axis=1)
  for t in range(steps):
    logits = np.asarray(_full_logits(params, tokens, mask))
    tokens[:, p + t] = logits[:, p + t - 1].argmax(-1)
    mask[:, p + t] = 1
  return tokens[:, p:]


@jax.jit
def _teacher_forced(params, tokens, attn_mask, temperature):
  return logprobs.completion_logprobs(MODEL.apply, params, tokens, attn_mask, PROMPTS.shape[1],
                                      temperature=temperature)


def test_greedy_with_cache_equals_full_forward_argmax_and_stops_at_first_eos(params):
  ref = _greedy_reference(params, PROMPTS, PROMPT_MASK, T_NEW)          # [2, T]
  eos, stop = int(ref[0, 1]), int(ref[1, 2])

  def first_stop(row):
    return next(i for i, tok in enumerate(row) if tok in (eos, stop))

  ends = [first_stop(ref[0]), first_stop(ref[1])]                      # rows 0 and 1 stop at <= 1, <= 2
  s = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=T_NEW, greedy=True, eos_id=eos,
                                                   stop_ids=(stop,), pad_id=0, prompt_buckets=(BUCKET,)))
  r = s.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(3))
  for i, end in enumerate(ends):
    np.testing.assert_array_equal(r.completion[i, :end + 1], ref[i, :end + 1])
    np.testing.assert_array_equal(r.completion[i, end + 1:], 0)
    np.testing.assert_array_equal(r.mask[i], (np.arange(T_NEW) <= end).astype(np.float32))
    np.testing.assert_array_equal(r.logp[i, end + 1:], 0.0)
  np.testing.assert_array_equal(r.lengths, [e + 1 for e in ends])
  assert int(r.num_steps) == max(ends) + 1 < T_NEW                      # the loop stopped early
  np.testing.assert_array_equal(r.tokens[:, :5], PROMPTS)
  np.testing.assert_array_equal(r.attn_mask, np.concatenate([PROMPT_MASK, r.mask], axis=1))

  # Without stop tokens it runs all T steps and equals the full-forward argmax everywhere.
  s_all = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=T_NEW, greedy=True, prompt_buckets=(BUCKET,)))
  r_all = s_all.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(3))
  np.testing.assert_array_equal(r_all.completion, ref)
  assert int(r_all.num_steps) == T_NEW and np.all(np.asarray(r_all.mask) == 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logp_equals_teacher_forced_logp(params, temperature):
  g = 3
  s = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=T_NEW, temperature=temperature, num_samples=g,
                                                   eos_id=5, prompt_buckets=(BUCKET,)))
  r = s.sample(params, PROMPTS, PROMPT_MASK, jax.random.key(7))
  assert r.tokens.shape == (2 * g, 5 + T_NEW) and r.logp.shape == (2 * g, T_NEW)
  # Rows are group-major: rows b*G .. b*G+G-1 continue prompt b.
  np.testing.assert_array_equal(r.tokens[:, :5], np.repeat(PROMPTS, g, axis=0))
  np.testing.assert_array_equal(r.prompt_mask, np.repeat(PROMPT_MASK, g, axis=0))
  assert len({tuple(row) for row in np.asarray(r.completion)}) > 1     # samples differ
  tf = _teacher_forced(params, r.tokens, r.attn_mask, temperature)
  m = np.asarray(r.mask)
  np.testing.assert_allclose(np.asarray(r.logp) * m, np.asarray(tf) * m, rtol=1e-5, atol=1e-5)


def test_no_recompile_within_bucket_and_donated_cache_reuse(params):
  cfg = sampler.SamplerConfig(max_new_tokens=T_NEW, temperature=0.7, num_samples=2, prompt_buckets=(BUCKET,),
                              batch_buckets=(2,), keep_cache=True)
  s = sampler.Sampler(MODEL, cfg)
  rng = jax.random.key(11)
  first = s.sample(params, PROMPTS, PROMPT_MASK, rng)                  # B = 2, P = 5
  kept = s._caches[(2, BUCKET)]
  short = s.sample(params, PROMPTS[1:, 2:], PROMPT_MASK[1:, 2:], rng)  # B = 1, P = 3: same bucket
  assert all(k.is_deleted() for k in jax.tree.leaves(kept.k))           # the cache buffers were donated
  again = s.sample(params, PROMPTS, PROMPT_MASK, rng)                  # a reused cache leaks nothing
  assert s.num_traces == 1
  assert short.tokens.shape == (2, 3 + T_NEW)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="largest bucket"):
    s.sample(params, np.zeros((1, BUCKET + 1), np.int32), np.ones((1, BUCKET + 1), np.int32), rng)


@pytest.mark.parametrize("unrolled", [True, False])
def test_sharded_sampling_equals_single_device(params, unrolled):
  cfg = sampler.SamplerConfig(max_new_tokens=T_NEW, temperature=1.0, num_samples=4, top_k=20,
                              prompt_buckets=(BUCKET,), unrolled_decode=unrolled)
  rng = jax.random.key(5)
  single = sampler.Sampler(MODEL, cfg).sample(params, PROMPTS, PROMPT_MASK, rng)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  s = sampler.Sampler(MODEL, cfg, mesh=mesh)
  sharded_params = sharding.reshard(params, s.param_shardings())
  multi = s.sample(sharded_params, PROMPTS, PROMPT_MASK, rng)
  assert len(multi.completion.sharding.device_set) == 8
  np.testing.assert_array_equal(multi.completion, single.completion)
  np.testing.assert_array_equal(multi.mask, single.mask)
  np.testing.assert_allclose(multi.logp, single.logp, rtol=1e-5, atol=1e-5)


def test_first_token_frequencies_match_filtered_model_distribution(params):
  """G = 4000 samples of one prompt, one new token each, top-k 4 and top-p 0.9 at temperature 0.8.

  The reference q is the filtered softmax of the model's full-forward logits (numpy). Each token's
  frequency must lie within 5 binomial standard deviations of q (false-failure probability < 1e-5 over
  the kept tokens); tokens outside the kept set must never appear.
  """
  g, temperature = 4000, 0.8
  s = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=1, temperature=temperature, top_k=4, top_p=0.9,
                                                   num_samples=g))
  r = s.sample(params, PROMPTS[:1], PROMPT_MASK[:1], jax.random.key(2))
  logits = np.asarray(_full_logits(params, PROMPTS[:1], PROMPT_MASK[:1]))[0, -1].astype(np.float64) / temperature
  order = np.argsort(-logits)[:4]
  p4 = np.exp(logits[order] - logits[order].max())
  p4 /= p4.sum()
  keep = order[(np.cumsum(p4) - p4) < 0.9]
  q = np.zeros_like(logits)
  q[keep] = np.exp(logits[keep] - logits[keep].max())
  q /= q.sum()
  assert len(keep) >= 2                                                # the test distinguishes tokens
  freq = np.bincount(np.asarray(r.completion[:, 0]), minlength=q.shape[0]) / g
  assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / g) + 1e-12), (freq[keep], q[keep])
  assert freq[q == 0].sum() == 0
  np.testing.assert_allclose(r.logp[:, 0], np.log(q[np.asarray(r.completion[:, 0])]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, pytest.param(False, marks=pytest.mark.slow)])   # tied: the untying too
def test_unrolled_decode_matches_scanned_decode_and_teacher_forced_logp(tied):
  """unrolled_decode: an unscanned (and untied) copy of the model, converted inside the program, samples the
  same tokens and log-probs as the scanned model it came from."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  model = Transformer(dataclasses.replace(CFG, tie_embeddings=tied))
  d = jnp.zeros((1, 4), jnp.int32)
  p = nn.unbox(model.init(jax.random.key(1), d, d, d + 1)["params"])
  cfg = lambda unroll: sampler.SamplerConfig(max_new_tokens=T_NEW, temperature=0.8, prompt_buckets=(BUCKET,),
                                             unrolled_decode=unroll)
  fast, plain = sampler.Sampler(model, cfg(True)), sampler.Sampler(model, cfg(False))
  assert plain.decode_model is model
  dc = fast.decode_model.config
  assert not dc.scan_layers and not dc.tie_embeddings
  dp = fast.decode_params(p)
  assert "layers" not in dp and dp["layers_1"]["mlp"]["down"].shape == (CFG.mlp_dim, CFG.embed_dim)
  assert dp["lm_head"].shape == (CFG.embed_dim, CFG.vocab_size)
  assert isinstance(fast._new_cache(2, BUCKET).k, tuple) and plain._new_cache(2, BUCKET).k.ndim == 5
  a, b = (s.sample(p, PROMPTS, PROMPT_MASK, jax.random.key(4)) for s in (fast, plain))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logp, b.logp, rtol=1e-5, atol=1e-5)
  tf = logprobs.completion_logprobs(model.apply, p, a.tokens, a.attn_mask, a.tokens.shape[1] - T_NEW,
                                    temperature=0.8)
  m = np.asarray(a.mask, np.float32)
  np.testing.assert_allclose(np.asarray(a.logp) * m, np.asarray(tf) * m, rtol=1e-5, atol=1e-5)


def test_unrolled_decode_is_the_cpu_default():
  s = sampler.Sampler(MODEL, sampler.SamplerConfig(max_new_tokens=T_NEW))
  assert (jax.devices()[0].platform == "cpu") == (not s.decode_model.config.scan_layers)
