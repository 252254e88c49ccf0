"""The CPU host-allocator re-exec: when it applies, and that the re-executed command sees the settings."""
import os
import subprocess
import sys

from launch import malloc_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean(**extra):
  env = {k: v for k, v in os.environ.items() if k not in malloc_env.SETTINGS and k != malloc_env.SWITCH}
  return {**env, **extra}


def test_tuned_env_rules():
  cpu = _clean(JAX_PLATFORMS="cpu")
  assert malloc_env.tuned_env(cpu) == {**cpu, **malloc_env.SETTINGS}
  assert malloc_env.tuned_env(_clean(JAX_PLATFORMS="tpu")) is None
  assert malloc_env.tuned_env(_clean(JAX_PLATFORMS="cuda,cpu")) is None
  assert malloc_env.tuned_env(_clean(JAX_PLATFORMS="cpu", RLJ_MALLOC_TUNING="0")) is None
  assert malloc_env.tuned_env({**cpu, **malloc_env.SETTINGS}) is None             # already applied: no loop
  mine = malloc_env.tuned_env({**cpu, "MALLOC_ARENA_MAX": "4"})                   # a user's value is kept
  assert mine["MALLOC_ARENA_MAX"] == "4" and mine["MALLOC_MMAP_MAX_"] == "0"


def test_reexec_runs_the_same_command_with_the_settings():
  code = ("import os, sys; from launch import malloc_env; print('start', flush=True); malloc_env.reexec(); "
          "print(os.environ.get('MALLOC_MMAP_MAX_'), os.environ.get('MALLOC_ARENA_MAX'), sys.argv[1:])")
  run = lambda env: subprocess.run([sys.executable, "-c", code, "a", "b"], cwd=ROOT, env=env,  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout.split("\n")
  out = run(_clean(JAX_PLATFORMS="cpu"))
  assert out[:3] == ["start", "start", "0 1 ['a', 'b']"]                          # ran twice, then tuned
  assert run(_clean(JAX_PLATFORMS="cpu", RLJ_MALLOC_TUNING="0"))[:2] == ["start", "None None ['a', 'b']"]
