"""The jitted step: micro-batch gradients against the full batch for every aggregation, skip counters in the state."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from algorithms import common
from models import presets
from models.transformer import Transformer
from rlj import logprobs, rl_algos, train_state
from rlj import train_step as ts

pytestmark = pytest.mark.usefixtures("fast_compile")

P, T, N = 3, 5, 8
MODEL = Transformer(presets.get("tiny"))


@pytest.fixture(scope="module")
def params():
  dummy = jnp.zeros((1, P + T), jnp.int32)
  return jax.jit(MODEL.init)(jax.random.key(0), dummy, dummy, jnp.ones_like(dummy))["params"]


def _batch(seed=0, *, pairs=False):
  """N rows of prompt + completion with ragged completion masks (one row fully masked), old log-probs near the
  current ones, advantages, and the global normalisers of the whole step."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 128, (N, P + T)).astype(np.int32)
  mask = (np.arange(T)[None] < rng.integers(1, T + 1, (N, 1))).astype(np.float32)
  mask[3] = 0.0
  batch = {"tokens": tokens, "attn_mask": np.concatenate([np.ones((N, P), np.int32), mask.astype(np.int32)], 1),
           "mask": mask, "old_logp": rng.normal(-4.8, 0.3, (N, T)).astype(np.float32),
           "adv": rng.normal(size=N).astype(np.float32),
           "num_tokens": np.float32(mask.sum()), "num_seqs": np.float32((mask.sum(-1) > 0).sum())}
  if pairs:
    batch["ref_logp"] = rng.normal(-4.8, 0.3, (N, T)).astype(np.float32)
    batch["pair_rewards"] = rng.normal(size=(N // 2, 2)).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _grads(params, batch, objective, *, num_microbatches, sum_microbatches):
  logp_fn = logprobs.make_logp_fn(MODEL.apply, completion_len=T, temperature=1.0)
  loss, _, grads = jax.jit(functools.partial(ts.loss_and_grads, logp_fn=logp_fn, objective=objective,
                                             num_microbatches=num_microbatches,
                                             sum_microbatches=sum_microbatches))(params, batch)
  return loss, grads


@pytest.mark.parametrize("agg", sorted(common.AGG_MODES))
def test_summed_microbatch_gradients_equal_the_full_batch(params, agg):
  """GRPO with the step's global normalisers: the sum of the micro-batch gradients is the full-batch gradient."""
  objective = functools.partial(rl_algos.policy_gradient_objective, agg=agg, max_len=T, clip_eps=0.2)
  batch = _batch(1)
  loss1, g1 = _grads(params, batch, objective, num_microbatches=1, sum_microbatches=True)
  loss4, g4 = _grads(params, batch, objective, num_microbatches=4, sum_microbatches=True)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()))   # summation order
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-4      # the gradient is not trivially 0


def test_averaged_microbatch_gradients_equal_the_full_batch_for_pair_means(params):
  """P3O's loss is a mean over pairs: equal micro-batches of whole pairs average to the full-batch gradient."""
  objective = functools.partial(rl_algos.p3o_objective, kl_coef=0.05)
  batch = _batch(2, pairs=True)
  _, g1 = _grads(params, batch, objective, num_microbatches=1, sum_microbatches=False)
  _, g2 = _grads(params, batch, objective, num_microbatches=2, sum_microbatches=False)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()))   # summation order


def test_skip_counters_live_in_the_state(params):
  """A non-finite update leaves params and optimizer state as they were and counts in the state; a finite one
  resets the run; the host-side counter stops the run at its limit."""
  tx = optax.adam(1e-3)
  state = train_state.TrainState.create(params, tx)
  logp_fn = logprobs.make_logp_fn(MODEL.apply, completion_len=T, temperature=1.0)
  step = jax.jit(functools.partial(ts.train_step, logp_fn=logp_fn, tx=tx, objective=functools.partial(
      rl_algos.policy_gradient_objective, agg="token_mean", clip_eps=0.2)))
  good, bad = _batch(3), _batch(3)
  bad["adv"] = bad["adv"].at[0].set(jnp.nan)
  counter = train_state.SkipCounter(2, what="updates", hint="fix it")
  history = []
  for i, b in enumerate([bad, good, bad]):
    before = state
    state, m = step(state, b, jax.random.key(0))
    m = counter.update(jax.device_get(m), f"at {i}")
    assert "skips_in_row" not in m and "skips_total" not in m
    history.append((float(m["skipped"]), counter.in_row, counter.total, int(state.step)))
    if m["skipped"]:
      for a, c in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((before.params,
                                                                                         before.opt_state))):
        np.testing.assert_array_equal(a, c)
  assert history == [(1.0, 1, 1, 0), (0.0, 0, 1, 1), (1.0, 1, 2, 1)]
  assert (int(state.skips_in_row), int(state.skips_total)) == (1, 2)
  _, m = step(state, bad, jax.random.key(0))
  with pytest.raises(train_state.NonFiniteUpdates, match="2 updates in a row"):
    counter.update(jax.device_get(m), "at 3")
