"""The CPU host-allocator re-exec: when it applies, and that the re-executed command sees the settings."""
import os
import subprocess
import sys

from launch import malloc_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean(**extra):
  drop = {*malloc_env.SETTINGS, malloc_env.SWITCH, "LD_PRELOAD"}
  return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def test_tuned_env_rules():
  cpu = _clean(JAX_PLATFORMS="cpu")
  no_tcmalloc = lambda: None  # noqa: E731
  assert malloc_env.tuned_env(cpu, no_tcmalloc) == {**cpu, **malloc_env.SETTINGS}
  assert malloc_env.tuned_env(cpu, lambda: "libtcmalloc_minimal.so.4") == {
      **cpu, "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
  assert malloc_env.tuned_env({**cpu, "LD_PRELOAD": "libfoo.so"}, lambda: "libtcmalloc.so.4")["LD_PRELOAD"] == (
      "libfoo.so libtcmalloc.so.4")
  for env in (_clean(JAX_PLATFORMS="tpu"), _clean(JAX_PLATFORMS="cuda,cpu"),
              _clean(JAX_PLATFORMS="cpu", RLJ_MALLOC_TUNING="0"),
              {**cpu, **malloc_env.SETTINGS},                                     # already applied: no loop
              {**cpu, "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}):
    assert malloc_env.tuned_env(env, lambda: "libtcmalloc_minimal.so.4") is None, env
  mine = malloc_env.tuned_env({**cpu, "MALLOC_ARENA_MAX": "4"}, no_tcmalloc)      # a user's value is kept
  assert mine["MALLOC_ARENA_MAX"] == "4" and mine["MALLOC_MMAP_MAX_"] == "0"


def test_reexec_runs_the_same_command_with_the_settings():
  code = ("import os, sys; from launch import malloc_env; print('start', flush=True); malloc_env.reexec(); "
          "print(os.environ.get('MALLOC_MMAP_MAX_'), 'malloc' in os.environ.get('LD_PRELOAD', ''), sys.argv[1:])")
  run = lambda env: subprocess.run([sys.executable, "-c", code, "a", "b"], cwd=ROOT, env=env,  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout.split("\n")
  out = run(_clean(JAX_PLATFORMS="cpu"))
  assert out[:2] == ["start", "start"]                                            # ran twice ...
  tuned = "0 False ['a', 'b']" if malloc_env.find_tcmalloc() is None else "None True ['a', 'b']"
  assert out[2] == tuned                                                          # ... the second time tuned
  assert run(_clean(JAX_PLATFORMS="cpu", RLJ_MALLOC_TUNING="0"))[:2] == ["start", "None False ['a', 'b']"]


def test_in_effect_names_the_allocator():
  assert malloc_env.in_effect(_clean()) == "glibc defaults"
  assert malloc_env.in_effect(_clean(**malloc_env.SETTINGS)) == (
      "glibc MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776")
  assert malloc_env.in_effect(_clean(LD_PRELOAD="/usr/lib/libfoo.so /usr/lib/libtcmalloc_minimal.so.4")) == (
      "LD_PRELOAD libtcmalloc_minimal.so.4")


def test_jax_platforms_skips_the_tpu_runtime_only_where_there_is_no_tpu():
  files = lambda *present: (lambda pattern: any(p in pattern for p in present))  # noqa: E731
  pick = lambda env, *present, libtpu=True, plugins=(): malloc_env.jax_platforms(  # noqa: E731
      env, has_libtpu=lambda: libtpu, plugins=lambda: set(plugins), exists=files(*present))
  assert pick({}) == "cpu"                                                      # a CPU host with libtpu installed
  assert pick({}, "nvidia", plugins=("cuda",)) == "cuda,cpu"                    # a GPU host with JAX's CUDA plugin
  assert pick({}, "nvidia") == "cpu"                                            # ... without it: JAX's CPU anyway
  assert pick({}, "kfd", plugins=("rocm",)) == "rocm,cpu"
  assert pick({}, "accel") is None and pick({}, "vfio") is None                 # a TPU VM: JAX decides
  assert pick({}, libtpu=False) is None                                         # no TPU runtime to probe
  assert pick({"JAX_PLATFORMS": ""}) is None and pick({"JAX_PLATFORMS": "tpu"}) is None   # the user's choice


def test_a_job_started_from_a_venv_with_libtpu_prints_no_tpu_probe():
  """The entry points' early call sets JAX_PLATFORMS before JAX starts, so libtpu never looks for TPU metadata."""
  code = ("import os; from launch import malloc_env; malloc_env.reexec(); import jax; jax.devices(); "
          "print(os.environ.get('JAX_PLATFORMS'))")
  env = _clean(RLJ_MALLOC_TUNING="0")
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  expected = malloc_env.jax_platforms(env)
  assert proc.stdout.strip() == str(expected)
  if malloc_env.libtpu_installed() and expected is not None:
    assert expected == "cpu" or expected.endswith(",cpu")
    assert "TPU" not in proc.stderr and "E0000" not in proc.stderr, proc.stderr
