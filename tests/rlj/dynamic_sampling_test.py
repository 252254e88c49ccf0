"""DAPO dynamic sampling (``rlj.dynamic_sampling``): which groups a step keeps, in which order it refills, when the
bound is hit, and that masked fillers add nothing to the loss or its gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rewards import combine
from rlj import dynamic_sampling, rl_algos
from rlj.batches import Settings

B, G, T = 6, 4, 3
WEIGHTS = np.array([1.0, 0.5], np.float32)


def _random_values(rng) -> np.ndarray:
  """[B, G, 2] rewards: groups constant, varied, partly or wholly missing."""
  values = rng.integers(0, 2, (B, G, 2)).astype(np.float32)
  for b in range(B):
    kind = rng.integers(0, 5)
    if kind == 0:
      values[b] = values[b, :1]                     # every completion the same: constant
    elif kind == 1:
      values[b, 1:] = np.nan                        # one valid reward: nothing to compare
    elif kind == 2:
      values[b, :, 0] = np.nan                      # one component missing: the other decides
  return values


class _FakeRollouts:
  """``rollout(rng)``: the next prompt batch's rows, tokens naming (call, row), widths varying by call."""

  def __init__(self, values):
    self.values, self.keys = values, []

  def __call__(self, rng):
    k = len(self.keys)
    self.keys.append(np.asarray(jax.random.key_data(rng)))
    width = 2 + 2 * (k % 2) + T                      # two prompt buckets
    tokens = np.full((B * G, width), 7, np.int32)
    tokens[:, -1] = 1000 * k + np.arange(B * G)
    arrays = {"tokens": tokens, "attn_mask": np.ones((B * G, width), np.int32),
              "mask": np.ones((B * G, T), np.float32), "old_logp": np.full((B * G, T), -float(k), np.float32)}
    metrics = {"time/sample": 1.0, "sampled_tokens": 10.0, "reward/mean": float(k)}
    return arrays, combine.Rewards(self.values[k], ("a", "b")), metrics


def _reference(values, max_extra):
  """A slow loop: roll out until B groups with distinct rewards or the bound; fill with filtered groups."""
  kept, rejected, calls = [], [], 0
  while True:
    total = combine.weighted_total(values[calls], WEIGHTS)
    for b in range(B):
      present = total[b][~np.isnan(total[b])]
      (kept if len(present) >= 2 and present.max() != present.min() else rejected).append((calls, b))
    calls += 1
    if len(kept) >= B or calls > max_extra:
      break
  counts = {"groups_filtered": len(rejected), "groups_unused": max(len(kept) - B, 0)}
  kept = kept[:B]
  return kept + rejected[:B - len(kept)], B - len(kept), calls, counts


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_extra", [0, 1, 3])
def test_selection_refill_order_and_bound_against_a_reference_loop(seed, max_extra):
  rng = np.random.default_rng(seed)
  values = [_random_values(rng) for _ in range(max_extra + 1)]
  fake = _FakeRollouts(values)
  sampler = dynamic_sampling.DynamicSampler(dynamic_sampling.DynamicSampling(True, max_extra), weights=WEIGHTS,
                                            group_size=G, pad_id=0)
  key = jax.random.key(seed)
  arrays, rewards, m = sampler.collect(fake, key, step=3)
  picks, fillers, calls, counts = _reference(values, max_extra)

  assert len(fake.keys) == calls == m["dynamic_sampling/extra_rollouts"] + 1
  for k, got in enumerate(fake.keys):   # rollout k > 0 samples with fold_in(step key, k)
    want = key if k == 0 else jax.random.fold_in(key, k)
    np.testing.assert_array_equal(got, jax.random.key_data(want))
  assert m["dynamic_sampling/filler_groups"] == fillers and m["dynamic_sampling/bound_hit"] == float(fillers > 0)
  assert m["dynamic_sampling/groups_kept"] == B - fillers
  assert all(m[f"dynamic_sampling/{k}"] == v for k, v in counts.items())
  # the batch: B groups of G rows (the compiled shape), widest prompt width, rows of the picked groups in order
  assert arrays["tokens"].shape == (B * G, max(2 + 2 * (k % 2) + T for k in range(calls)))
  want_ids = np.array([1000 * k + b * G + g for k, b in picks for g in range(G)])
  np.testing.assert_array_equal(arrays["tokens"][:, -1], want_ids)
  np.testing.assert_array_equal(arrays["old_logp"][:, 0], [-float(k) for k, _ in picks for _ in range(G)])
  kept_rows = (B - fillers) * G
  assert (arrays["mask"][:kept_rows] == 1).all() and (arrays["mask"][kept_rows:] == 0).all()
  want_values = np.stack([values[k][b] for k, b in picks])
  np.testing.assert_array_equal(rewards.values[:B - fillers], want_values[:B - fillers])
  assert np.isnan(rewards.values[B - fillers:]).all()
  assert m["time/sample"] == calls and m["sampled_tokens"] == 10 * calls and m["reward/mean"] == 0.0


