"""Checkpointer: restore onto another mesh, fallback past a corrupted newest step, no NaN checkpoints, save policy."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlj import checkpoint, sharding

RULES = sharding.DEFAULT_RULES


def _state(mesh, scale=1.0):
  """A small sharded pytree: a [16, 8] matrix over (fsdp, tensor), a [16] vector, an int step."""
  w = (np.arange(128, dtype=np.float32).reshape(16, 8) / 7.0 - 3.0) * scale
  b = np.linspace(-1.0, 1.0, 16).astype(np.float32) * scale
  return {
      "w": jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), "tensor"))),
      "b": jax.device_put(b, jax.sharding.NamedSharding(mesh, jax.P("fsdp"))),
      "step": jax.device_put(np.int32(3), jax.sharding.NamedSharding(mesh, jax.P())),
  }


def _abstract(mesh):
  return {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P("data"))),
          "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P())),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, jax.P()))}


def test_restore_onto_another_mesh_shape_is_exact(tmp_path):
  mesh_a = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  mesh_b = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  saved = _state(mesh_a)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  ckpt.save(5, saved, {"step": 5})
  ckpt.close()
  step, restored, meta = checkpoint.Checkpointer(str(tmp_path / "ck")).restore_latest(_abstract(mesh_b))
  assert step == 5 and meta["step"] == 5
  for k in saved:
    assert restored[k].sharding == _abstract(mesh_b)[k].sharding
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(saved[k]))  # bitwise
  # and back onto the (2, 2, 2) layout
  _, back, _ = checkpoint.Checkpointer(str(tmp_path / "ck")).restore_latest(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved))
  for k in saved:
    assert back[k].sharding == saved[k].sharding
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(saved[k]))


def _data_files(root):
  """The array data files of an orbax (OCDBT) item: the files in its ``d/`` folders."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if os.path.basename(d) == "d"]
  assert files, root
  return files


@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove_state"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, caplog):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  directory = str(tmp_path / "ck")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  ckpt.save(2, _state(mesh, 1.0), {"step": 2})
  ckpt.save(4, _state(mesh, 2.0), {"step": 4}, host={"pool": np.arange(6)})
  ckpt.close()
  newest = os.path.join(directory, "4", "state")
  if damage == "truncate":  # e.g. a disk that filled up while writing
    for path in _data_files(newest):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif damage == "garbage":
    for path in _data_files(newest):
      size = os.path.getsize(path)
      with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(size))
  else:
    import shutil
    shutil.rmtree(newest)

  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_abstract(mesh))
  assert step == 2 and meta["step"] == 2 and "host" not in meta
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(mesh, 1.0)["w"]))
  assert any("step 4" in r.getMessage() and "failed to restore" in r.getMessage() for r in caplog.records)
  # the broken step is kept aside, not deleted, and a new save at that step works
  assert ckpt.all_steps() == [2]
  assert os.listdir(directory + ".corrupt")[0].startswith("4-")
  ckpt.save(4, _state(mesh, 3.0), {"step": 4})
  ckpt.close()
  step, state, _ = checkpoint.Checkpointer(directory).restore_latest(_abstract(mesh))
  assert step == 4
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(mesh, 3.0)["w"]))


def _tree_bytes(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def test_another_structure_is_a_mismatch_not_corruption(tmp_path):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  directory = str(tmp_path / "ck")
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(2, _state(mesh), {"step": 2})
  ckpt.close()
  before = _tree_bytes(str(tmp_path))
  wider = dict(_abstract(mesh), w=jax.ShapeDtypeStruct((16, 9), jnp.float32))   # e.g. a changed model width
  extra = dict(_abstract(mesh), ref=jax.ShapeDtypeStruct((4,), jnp.float32))      # e.g. a reference added
  for abstract, words in ((wider, "w: saved (16, 8), this job (16, 9)"), (extra, "ref: not saved")):
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"step 2 .*" + words.replace("(", r"\(")
                       .replace(")", r"\)")):
      checkpoint.Checkpointer(directory).restore_latest(abstract)
  assert _tree_bytes(str(tmp_path)) == before   # nothing moved aside, nothing deleted
  assert checkpoint.Checkpointer(directory).restore_latest(_abstract(mesh))[0] == 2


def test_host_state_round_trip_and_pruning(tmp_path):
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  directory = str(tmp_path / "ck")
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(mesh), {"step": step}, host={"rows": np.full((step, 2), step, np.int32)})
  ckpt.wait()
  ckpt.save(4, _state(mesh), {"step": 4}, host={"rows": np.full((4, 2), 4, np.int32)})
  ckpt.close()
  assert sorted(os.listdir(directory + ".host")) == ["3", "4"]  # follows keep-N
  ckpt = checkpoint.Checkpointer(directory)
  _, meta = ckpt.restore(3, _abstract(mesh))
  np.testing.assert_array_equal(meta["host"]["rows"], np.full((3, 2), 3, np.int32))


def test_refuses_to_write_non_finite_state(tmp_path):
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  state = _state(mesh)
  state["b"] = state["b"].at[3].set(jnp.nan)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  with pytest.raises(checkpoint.NonFiniteCheckpointError, match="step 7"):
    ckpt.save(7, state, {})
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path / "ck")).all_steps() == []


def test_save_policy_by_steps_and_minutes(tmp_path, monkeypatch):
  clock = {"t": 1000.0}
  monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock["t"])
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), every_steps=5, every_minutes=2.0)
  assert [s for s in range(1, 11) if ckpt.due(s)] == [5, 10]
  clock["t"] += 119.0
  assert not ckpt.due(3)
  clock["t"] += 1.0
  assert ckpt.due(3)  # two minutes since start-up
  ckpt.save(3, _state(sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])), {})
  assert not ckpt.due(4)  # the clock restarts at each save
  clock["t"] += 120.0
  assert ckpt.due(4)
  never = checkpoint.Checkpointer(str(tmp_path / "ck2"))
  clock["t"] += 1e6
  assert not any(never.due(s) for s in range(1, 20))
  ckpt.close()
  never.close()
