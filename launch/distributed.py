"""Multi-controller start-up: ``jax.distributed.initialize`` when this process is one host of a multi-host job.

Every host of a multi-host job runs the same program (JAX's multi-controller runtime); before anything
touches a device, each process must join the job so that ``jax.devices()`` lists the devices of all hosts.
``initialize_from_flags`` is what ``launch.train`` calls first; ``initialize`` is the function behind it.

How the job is described, first match wins:

1. Explicit: a coordinator address (``--coordinator_address`` or ``RLJ_COORDINATOR``, ``host:port`` of
   process 0) with the process count and this process's id (``--num_processes`` / ``RLJ_NUM_PROCESSES``,
   ``--process_id`` / ``RLJ_PROCESS_ID``). For CPU and GPU clusters and the local two-process test.
2. Cloud TPU: a TPU VM slice with more than one worker (``TPU_WORKER_HOSTNAMES`` or
   ``TPU_PROCESS_ADDRESSES`` lists several hosts, or a multi-slice ``MEGASCALE_COORDINATOR_ADDRESS`` or
   ``CLOUD_TPU_TASK_ID`` is set), or ``RLJ_DISTRIBUTED=1`` (``launch/tpu_pod.sh`` sets it on every worker):
   ``jax.distributed.initialize()`` without arguments, which reads the slice from the TPU metadata.
3. Otherwise one process: nothing to do.

CPU multi-process jobs need cross-process collectives: ``jax_cpu_collectives_implementation`` is set to
``gloo`` (JAX's default for it, set explicitly so an environment override cannot leave it off).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from absl import flags, logging

import jax

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process job (CPU/GPU clusters); "
    "env RLJ_COORDINATOR. Cloud TPU slices are detected without it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job; env RLJ_NUM_PROCESSES")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes); "
                                   "env RLJ_PROCESS_ID")

# Environment variables that mark a multi-host Cloud TPU job.
TPU_HOSTS_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
TPU_JOB_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """How this process joins the job.

  Attributes:
    mode: "single" (one process, no initialisation) | "explicit" (coordinator, count and id given) |
      "auto" (``jax.distributed.initialize()`` detects the Cloud TPU slice).
    coordinator_address: ``host:port`` of process 0 (explicit mode).
    num_processes: number of processes (explicit mode).
    process_id: this process's index (explicit mode).
  """
  mode: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _env_int(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise SystemExit(f"environment variable {key}={value!r} is not an integer") from e


def job_spec(*, coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, env: Mapping[str, str] | None = None) -> JobSpec:
  """Decides how to join the job from explicit values, then the environment (see module doc).

  Raises:
    SystemExit: an explicit coordinator without a process count or id, or an id out of range.
  """
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get("RLJ_COORDINATOR") or None
  num_processes = num_processes if num_processes is not None else _env_int(env, "RLJ_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int(env, "RLJ_PROCESS_ID")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise SystemExit("--coordinator_address needs --num_processes and --process_id "
                       "(or RLJ_NUM_PROCESSES and RLJ_PROCESS_ID)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise SystemExit(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    return JobSpec("explicit", coordinator_address, num_processes, process_id)
  if num_processes is not None and num_processes > 1:
    raise SystemExit(f"--num_processes={num_processes} needs --coordinator_address (host:port of process 0)")
  if env.get("RLJ_DISTRIBUTED", "").lower() in ("1", "true", "yes", "auto"):
    return JobSpec("auto")
  if any(len([h for h in env.get(k, "").split(",") if h.strip()]) > 1 for k in TPU_HOSTS_ENV):
    return JobSpec("auto")
  if any(env.get(k) for k in TPU_JOB_ENV):
    return JobSpec("auto")
  return JobSpec("single")


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> JobSpec:
  """Joins the multi-process job this process belongs to (if any); returns how.

  Must run before any JAX computation or device query. Calling it again after a successful
  initialisation does nothing.
  """
  spec = job_spec(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                  env=env)
  if spec.mode == "single" or jax.distributed.is_initialized():
    return spec
  if spec.mode == "explicit":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                               process_id=spec.process_id)
  else:
    jax.distributed.initialize()
  logging.info("joined a %d-process job as process %d (%s); %d devices in all, %d here",
               jax.process_count(), jax.process_index(), spec.mode, jax.device_count(), jax.local_device_count())
  return spec


def initialize_from_flags() -> JobSpec:
  """``initialize`` with the ``--coordinator_address`` / ``--num_processes`` / ``--process_id`` flags."""
  return initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
