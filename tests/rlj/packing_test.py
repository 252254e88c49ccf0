"""Sequence packing: the host layout against a per-row loop, and packed log-probs, losses and gradients against the
unpacked ones (1 device, micro-batches, row chunks, logits chunks, an 8-device mesh, a sliding-window model)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import presets
from models.transformer import Transformer
from rlj import host_data, logprobs, packing, programs, rl_algos, sharding, train_state
from rlj import train_step as ts

pytestmark = pytest.mark.usefixtures("fast_compile")

P, T, N, V = 6, 10, 16, 128
MODEL = Transformer(presets.get("tiny"))
# Sliding layers narrower than a row: packed slots differ from unpacked ones by a per-segment constant only.
SLIDING = Transformer(dataclasses.replace(presets.get("tiny"), sliding_window=4, layer_types=("sliding", "full")))


def _init(model):
  dummy = jnp.zeros((1, P + T), jnp.int32)
  return jax.jit(model.init)(jax.random.key(0), dummy, dummy, jnp.ones_like(dummy))["params"]


@pytest.fixture(scope="module")
def params():
  return _init(MODEL)


def _rollout(seed=0, n=N):
  """Left-padded prompts of 1..P tokens, completions of 0..T trained tokens, post-stop padding, pad id 0."""
  rng = np.random.default_rng(seed)
  p_len = rng.integers(1, P + 1, n)
  c_len = rng.integers(0, T + 1, n)
  c_len[1] = 0                                              # a row with nothing to train takes no space
  c_len[2] = T
  cols = np.arange(P + T)[None]
  attn = ((cols >= P - p_len[:, None]) & (cols < P + c_len[:, None])).astype(np.int32)
  tokens = np.where(attn > 0, rng.integers(1, V, (n, P + T)), 0).astype(np.int32)
  mask = (np.arange(T)[None] < c_len[:, None]).astype(np.float32)
  return tokens, attn, mask


def test_layout_against_a_per_row_loop():
  """Every row's kept tokens form one contiguous segment with positions 0, 1, ... in its group's bins; each
  trained token is listed once in its group's list, with the packed position before it and itself as target;
  bins never overflow; kb and the list's length m share one bucket j."""
  tokens, attn, mask = _rollout(1)
  groups = 2
  out = packing.pack(tokens, attn, mask, groups=groups, pad_id=0)
  k, s = out["pack_tokens"].shape
  kb, r, mt = k // groups, N // groups, out["pack_index"].shape[0] // groups
  j = [j for j in range(1, 9) if max(1, -(-r * j // 8)) == kb]
  assert k % groups == 0 and j and mt == max(1, -(-r * T * j[0] // 8))
  assert out["pack_targets"].shape == (groups * mt,) and out["pack_slot"].shape == (N, T)
  for g in range(groups):
    listed = mask[g * r:(g + 1) * r].sum()
    assert listed <= mt and not out["pack_index"][g * mt + int(listed):(g + 1) * mt].any()
  for n in range(N):
    g = n // r
    bins = out["pack_tokens"][g * kb:(g + 1) * kb].reshape(-1)
    segs = out["pack_segments"][g * kb:(g + 1) * kb].reshape(-1)
    pos = out["pack_positions"][g * kb:(g + 1) * kb].reshape(-1)
    trained = np.flatnonzero(mask[n])
    if not trained.size:
      continue
    index = {t: out["pack_index"][g * mt + out["pack_slot"][n, t]] for t in trained}
    assert len({out["pack_slot"][n, t] for t in trained}) == len(trained)
    last_col = P + trained[-1] - 1                          # the column predicting the last trained token
    want = [tokens[n, c] for c in range(last_col + 1) if attn[n, c]]
    start = index[trained[0]] - (P + trained[0] - 1 - (P - attn[n, :P].sum()))
    seg = np.arange(start, start + len(want))
    assert seg[-1] // s == seg[0] // s                      # within one bin
    np.testing.assert_array_equal(bins[seg], want)
    np.testing.assert_array_equal(pos[seg], np.arange(len(want)))
    assert len(set(segs[seg])) == 1 and segs[seg][0] > 0
    for t in trained:
      assert out["pack_targets"][g * mt + out["pack_slot"][n, t]] == tokens[n, P + t]
      assert bins[index[t] + 1] == tokens[n, P + t] or index[t] + 1 == seg[-1] + 1
  assert 0 < packing.fill(out) <= 1
  # The last trained token is a target only: never packed.
  assert (out["pack_segments"] > 0).sum() == sum(
      sum(attn[n, :P + np.flatnonzero(mask[n])[-1]]) for n in range(N) if mask[n].any())


def test_bad_rows_and_bins_are_refused():
  tokens, attn, mask = _rollout(2)
  attn[4, P - 1] = 0                                        # a trained token after a padding column
  mask[4, 0] = 1
  with pytest.raises(ValueError, match="row 4"):
    packing.pack(tokens, attn, mask)
  with pytest.raises(ValueError, match="packing groups"):
    packing.pack(*_rollout(2), groups=3)
  with pytest.raises(ValueError, match="cannot hold"):
    packing.pack(*_rollout(2), bins=1)


def test_packed_logprobs_equal_unpacked():
  """Chunked rows and chunked logits, packed in the chunks' groups: the same log-probs on every trained token
  (a model of a sliding and a full layer)."""
  model = SLIDING
  params = _init(model)
  tokens, attn, mask = _rollout(3)
  for chunks, logits_chunk in ((1, 0), (4, 3)):
    fn = jax.jit(logprobs.make_logp_fn(model.apply, completion_len=T, temperature=0.7, num_chunks=chunks,
                                       logits_chunk=logits_chunk))
    want = np.asarray(fn(params, tokens, attn))
    packed = packing.pack(tokens, attn, mask, groups=logprobs.chunk_count(N, chunks))
    got = np.asarray(fn(params, tokens, attn, packed))
    np.testing.assert_allclose(got * mask, want * mask, rtol=2e-5, atol=2e-5)


def _loss_and_grads(params, batch, *, mesh=None, micro=1):
  objective = functools.partial(rl_algos.policy_gradient_objective, agg="token_mean", max_len=T, clip_eps=0.2)
  logp_fn = logprobs.make_logp_fn(MODEL.apply, completion_len=T, temperature=1.0, mesh=mesh)
  f = jax.jit(functools.partial(ts.loss_and_grads, logp_fn=logp_fn, objective=objective, num_microbatches=micro))
  loss, _, grads = f(params, batch)
  return float(loss), grads


def _batch(seed):
  tokens, attn, mask = _rollout(seed)
  rng = np.random.default_rng(seed)
  return {"tokens": tokens, "attn_mask": attn, "mask": mask, "adv": rng.normal(size=N).astype(np.float32),
          "old_logp": rng.normal(-4.8, 0.3, (N, T)).astype(np.float32),
          "num_tokens": np.float32(mask.sum()), "num_seqs": np.float32((mask.sum(-1) > 0).sum())}


def test_packed_loss_and_gradients_equal_unpacked(params):
  batch = _batch(4)
  for micro in (1,):   # two micro-batches: the 8-device test below
    want, g_want = _loss_and_grads(params, batch, micro=micro)
    packed = packing.packed_batch(batch, chunks=micro, mesh=None, rules=None, pad_id=0)
    got, g_got = _loss_and_grads(params, packed, micro=micro)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g_got, g_want)


def test_packed_train_step_on_8_devices_equals_1_device(params):
  """The jitted step on a (data 2, fsdp 2, tensor 2) mesh, packed per batch shard (the gather under shard_map),
  gives the 1-device unpacked loss and new parameters."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  batch = _batch(5)
  tx = optax.sgd(0.1)
  objective = functools.partial(rl_algos.policy_gradient_objective, agg="token_mean", max_len=T, clip_eps=0.2)
  want, g_want = _loss_and_grads(params, batch)
  packed = packing.packed_batch(batch, chunks=2, mesh=mesh, rules=sharding.DEFAULT_RULES, pad_id=0)
  assert packed["pack_tokens"].shape[0] % 8 == 0               # 2 micro-batches x 4 batch shards x kb bins
  expected = jax.tree.map(lambda p, g: np.asarray(p - 0.1 * g), params, g_want)
  state = train_state.TrainState.create(jax.tree.map(jnp.copy, params), tx)
  replicated = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, jax.P()), state)
  step = programs.train_step(MODEL, tx, objective=objective, mesh=mesh, rules=sharding.DEFAULT_RULES,
                             state_shardings=replicated, completion_len=T, num_microbatches=2)
  with jax.set_mesh(mesh):
    new, m = step(jax.device_put(state, replicated), host_data.from_host(packed, mesh, sharding.DEFAULT_RULES),
                  jax.random.key(0))
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               new.params, expected)


def test_packed_rows_through_the_splash_kernel():
  """The splash kernel (Pallas interpret mode, 1-device mesh) reads the packed rows' segment ids: the sliding
  model's packed log-probs equal its unpacked einsum ones."""
  from models import attention_kernels  # pylint: disable=g-import-not-at-top
  params = _init(SLIDING)
  tokens, attn, mask = _rollout(6)
  want = np.asarray(jax.jit(logprobs.make_logp_fn(SLIDING.apply, completion_len=T, temperature=1.0))(
      params, tokens, attn))
  splash = Transformer(dataclasses.replace(SLIDING.config, attention="splash"))
  packed = packing.pack(tokens, attn, mask)
  one = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])
  with attention_kernels.pallas_interpret(), jax.set_mesh(one):
    got = np.asarray(jax.jit(logprobs.make_logp_fn(splash.apply, completion_len=T, temperature=1.0))(
        params, tokens, attn, packed))
  np.testing.assert_allclose(got * mask, want * mask, atol=2e-5)
