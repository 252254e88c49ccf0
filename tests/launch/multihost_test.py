"""Multi-controller runs: two local processes (2 CPU devices each) form one 4-device GRPO job (and RM job).

The job is ``launch.train`` on the GRPO runlocal config (2 SFT steps, then 3 GRPO steps, checkpoint every
step), started as real processes that find each other through a coordinator on a free localhost port
(``--coordinator_address``, gloo collectives on CPU). The reference is the same config in one process with
4 devices. The pipeline's per-host batch is ``batch_prompts`` (the global batch is ``batch_prompts x
processes``), so the two-process job runs with half the per-host batch: both runs then see the same global
batches, in the same row order, on the same (data=4) mesh.

Checked: the final params (read from the orbax checkpoints) and every logged metric except timings agree,
and a two-process job resumed from its step-2 checkpoint ends where the uninterrupted one does.

Tolerances: the sampled tokens, lengths, rewards and advantages come out identical; losses and gradients
differ in the last float32 bits because the gradient all-reduce sums the four device shards in another order
(gloo between processes vs XLA's in-process all-reduce). Adam divides by sqrt(v), so on parameters whose
gradient is almost zero such rounding becomes ~1e-6 after three steps (measured max |diff| 1.8e-6), against
~8e-4 that the three RL steps move the params: params are compared with atol 1e-5, metrics with rtol 1e-4.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlj import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_PROMPTS = 16     # RL prompts per step (x 8 completions)
SFT_PROMPTS = 16
TIMEOUT_S = 480
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)
METRIC_TOL = dict(rtol=1e-4, atol=1e-6)


def _overrides(processes: int, total_steps: int) -> list[str]:
  c = {"sft.steps": 2, "sft.eval_every": 0, "sft.batch_prompts": SFT_PROMPTS // processes,
       "train.total_steps": total_steps, "train.eval_every": 0, "train.ckpt_every": 1,
       "train.batch_prompts": GLOBAL_PROMPTS // processes, "tokenizer.train_records": 200,
       "data.train_records": 400, "data.eval_records": 16}
  return [f"--config.{k}={v}" for k, v in c.items()]


def _env(devices: int) -> dict:
  env = dict(os.environ)  # the test process's environment, with this process's device count
  env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                               if not f.startswith("--xla_force_host_platform_device_count")]
                              + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"   # tiny model: compile time dominates
  env["JAX_NUMPY_RANK_PROMOTION"] = "raise"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("RLJ_COORDINATOR", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir: str, *, processes: int, devices_per_process: int, total_steps: int,
            config: str = "configs/grpo_tpu.py:runlocal", overrides: list | None = None) -> list:
  """Starts the job's processes (not waiting); returns the Popen objects."""
  cmd = [sys.executable, "-m", "launch.train", "--config", config, "--workdir", workdir,
         *(_overrides(processes, total_steps) if overrides is None else overrides)]
  env = _env(devices_per_process)
  if processes == 1:
    return [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  coordinator = f"localhost:{_free_port()}"
  return [subprocess.Popen(cmd + [f"--coordinator_address={coordinator}", f"--num_processes={processes}",
                                  f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(processes)]


def _wait(procs: list) -> None:
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-6000:]}"


def _params(workdir: str, step: int) -> dict:
  """The checkpoint's params as numpy arrays (restored onto this process's first device)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    saved = dict(ckptr.metadata(path).item_metadata)["params"]
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), saved)}
  args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(path, args=args)["params"])


def _metrics(workdir: str) -> list[dict]:
  records = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One 4-device process and one two-process job, 3 GRPO steps each, run side by side."""
  root = tmp_path_factory.mktemp("multihost")
  dirs = {"one": str(root / "one"), "two": str(root / "two")}
  procs = _launch(dirs["one"], processes=1, devices_per_process=4, total_steps=3)
  procs += _launch(dirs["two"], processes=2, devices_per_process=2, total_steps=3)
  _wait(procs)
  return dirs


def _assert_params_close(a: dict, b: dict, **tol):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


def test_two_processes_equal_one_process_with_four_devices(runs):
  one, two = _metrics(runs["one"]), _metrics(runs["two"])
  assert [r["step"] for r in two] == [1, 2, 3]
  assert [r["step"] for r in one] == [1, 2, 3]
  for r1, r2 in zip(one, two):
    assert r1.keys() == r2.keys()
    for k in r1:
      np.testing.assert_allclose(r2[k], r1[k], err_msg=f"step {r1['step']} {k}", **METRIC_TOL)
    assert r2["sampled_tokens"] == r1["sampled_tokens"] and r2["adv/abs_mean"] == r1["adv/abs_mean"]
  p1, p2 = _params(runs["one"], 3), _params(runs["two"], 3)
  _assert_params_close(p2, p1, **PARAM_TOL)
  # Each RL step moves the params by far more than the tolerance, so a different batch would not pass.
  for before in (_params(runs["two"], 2), _params(os.path.join(runs["two"], "sft"), 2)):
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(p2), jax.tree.leaves(before)))
    assert moved > 10 * PARAM_TOL["atol"], moved


