"""Mesh construction, logical-axis rules and weight hand-off between roles.

Models name the axes of every parameter (``("embed", "mlp")``); configs map those names to mesh axes with a
short rules list; this module turns names into ``NamedSharding``s once, at the edge. Losses never see a mesh.

The mesh is pjit-style: every axis is ``AxisType.Auto`` so the compiler propagates shardings through code that
does not name them (``jax.make_mesh`` defaults to Explicit axes, which rejects some of that code).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MeshSpec = Sequence[tuple[str, int]]
Rules = Sequence[tuple[str, Any]]

# Logical name -> mesh axes. Batch is split over data and fsdp, weights are fully sharded over fsdp on their
# embed dimension and split over tensor on heads / mlp / vocab (Megatron-style), and layers stay replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("quantiles", None),
)

DEFAULT_MESH: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1), ("tensor", 1))


def resolve_mesh_shape(spec: MeshSpec, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves one ``-1`` size in ``spec`` so that the sizes multiply to ``num_devices``.

  Raises:
    ValueError: naming the mesh spec when it cannot be laid on ``num_devices`` devices.
  """
  names = tuple(name for name, _ in spec)
  sizes = [int(size) for _, size in spec]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh {list(spec)}: axis names repeat")
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh {list(spec)}: at most one axis may have size -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {list(spec)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh {list(spec)}: the fixed axes ({known} devices) do not divide the "
                       f"{num_devices} available devices; change config key 'mesh'")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {list(spec)} needs {math.prod(sizes)} devices but {num_devices} are available; "
                     f"change config key 'mesh' (use -1 for the axis that takes the rest)")
  return names, tuple(sizes)


def make_mesh(spec: MeshSpec = DEFAULT_MESH, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh with Auto axes from ``[(name, size), ...]``; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = resolve_mesh_shape(spec, len(devices))
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def activation_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Context in which the models' ``nn.with_logical_constraint`` calls shard activations over ``mesh``.

  Without it those constraints are no-ops and XLA alone decides the activations' layout; with FSDP it may then
  gather the whole batch onto every device (e.g. full-batch [N, S, V] logits per chip).
  """
  return nn.logical_axis_rules(_filter_rules(rules, mesh))


def _filter_rules(rules: Rules, mesh: Mesh) -> list[tuple[str, Any]]:
  """Drops mesh axes that the mesh does not have (so one rules list serves 1-, 2- and 3-axis meshes)."""
  out = []
  for name, axes in rules:
    if axes is None:
      out.append((name, None))
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in axes_t if a in mesh.axis_names and mesh.shape[a] > 1)
    out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return out


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec over ``mesh``."""
  if names is None:
    return P()
  spec = nn.logical_to_mesh_axes(tuple(names), _filter_rules(rules, mesh))
  return P() if spec is None else spec


def named_sharding(names: Sequence[str | None] | None, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, mesh, rules))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Replicates any dimension that its mesh axes do not divide (e.g. 2 KV heads over tensor=4)."""
  parts = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, axes in zip(shape, parts):
    if axes is None:
      fitted.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes_t)
    fitted.append(axes if dim % n == 0 else None)
  return P(*fitted)


def fitted_sharding(names: Sequence[str | None] | None, shape: tuple[int, ...], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """``named_sharding`` for an array of ``shape``, replicated on any dimension its mesh axes do not divide."""
  return NamedSharding(mesh, _fit_spec(logical_to_spec(names, mesh, rules), tuple(shape), mesh))


def tree_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree, from its logical names (``nn.get_partition_spec``) and its shapes.

  ``logical_tree`` holds ``PartitionSpec``s of logical names (as flax's ``get_partition_spec`` returns) or
  ``None``; ``shapes_tree`` holds arrays or ``ShapeDtypeStruct``s with the same structure.
  """
  def one(logical, leaf):
    return fitted_sharding(tuple(logical) if logical is not None else None, leaf.shape, mesh, rules)
  return jax.tree.map(one, logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a tree of ``nn.LogicallyPartitioned`` boxes (unboxed leaves get ``P()``)."""
  return nn.get_partition_spec(boxed_tree)


def sharded_init(init_fn, mesh: Mesh, rules: Rules = DEFAULT_RULES, *args):
  """Initialises parameters directly into their shardings, so full weights never sit on one device.

  ``init_fn(*args)`` returns a tree of ``nn.LogicallyPartitioned`` boxes (a linen ``init`` result). Returns
  ``(params, shardings)`` with the boxes removed.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(logical_specs(abstract), nn.unbox(abstract), mesh, rules)
  params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def reshard(tree: Any, shardings: Any) -> Any:
  """Moves every leaf of ``tree`` to the matching sharding (a no-op where it already lives there)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def sync_weights(params: Any, shardings: Any, *, dtype: Any = None) -> Any:
  """Hands training params to another role (the sampler, the reference): cast, then reshard.

  Args:
    params: the training parameters (usually float32 in the training sharding).
    shardings: a tree of ``NamedSharding`` for the destination role (same structure as ``params``).
    dtype: destination dtype for floating leaves (e.g. ``jnp.bfloat16`` for decoding); ``None`` keeps it.

  Returns:
    A new tree; ``params`` is untouched (its buffers are not donated), so the trainer keeps training on it.
  """
  def cast(x):
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding for an array whose leading axis is the (global) batch and the rest replicated."""
  return named_sharding(("batch",) + (None,) * (ndim - 1), mesh, rules)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many ways the batch axis is split on ``mesh`` (batches must divide by it)."""
  spec = logical_to_spec(("batch",), mesh, rules)
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes_t]))
