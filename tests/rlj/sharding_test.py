"""Tests for rlj.sharding: mesh resolution, logical rules, sharded init and weight hand-off."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlj import sharding


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape([("data", -1), ("fsdp", 2), ("tensor", 2)], 8) == (
      ("data", "fsdp", "tensor"), (2, 2, 2))
  with pytest.raises(ValueError, match="config key 'mesh'"):
    sharding.resolve_mesh_shape([("data", 3), ("tensor", 2)], 8)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.resolve_mesh_shape([("data", -1), ("tensor", 3)], 8)


def test_make_mesh_axis_types_are_auto():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_drop_missing_and_size_one_axes():
  mesh = sharding.make_mesh([("data", -1)])
  assert sharding.logical_to_spec(("batch", "embed"), mesh) == P("data", None)
  mesh3 = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert sharding.logical_to_spec(("batch", None), mesh3) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("embed", "mlp"), mesh3) == P("fsdp", "tensor")
  assert sharding.data_parallel_size(mesh3) == 4


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (4, 6))
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads",)), (3,))
    return x @ w, b


def test_sharded_init_and_sync_weights_round_trip():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  model = _Tiny()
  params, shard = sharding.sharded_init(lambda k: model.init(k, jnp.ones((1, 4))), mesh,
                                        sharding.DEFAULT_RULES, jax.random.key(0))
  w = params["params"]["w"]
  assert w.sharding.spec == P("fsdp", "tensor")
  # 3 KV heads do not divide tensor=2: the fitted spec replicates that dimension instead of failing.
  assert params["params"]["b"].sharding.spec == P(None)
  dest = jax.tree.map(lambda s: jax.sharding.NamedSharding(sharding.make_mesh([("data", -1)]), P()), shard)
  synced = sharding.sync_weights(params, dest, dtype=jnp.bfloat16)
  assert synced["params"]["w"].dtype == jnp.bfloat16
  assert synced["params"]["w"].sharding.spec == P()
  back = sharding.sync_weights(synced, shard, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(back["params"]["w"]), np.asarray(w), rtol=1e-2)
  assert back["params"]["w"].sharding.spec == P("fsdp", "tensor")