@pytest.mark.slow
def test_two_process_job_resumes_from_its_checkpoint(runs, tmp_path):
  """The two-process job's step-2 checkpoint, resumed by a new two-process launch, reaches step 3's params."""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(runs["two"], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))  # as if the job had stopped after step 2
  for extra in ("checkpoints.host",):
    host3 = os.path.join(workdir, extra, "3")
    if os.path.isdir(host3):
      shutil.rmtree(host3)
  saved = json.load(open(os.path.join(workdir, "checkpoints", "2", "meta", "metadata")))
  assert len(saved["data"]) == 2 and saved["data"][0]["process_index"] == 0  # one iterator state per process
  _wait(_launch(workdir, processes=2, devices_per_process=2, total_steps=3))
  assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3]
  for r_resumed, r_straight in zip(_metrics(workdir), _metrics(runs["two"])):
    for k in r_straight:
      np.testing.assert_allclose(r_resumed[k], r_straight[k], err_msg=k, **METRIC_TOL)
  _assert_params_close(_params(workdir, 3), _params(runs["two"], 3), **PARAM_TOL)


# ---------------------------------------------------------------------------------------------------------
# Pieces, in this process (one process, 8 devices)
# ---------------------------------------------------------------------------------------------------------

def test_job_spec_from_flags_and_environment():
  from launch import distributed
  spec = distributed.job_spec
  assert spec(env={}).mode == "single"
  assert spec(env={"TPU_WORKER_HOSTNAMES": "host0"}).mode == "single"             # a one-host slice
  assert spec(env={"TPU_WORKER_HOSTNAMES": "host0,host1"}).mode == "auto"
  assert spec(env={"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}).mode == "auto"
  assert spec(env={"RLJ_DISTRIBUTED": "1"}).mode == "auto"
  explicit = spec(coordinator_address="h:1234", num_processes=2, process_id=1, env={})
  assert (explicit.mode, explicit.coordinator_address, explicit.num_processes, explicit.process_id) == (
      "explicit", "h:1234", 2, 1)
  from_env = spec(env={"RLJ_COORDINATOR": "h:1", "RLJ_NUM_PROCESSES": "4", "RLJ_PROCESS_ID": "3"})
  assert (from_env.mode, from_env.num_processes, from_env.process_id) == ("explicit", 4, 3)
  assert spec(process_id=0, env={"RLJ_COORDINATOR": "h:1", "RLJ_NUM_PROCESSES": "2", "RLJ_PROCESS_ID": "1"}
              ).process_id == 0                                                    # a flag beats the env
  for bad in (dict(coordinator_address="h:1", num_processes=2), dict(coordinator_address="h:1", num_processes=2,
                                                                     process_id=2), dict(num_processes=2)):
    with pytest.raises(SystemExit):
      spec(env={}, **bad)
  assert distributed.initialize(env={}).mode == "single"                          # nothing to join


def test_host_data_round_trips_on_one_process():
  from rlj import host_data, sharding
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2), ("tensor", 1)])
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  placed = host_data.to_global({"x": x, "n": np.float32(5), "odd": x[:3]}, mesh, sharding.DEFAULT_RULES)
  assert placed["x"].sharding.spec[0] == ("data", "fsdp") and placed["odd"].sharding.is_fully_replicated
  full = host_data.from_host({"x": x}, mesh, sharding.DEFAULT_RULES)["x"]
  for arr in (placed["x"], full):
    np.testing.assert_array_equal(host_data.to_local(arr), x)
    np.testing.assert_array_equal(host_data.gather(arr), x)
  np.testing.assert_array_equal(host_data.gather_rows(x, mesh, sharding.DEFAULT_RULES), x)
  assert float(host_data.fetch(placed["n"])) == 5.0
  assert host_data.process_sum(2.5) == 2.5 and host_data.process_max(3) == 3
  saved = host_data.allgather_json({"next_element": 7})
  assert saved == [{"next_element": 7}] and host_data.own_entry(saved) == {"next_element": 7}
  assert host_data.own_entry({"next_element": 7}) == {"next_element": 7}          # checkpoints before lists
  with pytest.raises(ValueError, match="2 processes"):
    host_data.own_entry([{}, {}])


