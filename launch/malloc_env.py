"""Host-allocator settings for CPU runs, applied by re-executing the entry point once, before JAX starts.

XLA:CPU allocates each step's temporaries (activations, the residuals kept for the backward pass, gradients)
with malloc and frees them when the step ends. glibc serves every allocation above its mmap threshold (32 MiB
at most) with freshly mapped pages and unmaps them on free, so each step page-faults its whole working set
again. Two fixes, in order of preference:

1. tcmalloc (Debian/Ubuntu package ``libtcmalloc-minimal4``), when the dynamic loader can find it: preloaded
   with ``LD_PRELOAD``. It keeps freed pages for reuse.
2. Otherwise glibc, told to do the same:
     MALLOC_ARENA_MAX=1  MALLOC_MMAP_MAX_=0  MALLOC_TRIM_THRESHOLD_=2^40
   Every allocation then comes from the one main heap, and freed memory stays mapped for the next step. The
   heap fragments, though: the process keeps its peak heap mapped until it exits, and that peak is higher.

Measured on the small-50m train step at 8 x 512 tokens (2-core CPU, 8 steps after compilation):

| allocator       | s per step   | peak resident |
|-----------------|--------------|---------------|
| glibc defaults  | 6.5 - 7.5    | 5.1 GB        |
| glibc, as above | 4.5 - 5.0 (one step 10.8) | 8.7 GB |
| tcmalloc        | 4.3 - 4.6    | 5.1 GB        |

glibc reads its variables, and the loader ``LD_PRELOAD``, once, at start-up, so a running Python process
cannot set them for itself. The entry points (``launch.train``, ``launch.bench``) call ``reexec()`` before
importing JAX: it re-executes the same command line with the environment changed. It does so only on
CPU-only hosts (``JAX_PLATFORMS`` starting with cpu, or no TPU / GPU device files), only when neither fix is
in place yet (so at most once, and never over a value the user set), and never with ``RLJ_MALLOC_TUNING=0``.

The same early moment picks JAX's platforms (``jax_platforms``): JAX initialises every backend it has a plugin
for, and with libtpu installed (requirements-test.txt brings it for ``launch.aot``'s compile-only TPU devices)
that includes the TPU runtime, which on a host without TPU chips prints errors about TPU metadata and worker
hostnames at every start. When ``JAX_PLATFORMS`` is unset, libtpu is installed and no TPU device file exists,
``reexec()`` (and ``set_jax_platforms()``, which ``launch.export`` and ``launch.make_tiny_checkpoint`` call)
sets it to the platforms the host has (a GPU platform whose device files exist and whose JAX plugin is
installed, then cpu). TPU VMs, and every value the user sets (``JAX_PLATFORMS=`` included), are left alone;
``launch.aot`` loads libtpu for its TPU topologies whatever ``JAX_PLATFORMS`` says.
"""
from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import sys
from typing import Callable, Mapping, Optional

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
SWITCH = "RLJ_MALLOC_TUNING"
# Device files of accelerators JAX would use: TPU VMs (/dev/accel*, /dev/vfio on v5e and later), NVIDIA, AMD.
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
_TPU_FILES = _ACCELERATOR_FILES[:2]
_GPU_FILES = {"cuda": "/dev/nvidia[0-9]*", "rocm": "/dev/kfd"}


def libtpu_installed() -> bool:
  """Whether the ``libtpu`` package (the TPU runtime JAX loads as a plugin) is importable; nothing is imported."""
  return importlib.util.find_spec("libtpu") is not None


def gpu_plugins() -> set[str]:
  """The GPU platforms (``cuda``, ``rocm``) whose JAX plugin package is installed."""
  names = [f"{ep.name} {ep.value}" for ep in importlib.metadata.entry_points(group="jax_plugins")]
  return {p for p in _GPU_FILES if any(p in n for n in names)}


def jax_platforms(environ: Mapping[str, str], *, has_libtpu: Callable[[], bool] = libtpu_installed,
                  plugins: Callable[[], set[str]] = gpu_plugins,
                  exists: Callable[[str], bool] = lambda pattern: bool(glob.glob(pattern))) -> Optional[str]:
  """The ``JAX_PLATFORMS`` value that keeps JAX from starting the TPU runtime on a host without TPUs, or None to
  leave JAX's own choice (the variable is set, libtpu is absent, or a TPU device file exists)."""
  if "JAX_PLATFORMS" in environ or not has_libtpu() or any(exists(p) for p in _TPU_FILES):
    return None
  gpus = [p for p, pattern in _GPU_FILES.items() if exists(pattern) and p in plugins()]
  return ",".join(gpus + ["cpu"])


def cpu_only(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on the host CPU: ``JAX_PLATFORMS`` says so, or no accelerator device file exists."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def find_tcmalloc() -> Optional[str]:
  """The tcmalloc shared library the dynamic loader knows (its soname), or None."""
  for name in ("tcmalloc_minimal", "tcmalloc"):
    lib = ctypes.util.find_library(name)
    if lib:
      return lib
  return None


def preloaded_allocators(environ: Mapping[str, str]) -> list[str]:
  """The allocator libraries (tcmalloc, jemalloc, ...) that ``LD_PRELOAD`` names."""
  return [lib for lib in environ.get("LD_PRELOAD", "").split() if "malloc" in lib]


def in_effect(environ: Mapping[str, str]) -> str:
  """One line naming the host allocator set up in ``environ`` (for benchmark records)."""
  preload = preloaded_allocators(environ)
  if preload:
    return "LD_PRELOAD " + " ".join(os.path.basename(lib) for lib in preload)
  glibc = [f"{k}={environ[k]}" for k in SETTINGS if k in environ]
  return "glibc " + " ".join(glibc) if glibc else "glibc defaults"


def tuned_env(environ: Mapping[str, str],
              find: Callable[[], Optional[str]] = find_tcmalloc) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None when nothing is to change."""
  if environ.get(SWITCH, "1") == "0" or not cpu_only(environ):
    return None
  if preloaded_allocators(environ) or all(k in environ for k in SETTINGS):
    return None                                  # an allocator is preloaded, or glibc is set up already
  lib = find()
  if lib:
    return {**environ, "LD_PRELOAD": f"{environ.get('LD_PRELOAD', '')} {lib}".strip()}
  return {**environ, **{k: v for k, v in SETTINGS.items() if k not in environ}}


def set_jax_platforms() -> None:
  """Sets ``JAX_PLATFORMS`` in this process as ``jax_platforms`` says (JAX reads it when it starts its backends)."""
  platforms = jax_platforms(os.environ)
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms


def reexec() -> None:
  """Sets ``JAX_PLATFORMS`` as ``jax_platforms`` says, then re-executes this process's command line with the
  environment ``tuned_env`` returns, if any.

  Call it first thing in an entry point's ``__main__``, before JAX (or anything heavy) is imported: the
  command line runs again from the start. It keeps the process id, so signals and process managers still
  reach the run.
  """
  set_jax_platforms()   # read when JAX starts its backends: no re-execution needed for it
  env = tuned_env(os.environ)
  if env is None:
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
