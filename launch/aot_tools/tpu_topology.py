"""TPU slice names -> compile-only TPU devices, for ahead-of-time compilation on a machine without TPUs.

A Cloud TPU slice is named ``<type>-<n>`` (``v5p-64``, ``v4-32``, ``v5litepod-16``, ``v6e-8``). For v4 and
v5p, ``n`` counts TensorCores (two per chip, fused into one JAX device by megacore), so ``v5p-64`` is 32 chips;
for v5e and v6e, ``n`` counts chips. The chips form a torus whose shape follows Cloud TPU's published
layouts: 3-D for v4 / v5p (``v5p-64`` is 2x4x4), 2-D for v5e / v6e (``v5litepod-16`` is 4x4). An explicit
shape is also accepted: ``v5p:4x4x4`` or ``v6e:2x4``.

``compile_only_devices`` asks libtpu (``pip install "jax[tpu]"``; nothing else in the project needs it) for
the devices of that topology through ``jax.experimental.topologies``: they carry the slice's device kind,
coordinates and host layout, and programs lowered for a mesh of them compile with the real TPU compiler, but
nothing runs. Compile-only devices report no memory statistics, so each chip's HBM comes from the table below.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024 ** 3

# Chip generation -> (topology name prefix, torus rank, TensorCores counted per chip in slice names,
# HBM per chip in bytes, device_kind substring libtpu reports).
CHIPS = {
    "v4": ("v4", 3, 2, 32 * GIB, "TPU v4"),
    "v5p": ("v5p", 3, 2, 95 * GIB, "TPU v5"),
    "v5e": ("v5e", 2, 1, 16 * GIB, "TPU v5 lite"),
    "v6e": ("v6e", 2, 1, 32 * GIB, "TPU v6 lite"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice.

  Attributes:
    name: as given (``v5p-64``).
    chip: chip generation key of ``CHIPS`` (``v5p``).
    shape: chips along each torus axis (``(2, 4, 4)``).
    hbm_bytes: HBM of one chip.
  """
  name: str
  chip: str
  shape: tuple[int, ...]
  hbm_bytes: int

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """Cloud TPU's name of the slice (``v5litepod-16``, ``v5p-64``)."""
    cores = self.num_chips * CHIPS[self.chip][2]
    return f"{'v5litepod' if self.chip == 'v5e' else self.chip}-{cores}"

  @property
  def topology_name(self) -> str:
    return f"{CHIPS[self.chip][0]}:{'x'.join(str(s) for s in self.shape)}"


def torus_shape(num_chips: int, rank: int) -> tuple[int, ...]:
  """Cloud TPU's layout of ``num_chips`` (a power of two): double the smallest axis, the last one first.

  3-D: 4 -> 2x2x1 (one host), 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, 128 -> 4x4x8.
  2-D: 1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, 64 -> 8x8, 256 -> 16x16.
  """
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(f"a slice has a power-of-two number of chips, got {num_chips}")
  if rank == 3 and num_chips <= 4:
    return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[num_chips]
  shape = [1] * rank
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse(name: str, *, hbm_gib: float | None = None) -> Slice:
  """``v5p-64`` / ``v5litepod-16`` / ``v5p:4x4x4`` -> a ``Slice``; ``hbm_gib`` overrides the chip's HBM."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
  chip = ALIASES.get(m.group(1), m.group(1)) if m else None
  if chip not in CHIPS:
    raise ValueError(f"TPU slice {name!r}: expected <type>-<cores> or <type>:<AxBxC> with type one of "
                     f"{sorted(CHIPS) + sorted(ALIASES)}, e.g. v5p-64, v5litepod-16, v4:2x2x4")
  _, rank, cores_per_chip, hbm, _ = CHIPS[chip]
  if m.group(2):
    cores = int(m.group(2))
    if cores % cores_per_chip:
      raise ValueError(f"TPU slice {name!r}: {chip} slice names count TensorCores ({cores_per_chip} per chip)")
    shape = torus_shape(cores // cores_per_chip, rank)
  else:
    shape = tuple(int(s) for s in m.group(3).split("x"))
    if len(shape) != rank:
      raise ValueError(f"TPU slice {name!r}: a {chip} torus has {rank} axes")
  return Slice(name=name, chip=chip, shape=shape, hbm_bytes=int(hbm_gib * GIB) if hbm_gib else hbm)


def compile_only_devices(s: Slice) -> list:
  """The slice's devices (one per chip) as libtpu describes them; raises ImportError without libtpu.

  Call before anything else initialises libtpu in this process. The environment variables keep libtpu
  from looking for TPU hardware, a metadata server or worker hostnames on this machine, and let several
  compile-only processes load it at once.
  """
  from jax._src import cloud_tpu_init
  from jax.experimental import topologies

  saved = dict(os.environ)  # restored below (jax's TPU set-up writes some variables too)
  if cloud_tpu_init.get_tpu_library_path() is None:
    raise ImportError('libtpu is not installed: pip install "jax[tpu]" (needed for TPU ahead-of-time compilation)')
  kwargs = {"chip_config_name": "megacore"} if s.chip == "v4" else {}
  if len(s.shape) == 2 and s.num_chips <= 8:  # v5e / v6e slices up to 8 chips are one VM
    kwargs["chips_per_host_bounds"] = (s.shape[0], s.shape[1], 1)
  # Set only while libtpu starts: child processes (a training job launched from here) must not inherit a
  # TPU worker's identity, or they would take themselves for a multi-host TPU job.
  try:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")     # compile-only: no chips to hold a lock on
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.accelerator_type)
    devices = list(topologies.get_topology_desc(s.topology_name, "tpu", **kwargs).devices)
  finally:
    os.environ.clear()
    os.environ.update(saved)
  if len(devices) != s.num_chips:
    raise RuntimeError(f"libtpu described {len(devices)} devices for {s.topology_name}, expected {s.num_chips}")
  kind = CHIPS[s.chip][4]
  if devices[0].device_kind != kind:
    raise RuntimeError(f"libtpu reports device kind {devices[0].device_kind!r} for {s.topology_name}, "
                       f"expected {kind!r}")
  return devices


def num_hosts(devices) -> int:
  """Processes (TPU VM workers) the devices belong to."""
  return len({d.process_index for d in devices})