# ---------------------------------------------------------------------------------------------------------
# The reward-model job: the same lifecycle, so the same multi-process checkpoints
# ---------------------------------------------------------------------------------------------------------

RM_PAIRS = 16           # pairs per step, global
# The RM job's learning rate (1e-3) is 1000x the RL one, so the last-bit differences of the gradient all-reduce
# order (see the module doc) grow to ~1e-4 relative in three Adam steps (measured 1.2e-4 on reward_chosen).
RM_METRIC_TOL = dict(rtol=1e-3, atol=1e-5)


def _launch_rm(workdir: str, *, processes: int, devices_per_process: int, total_steps: int) -> list:
  c = {"train.total_steps": total_steps, "train.batch_size": RM_PAIRS, "train.eval_every": 0,
       "train.eval_batch_size": 32, "train.log_every": 1, "train.ckpt_every": 1, "tokenizer.train_records": 200,
       "data.train_records": 400, "data.eval_records": 64}
  return _launch(workdir, processes=processes, devices_per_process=devices_per_process, total_steps=total_steps,
                 config="configs/rm_bt.py:runlocal", overrides=[f"--config.{k}={v}" for k, v in c.items()])


@pytest.mark.slow   # ~40 s on 2 cores: outside the CI budget (pytest -m slow runs it)
def test_reward_model_job_on_two_processes_equals_one_and_resumes(tmp_path):
  """rm_bt on two processes x 2 devices logs what one process with 4 devices logs; its checkpoint keeps one
  data-iterator state per process, and a two-process relaunch from step 2 ends where the straight run does."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _wait(_launch_rm(one, processes=1, devices_per_process=4, total_steps=3)
        + _launch_rm(two, processes=2, devices_per_process=2, total_steps=3))
  m1, m2 = (_metrics(d) for d in (one, two))
  assert [r["step"] for r in m2 if "loss" in r] == [1, 2, 3]
  for r1, r2 in zip(m1, m2):
    assert r1.keys() == r2.keys()
    for k in r1:
      if k != "pairs_per_s":
        np.testing.assert_allclose(r2[k], r1[k], err_msg=f"step {r1['step']} {k}", **RM_METRIC_TOL)
  saved = json.load(open(os.path.join(two, "checkpoints", "2", "meta", "metadata")))
  assert [d["process_index"] for d in saved["data"]] == [0, 1] and saved["job"] == "rm"
  resumed = str(tmp_path / "resumed")
  shutil.copytree(two, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
  _wait(_launch_rm(resumed, processes=2, devices_per_process=2, total_steps=3))
  for r_resumed, r_straight in zip(_metrics(resumed), m2):
    for k in r_straight:
      if k != "pairs_per_s":
        np.testing.assert_allclose(r_resumed[k], r_straight[k], err_msg=k, **METRIC_TOL)
  _assert_params_close(_params(resumed, 3), _params(two, 3), **PARAM_TOL)