def test_disabled_is_one_plain_rollout():
  fake = _FakeRollouts([_random_values(np.random.default_rng(0))])
  sampler = dynamic_sampling.DynamicSampler(dynamic_sampling.DynamicSampling(False, 3), weights=WEIGHTS,
                                            group_size=G, pad_id=0)
  arrays, rewards, m = sampler.collect(fake, jax.random.key(0), step=0)
  assert len(fake.keys) == 1 and not any(k.startswith("dynamic_sampling/") for k in m)
  np.testing.assert_array_equal(rewards.values, fake.values[0])
  assert (arrays["mask"] == 1).all()


@pytest.mark.parametrize("name,scale", [("grpo", "group"), ("grpo", "batch"), ("gdpo", "group")])
def test_masked_fillers_add_nothing_to_loss_or_gradient(name, scale):
  """The batch with fillers gives the loss and gradient (policy gradient and KL term) of its kept groups alone."""
  rng = np.random.default_rng(1)
  values = rng.integers(0, 3, (B, G, 2)).astype(np.float32)
  values[0, :, :] = 1.0                                          # one constant group among the kept ones
  rows = B * G
  arrays = {"tokens": np.zeros((rows, 2 + T), np.int32), "attn_mask": np.ones((rows, 2 + T), np.int32),
            "mask": (np.arange(T)[None] < rng.integers(1, T + 1, (rows, 1))).astype(np.float32),
            "old_logp": rng.normal(size=(rows, T)).astype(np.float32) - 1.0}
  picks = [(0, b) for b in range(B - 2)] + [(0, B - 2), (0, B - 1)]   # the last two as fillers
  full, full_values = dynamic_sampling.assemble([(arrays, values)], picks, 2, group_size=G, pad_id=0)
  settings = Settings(loss_kwargs={}, options={"advantage": dict(scale=scale, eps=1e-4, ddof=1, estimator="grpo",
                                                                 win_rate=False)},
                      num_generations=G, max_new_tokens=T)
  batcher = rl_algos.ALGORITHMS[name].batcher(settings)
  kept_rows = (B - 2) * G
  with_fillers, _ = batcher.build(full, full_values, WEIGHTS, 0)
  alone, _ = batcher.build({k: v[:kept_rows] for k, v in full.items()}, full_values[:B - 2], WEIGHTS, 0)
  np.testing.assert_array_equal(with_fillers["adv"][kept_rows:], 0.0)
  np.testing.assert_allclose(with_fillers["adv"][:kept_rows], alone["adv"], rtol=1e-6)

  ref = rng.normal(size=(rows, T)).astype(np.float32) - 1.0
  logp = jnp.asarray(rng.normal(size=(rows, T)).astype(np.float32) - 1.0)

  def loss(lp, batch, n):
    b = {k: jnp.asarray(v[:n]) for k, v in batch.items()}
    b["ref_logp"] = jnp.asarray(ref[:n])
    b["num_tokens"] = jnp.maximum(b["mask"].sum(), 1.0)
    b["num_seqs"] = jnp.maximum((b["mask"].sum(-1) > 0).sum(), 1).astype(jnp.float32)
    objective = functools.partial(rl_algos.policy_gradient_objective, kl_coef=0.1, agg="token_mean")
    return objective(lp[:n], b)[0]

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
  v_full, g_full = grad(logp, with_fillers, rows)
  v_alone, g_alone = grad(logp, alone, kept_rows)
  np.testing.assert_allclose(v_full, v_alone, rtol=1e-6)
  np.testing.assert_allclose(g_full, g_alone, rtol=1e-6, atol=1e-9)
  assert float(jnp.abs(g_full[kept_rows:]).max()) == 0.0 and float(jnp.abs(g_full[:kept_rows]).max()) > 0
