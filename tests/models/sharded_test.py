"""The model on a (data=2, fsdp=2, tensor=2) mesh of 8 devices equals the 1-device model: logits and grads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import presets
from models.transformer import Transformer
from rlj import sharding

pytestmark = pytest.mark.usefixtures("fast_compile")   # tiny models: compile time dominates

CONFIG = presets.get("tiny")
B, S = 4, 8


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  mask[1, :2] = 0
  mask[3, :5] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def _loss(params, tokens, mask, positions):
  """Mean next-token negative log-likelihood over real tokens; also returns the logits."""
  logits, _ = Transformer(CONFIG).apply({"params": params}, tokens, positions, mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.sum(w), logits


def test_mesh_forward_and_grads_equal_single_device():
  tokens, mask, positions = _batch()
  init = lambda rng: Transformer(CONFIG).init(rng, tokens[:1], positions[:1], mask[:1])["params"]  # noqa: E731
  grad_fn = jax.value_and_grad(_loss, has_aux=True)

  one = jax.devices()[0]
  params1 = jax.device_put(jax.jit(lambda r: nn.unbox(init(r)))(jax.random.key(0)), one)
  (loss1, logits1), grads1 = jax.jit(grad_fn)(params1, *(jax.device_put(x, one) for x in (tokens, mask, positions)))

  mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  params8, shardings = sharding.sharded_init(init, mesh, sharding.DEFAULT_RULES, jax.random.key(0))
  assert params8["layers"]["attn"]["q"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
  assert params8["lm_head"].sharding.spec == jax.P("fsdp", "tensor")
  batch = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (tokens, mask, positions)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):  # activation constraints active
    step = jax.jit(grad_fn, out_shardings=((None, None), shardings))
    (loss8, logits8), grads8 = step(params8, *batch)
  assert logits8.sharding.spec == jax.P(("data", "fsdp"), None, "tensor")  # the logits constraint applied

  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params8, params1)
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
               grads8, grads1)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads1))
