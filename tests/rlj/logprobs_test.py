"""Tests for rlj.logprobs: chunked and vocab-parallel paths against a numpy log-softmax reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlj import logprobs, sharding

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

N, T, V = 4, 8, 40


def _reference(logits, targets, temperature):
  """Slow float64 numpy reference: log_softmax(logits / temperature)[target], entropy."""
  z = np.asarray(logits, np.float64) / temperature
  logp = np.zeros(targets.shape)
  ent = np.zeros(targets.shape)
  for n in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      row = z[n, t] - z[n, t].max()
      ls = row - np.log(np.exp(row).sum())
      logp[n, t] = ls[targets[n, t]]
      ent[n, t] = -(np.exp(ls) * ls).sum()
  return logp, ent


def _data(v=V, seed=0):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.normal(size=(N, T, v))).astype(np.float32)
  targets = rng.integers(0, v, size=(N, T)).astype(np.int32)
  return logits, targets


@functools.partial(jax.jit, static_argnames=("temperature", "chunk_size"))
def _logp_ent(logits, targets, temperature, chunk_size):
  return logprobs.token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 3, 4, 8])
def test_dense_and_chunked_match_reference(temperature, chunk_size):
  logits, targets = _data()
  logp, ent = _logp_ent(logits, targets, temperature, chunk_size)
  ref_logp, ref_ent = _reference(logits, targets, temperature)
  assert logp.dtype == jnp.float32 and logp.shape == (N, T)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_are_computed_in_float32():
  logits, targets = _data()
  lb = jnp.asarray(logits, jnp.bfloat16)
  logp = logprobs.token_logprobs(lb, targets, temperature=1.0, chunk_size=3)
  ref, _ = _reference(np.asarray(lb.astype(jnp.float32)), targets, 1.0)
  assert logp.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref, rtol=1e-5, atol=1e-5)


def test_callable_logits_chunked_over_time():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(N, T, 6)).astype(np.float32)
  w = rng.normal(size=(6, V)).astype(np.float32)
  _, targets = _data()
  fn = lambda h: jnp.einsum("ncd,dv->ncv", h, w)
  logp = jax.jit(lambda f, y: logprobs.token_logprobs(fn, y, temperature=0.7, chunk_size=3, inputs=f))(
      feats, targets)
  ref, _ = _reference(np.einsum("ntd,dv->ntv", feats, w), targets, 0.7)
  np.testing.assert_allclose(logp, ref, rtol=1e-5, atol=1e-5)


def test_temperature_divides_logits_not_logprobs():
  logits, targets = _data()
  logp = logprobs.token_logprobs(logits, targets, temperature=2.0)
  right = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / 2.0)), targets[..., None], -1)[..., 0]
  wrong = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0] / 2.0
  np.testing.assert_allclose(logp, right, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(logp) - wrong).max() > 0.1
  for bad in (0.0, -1.0, None):
    with pytest.raises(ValueError, match="temperature"):
      logprobs.token_logprobs(logits, targets, temperature=bad)


def test_chunked_gradient_equals_dense_gradient():
  logits, targets = _data()
  w = np.random.default_rng(2).normal(size=(N, T)).astype(np.float32)
  def obj(lg, chunk):
    return jnp.sum(w * logprobs.token_logprobs(lg, targets, temperature=0.7, chunk_size=chunk))
  g_dense = jax.grad(obj)(logits, None)
  g_chunk = jax.jit(jax.grad(obj), static_argnums=1)(logits, 3)
  # d/dz of log_softmax(z/temp)[y] = (onehot(y) - softmax(z/temp)) / temp.
  z = logits / 0.7
  sm = np.exp(z - z.max(-1, keepdims=True))
  sm /= sm.sum(-1, keepdims=True)
  manual = w[..., None] * (np.eye(V)[targets] - sm) / 0.7
  np.testing.assert_allclose(g_dense, manual, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_chunk, manual, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Vocab-parallel on the 8-device mesh.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_vocab_parallel_equals_dense(tp):
  mesh = sharding.make_mesh([("data", -1), ("tensor", tp)])
  logits, targets = _data(v=64, seed=3)
  lg = jax.device_put(logits, NamedSharding(mesh, P(None, None, "tensor")))
  fn = jax.jit(lambda l, y: logprobs.vocab_parallel_token_logprobs(l, y, temperature=0.7, mesh=mesh))
  logp = fn(lg, targets)
  ref, _ = _reference(logits, targets, 0.7)
  np.testing.assert_allclose(logp, ref, rtol=1e-5, atol=1e-5)
  # Gradients through pmax / psum match the dense path.
  w = np.random.default_rng(4).normal(size=(N, T)).astype(np.float32)
  g_vp = jax.jit(jax.grad(lambda l: jnp.sum(w * logprobs.vocab_parallel_token_logprobs(
      l, targets, temperature=0.7, mesh=mesh))))(lg)
  g_dense = jax.grad(lambda l: jnp.sum(w * logprobs.token_logprobs(l, targets, temperature=0.7)))(logits)
  np.testing.assert_allclose(g_vp, g_dense, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_uses_less_temp_memory_than_dense_at_32k():
  mesh = sharding.make_mesh([("data", -1), ("tensor", 4)])
  n, t, v = 2, 8, 32768
  lg = jax.ShapeDtypeStruct((n, t, v), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "tensor")))
  tg = jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=NamedSharding(mesh, P()))

  def dense(l, y):                                                   # the naive path
    return jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), y[..., None], axis=-1)[..., 0]

  def vp(l, y):
    return logprobs.vocab_parallel_token_logprobs(l, y, temperature=1.0, mesh=mesh)

  dense_c = jax.jit(dense).lower(lg, tg).compile()
  vp_c = jax.jit(vp).lower(lg, tg).compile()
  dense_temp = dense_c.memory_analysis().temp_size_in_bytes
  vp_temp = vp_c.memory_analysis().temp_size_in_bytes
  assert vp_temp < dense_temp, (vp_temp, dense_temp)
  assert "all-gather" not in vp_c.as_text()


def test_vocab_parallel_rejects_indivisible_vocab():
  mesh = sharding.make_mesh([("data", -1), ("tensor", 8)])
  logits, targets = _data(v=36)
  with pytest.raises(ValueError, match="divisible"):
    logprobs.vocab_parallel_token_logprobs(logits, targets, temperature=1.0, mesh=mesh)


# ------------------------------------------------------------------------------------------------------------
# completion_logprobs: the shift convention with a bigram "model".
# ------------------------------------------------------------------------------------------------------------


def test_completion_logprobs_shift_convention():
  """logits at slot s depend only on tokens[s], so logp[:, t] must use logits of slot P - 1 + t."""
  rng = np.random.default_rng(5)
  table = rng.normal(size=(V, V)).astype(np.float32)

  def apply_fn(variables, tokens, positions, attn_mask):
    assert positions.shape == tokens.shape == attn_mask.shape
    return variables["params"]["table"][tokens], None

  prompt_len, tlen = 5, 3
  tokens = rng.integers(1, V, size=(2, prompt_len + tlen)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0                                                    # left padding in row 0
  logp = logprobs.completion_logprobs(apply_fn, {"table": table}, tokens, mask, prompt_len, temperature=0.7)
  expected = np.zeros((2, tlen))
  for n in range(2):
    for t in range(tlen):
      z = table[tokens[n, prompt_len - 1 + t]] / 0.7
      expected[n, t] = z[tokens[n, prompt_len + t]] - np.log(np.exp(z - z.max()).sum()) - z.max()
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logprobs.positions_from_mask(jnp.asarray(mask))[0], [0, 0, 0, 1, 2, 3, 4, 5])


def test_completion_logprobs_invariant_to_left_padding():
  """ALGORITHMS.md §1.5: left-padding a prompt by 0 or 7 tokens leaves the completion log-probs unchanged."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from models import presets  # pylint: disable=g-import-not-at-top
  from models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  model = Transformer(presets.get("tiny"))
  d = jnp.zeros((1, 4), jnp.int32)
  params = jax.jit(lambda r: nn.unbox(model.init(r, d, d, d + 1)["params"]))(jax.random.key(0))
  rng = np.random.default_rng(6)
  prompt, completion = rng.integers(1, 128, size=(2, 3)), rng.integers(1, 128, size=(2, 5))
  score = jax.jit(functools.partial(logprobs.completion_logprobs, model.apply, temperature=0.7),
                  static_argnums=(3,), static_argnames=("logits_window",))
  out = []
  for pad in (0, 7):
    tokens = np.concatenate([np.zeros((2, pad), np.int64), prompt, completion], axis=1).astype(np.int32)
    mask = (np.arange(tokens.shape[1]) >= pad).astype(np.int32)[None].repeat(2, 0)
    out.append(score(params, tokens, mask, pad + 3))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
  assert out[0].shape == (2, 5)
  # The model projecting only the completion's predicting positions gives the same log-probs.
  windowed = score(params, tokens, mask, pad + 3, logits_window=True)
  np.testing.assert_allclose(windowed, out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,num_chunks", [(8, 4), (6, 4), (5, 4)])
def test_rollout_logp_in_row_chunks_equals_one_pass(rows, num_chunks):
  """logprobs.make_logp_fn(num_chunks=...): chunks of gcd(N, num_chunks) rows, one after another, give the
  one-pass log-probs; also with the rows sharded over 8 devices. (6 rows: 2 chunks; 5 rows: one pass.)"""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from models import presets  # pylint: disable=g-import-not-at-top
  from models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  model = Transformer(presets.get("tiny"))
  rng = np.random.default_rng(4)
  tokens = rng.integers(1, 128, size=(rows, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  params = nn.unbox(model.init(jax.random.key(0), tokens[:1], tokens[:1], mask[:1])["params"])
  make = functools.partial(logprobs.make_logp_fn, model.apply, completion_len=4, temperature=0.7)
  one = jax.jit(make())(params, tokens, mask)
  top = jax.make_jaxpr(make(num_chunks=num_chunks))(params, tokens, mask).jaxpr.eqns
  k = int(np.gcd(rows, num_chunks))
  chunk_scans = [e for e in top if e.primitive.name == "scan" and any(
      getattr(v.aval, "shape", None) == (k, rows // k, 9) for v in e.invars)]   # lax.map over token chunks
  assert len(chunk_scans) == (k > 1)
  chunked = jax.jit(make(num_chunks=num_chunks))
  np.testing.assert_allclose(chunked(params, tokens, mask), one, rtol=1e-6, atol=1e-6)
  if rows % 8 == 0:
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    sharded = jax.jit(make(mesh=mesh, rules=sharding.DEFAULT_RULES, num_chunks=num_chunks))
    placed = jax.device_put((tokens, mask), NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
      out = sharded(params, *placed)
    np.testing.assert_allclose(out, one, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_chunks"):
    make(num_chunks=0)


@pytest.mark.parametrize("logits_chunk", [3])
def test_logits_chunk_equals_one_projection_values_and_grads(logits_chunk):
  """make_logp_fn(logits_chunk=C): the completion's logits projected C tokens at a time in a rematerialised scan
  (C need not divide T) give the log-probs and parameter gradients of the one-projection pass; the program
  holds no [N, T, V] logits (the widest logits value in its jaxpr is [N, C, V]); also over 8 devices."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from models import presets  # pylint: disable=g-import-not-at-top
  from models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  config = presets.get("tiny")
  model = Transformer(config)
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, 128, size=(8, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[2, :4] = 0
  params = nn.unbox(model.init(jax.random.key(0), tokens[:1], tokens[:1], mask[:1])["params"])
  make = functools.partial(logprobs.make_logp_fn, model.apply, completion_len=7, temperature=0.8)

  def loss_and_grads(fn):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(fn(p, tokens, mask) * mask[:, 5:]), has_aux=False))(params)

  l0, g0 = loss_and_grads(make())
  l1, g1 = loss_and_grads(make(logits_chunk=logits_chunk))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)   # summation order
  np.testing.assert_allclose(jax.jit(make(logits_chunk=logits_chunk))(params, tokens, mask),
                             jax.jit(make())(params, tokens, mask), rtol=1e-6, atol=1e-6)

  def widest_logits(fn):
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(fn(p, tokens, mask))))(params)
    seen = []
    def walk(j):
      for e in j.eqns:
        seen.extend(v.aval.shape for v in e.outvars if getattr(v.aval, "shape", ())[-1:] == (config.vocab_size,))
        for p in e.params.values():
          if hasattr(p, "jaxpr"):
            walk(p.jaxpr)
          elif hasattr(p, "eqns"):
            walk(p)
    walk(jaxpr.jaxpr)
    return max(int(np.prod(s[:-1])) for s in seen if len(s) == 3)
  c = min(logits_chunk, 7)
  assert widest_logits(make(logits_chunk=logits_chunk)) == 8 * c
  assert widest_logits(make()) == 8 * 7
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  sharded = jax.jit(make(mesh=mesh, rules=sharding.DEFAULT_RULES, logits_chunk=logits_chunk))
  placed = jax.device_put((tokens, mask), NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(sharded(params, *placed), jax.jit(make())(params, tokens, mask), rtol=1e-5, atol=1e-6)
