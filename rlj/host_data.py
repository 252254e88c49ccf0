"""Host <-> device data movement that works the same with one process and with many (multi-controller JAX).

In a multi-host job every process runs the same program, but each one holds only some of the data on its
host and addresses only its own devices, so ``jax.device_put(np_array)`` and ``np.asarray(global_array)``
no longer mean "the whole batch". The functions here name the direction explicitly:

* ``to_global``: this process's rows -> a global array whose leading (batch) dim is split over the batch
  mesh axes; the global row count is the local one times the process count
  (``jax.make_array_from_process_local_data``). Process ``p``'s rows land on the devices it addresses.
* ``from_host``: an array every process holds in full -> a global array (``jax.make_array_from_callback``;
  each process supplies the slices its devices need).
* ``to_local``: a row-sharded global array -> numpy of this process's rows.
* ``gather`` / ``gather_rows``: the whole value on every process (``process_allgather``); ``gather_rows``
  takes each process's rows and concatenates them in the global row order ``to_global`` uses.
* ``fetch``: replicated values (metrics, counters) -> numpy, reading one local replica.
* ``allgather_json``: one JSON-serialisable value per process (e.g. data-iterator states for a checkpoint).

With one process all of them reduce to ``device_put`` / ``np.asarray``.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlj import sharding


def multiprocess() -> bool:
  return jax.process_count() > 1


def _row_sharding(mesh, ndim: int, rows: int, rules) -> jax.sharding.NamedSharding:
  """Leading dim over the batch axes when it divides; replicated otherwise (and for scalars)."""
  if ndim and rows % sharding.data_parallel_size(mesh, rules) == 0:
    return sharding.batch_sharding(mesh, ndim, rules)
  return jax.sharding.NamedSharding(mesh, jax.P())


def to_global(batch: Mapping[str, Any], mesh, rules=sharding.DEFAULT_RULES) -> dict:
  """This process's rows -> global arrays with the leading dim over the batch axes.

  Args:
    batch: dict of host arrays, each ``[B_local, ...]``; 0-d values are replicated and must be equal on
      every process.
    mesh, rules: the device mesh and logical-axis rules ("batch" names the batch mesh axes).

  Returns:
    Dict of global ``jax.Array`` with leading dim ``B_local * process_count``.

  Raises:
    ValueError: when the global row count does not divide over the batch axes (with several processes
      rows cannot be replicated: each process holds different ones).
  """
  n, dp = jax.process_count(), sharding.data_parallel_size(mesh, rules)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = jax.make_array_from_callback((), jax.sharding.NamedSharding(mesh, jax.P()), lambda _, v=v: v)
      continue
    rows = v.shape[0] * n
    if n == 1 and rows % dp:
      out[k] = jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.P()))
      continue
    if rows % dp:
      raise ValueError(f"{k}: {rows} global rows ({v.shape[0]} per process x {n} processes) do not split "
                       f"over the {dp}-way batch axes")
    out[k] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim, rules), v,
                                                    (rows,) + v.shape[1:])
  return out


def from_host(batch: Mapping[str, Any], mesh, rules=sharding.DEFAULT_RULES) -> dict:
  """Arrays every process holds in full -> global arrays (leading dim over the batch axes when it divides)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = _row_sharding(mesh, v.ndim, v.shape[0] if v.ndim else 0, rules)
    out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


def to_local(x) -> np.ndarray:
  """This process's rows of a global array (the whole array when this process addresses all of it).

  The rows are those of the devices this process addresses, in global order; other dims are whole.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shape = x.shape
  blocks: dict[tuple[int, int], np.ndarray] = {}
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    start, stop, _ = rows.indices(shape[0])
    if (start, stop) not in blocks:
      blocks[(start, stop)] = np.empty((stop - start,) + shape[1:], x.dtype)
    blocks[(start, stop)][(slice(None),) + tuple(shard.index[1:])] = np.asarray(shard.data)
  return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)


def gather(x) -> np.ndarray:
  """The whole value of a (possibly multi-process) global array, on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local, mesh, rules=sharding.DEFAULT_RULES) -> np.ndarray:
  """Each process's rows -> the whole array on every process, in the row order of ``to_global``."""
  local = np.asarray(local)
  if not multiprocess():
    return local
  return gather(to_global({"x": local}, mesh, rules)["x"])


def fetch(tree: Any) -> Any:
  """Replicated (or fully addressable) arrays -> numpy, without any cross-process traffic."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"fetch reads replicated values; got an array sharded as {x.sharding}")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def process_sum(value: float) -> float:
  """Sum of a host scalar over all processes (the value itself with one process)."""
  if not multiprocess():
    return float(value)
  return float(np.sum(multihost_utils.process_allgather(np.float64(value))))


def process_max(value: int) -> int:
  """Largest of a host integer over all processes (the value itself with one process)."""
  if not multiprocess():
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def allgather_json(value: Any) -> list:
  """One JSON-serialisable ``value`` per process -> the list of all of them, in process order."""
  if not multiprocess():
    return [value]
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(raw.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(every, sizes)]


def own_entry(saved: Any) -> Any:
  """This process's entry of a value written by ``allgather_json`` (a bare value is every process's)."""
  if isinstance(saved, list):
    if len(saved) != jax.process_count():
      raise ValueError(f"saved per-process values for {len(saved)} processes; this job has "
                       f"{jax.process_count()}")
    return saved[jax.process_index()]
  return saved
