r"""Benchmark harness: named cases that print a table and append it, with hardware, versions and date, to
BENCHMARKS.md next to the one command that reproduces it.

  python -m launch.bench --case train_step --model small-50m          # model FLOPs utilisation (MFU)
  python -m launch.bench --case sampler --model small-50m             # decode vs memory-bandwidth bound
  python -m launch.bench --case sampler_hf --model small-50m          # compiled sampler vs transformers
  python -m launch.bench --case decode_matmuls --model small-50m      # each weight matmul of a decode step
  python -m launch.bench --case logprobs                              # dense vs vocab-parallel log-probs
  python -m launch.bench --case rl_step                               # one runlocal GRPO step broken down
  python -m launch.bench --case lora_sampling --model small-32m       # LoRA decode: merged vs unmerged
  python -m launch.bench --case sampler_rounds --model small-32m      # decode on stopped rows: one-shot vs rounds
  python -m launch.bench --case agent_turns --model small-32m         # multi-turn: re-prefill vs KV-cache reuse
  python -m launch.bench --case attention --model llama-3.2-1b --seq 4096 --dtype bfloat16   # kernel vs einsum
  python -m launch.bench --case all                                   # train_step, sampler, logprobs, rl_step
  python -m launch.bench --case train_step --model small-50m --dtype bfloat16   # GPU / TPU: bf16 peak

Every ratio is against a figure measured in the same process at the same dtype: the matmul peak is the best
time of a big jitted square matmul (``matmul_peak``), the copy bandwidth the best time of a big jitted,
donated ``x + 1`` (``copy_bandwidth``; bytes read plus bytes written). Load average (1 minute) is recorded
before and after each case, because on a shared machine it is the main source of noise.

Cases live in ``launch/bench_*.py``; each is ``run(args) -> list of row dicts`` and a one-line description.
"""
from __future__ import annotations

if __name__ == "__main__":   # on CPU, re-run with the host-allocator settings before JAX starts
  from launch import malloc_env
  malloc_env.reexec()

import argparse
import dataclasses
import datetime
import importlib
import os
import platform
import shlex
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------------------------------------
# Timing and peaks
# ------------------------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn`` (each blocked until its outputs are ready), after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def default_peak_sizes() -> tuple[int, ...]:
  """Square matmul sizes for the peak: big enough to saturate the backend's matmul units."""
  return (1024, 2048, 4096) if jax.default_backend() == "cpu" else (4096, 8192, 16384)


def matmul_peak(dtype: str = "float32", *, sizes: Sequence[int] | None = None, repeats: int = 5) -> float:
  """Best achieved FLOP/s of a jitted [n, n] @ [n, n] matmul in ``dtype`` over ``sizes``: 2 n^3 / seconds.

  The best over sizes and repeats is the peak the MFU figures divide by, so MFU is never flattered by a
  small or unlucky peak measurement.
  """
  best = 0.0
  for n in sizes or default_peak_sizes():
    a = jnp.ones((n, n), dtype) / n
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.matmul)
    secs = min(time_calls(lambda: mm(a, b), repeats=repeats))
    best = max(best, 2.0 * n ** 3 / secs)
    del a, b
  return best


def copy_bandwidth(*, mbytes: int | None = None, repeats: int = 5) -> float:
  """Best achieved bytes/s (read + written) of a donated, jitted ``x + 1`` over a float32 array of ``mbytes``.

  Donation lets the output reuse the input's pages: a fresh output buffer would add page-fault time that
  a decode step (whose KV cache is donated) does not pay.
  """
  if mbytes is None:
    mbytes = 256 if jax.default_backend() == "cpu" else 2048
  n = mbytes * (1 << 20) // 4
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  state = {"x": jnp.zeros((n,), jnp.float32)}

  def step():
    state["x"] = add(state["x"])
    return state["x"]
  secs = min(time_calls(step, repeats=repeats))
  return 2.0 * n * 4 / secs


# ------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def hardware() -> str:
  """One line naming the devices JAX runs on (CPU model and cores, or accelerator kind and count)."""
  dev = jax.devices()[0]
  host = f"{cpu_model()}, {os.cpu_count()} cores"
  if dev.platform == "cpu":
    return f"CPU: {host} ({jax.device_count()} JAX device(s))"
  return f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); host {host}"


def versions() -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
          f"flax {flax.__version__}")


def host_allocator() -> str:
  """The preloaded allocator or the glibc malloc settings in effect (``launch/malloc_env.py`` on CPU hosts)."""
  from launch import malloc_env  # pylint: disable=g-import-not-at-top
  return malloc_env.in_effect(os.environ)


def load_average() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------

def format_value(v) -> str:
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return f"{int(v):,}"
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if v != v:
      return "n/a"
    a = abs(v)
    if a == 0 or 0.01 <= a < 1e5:
      return f"{v:.3g}" if a < 100 else f"{v:,.0f}"
    return f"{v:.3e}"
  return str(v)


def table(rows: list[dict]) -> str:
  """Markdown table of ``rows`` (columns in first-seen order)."""
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(format_value(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)


def markdown_section(case: str, description: str, rows: list[dict], *, command: str, notes: Sequence[str],
                     load_before: float, load_after: float) -> str:
  date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  out = [f"### {case}: {description} ({date})", "",
         f"- Command: `{command}`",
         f"- Hardware: {hardware()}",
         f"- Software: {versions()}",
         f"- Host allocator: {host_allocator()}",
         f"- Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"]
  out += [f"- {n}" for n in notes]
  return "\n".join(out + ["", table(rows), ""])


def append_markdown(path: str, section: str) -> None:
  header = "\n## Benchmark runs (`python -m launch.bench`)\n"
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  with open(path, "a") as f:
    if header.strip() not in text:
      f.write(header)
    f.write("\n" + section)


# ------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """A named case: ``module.function(args) -> (rows, notes)``, imported only when it runs."""
  module: str
  function: str
  description: str

  def run(self, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    return getattr(importlib.import_module(self.module), self.function)(args)


CASES = {
    "train_step": Case("launch.benchmarks.train_step", "run", "jitted GRPO train step, model FLOPs utilisation"),
    "sampler": Case("launch.benchmarks.sampler", "run_decode", "compiled sampler decode vs memory-bandwidth bound"),
    "sampler_hf": Case("launch.benchmarks.sampler", "run_compare",
                       "compiled sampler vs Python loop vs transformers generate"),
    "decode_matmuls": Case("launch.benchmarks.matmul", "run", "each weight matmul of a decode step, timed alone"),
    "logprobs": Case("launch.benchmarks.logprobs", "run", "teacher-forced log-probs, dense vs chunked vs vocab-parallel"),
    "rl_step": Case("launch.benchmarks.rl_step", "run", "one runlocal GRPO step broken down"),
    "lora_sampling": Case("launch.benchmarks.lora_sampling", "run",
                          "LoRA decode on merged weights vs base + unmerged adapters"),
    "sampler_rounds": Case("launch.benchmarks.sampler_rounds", "run",
                           "length-skewed rollouts: one-shot decode against rounds that drop stopped rows"),
    "attention": Case("launch.benchmarks.attention", "run",
                      "teacher-forced causal attention, fwd + bwd: einsum path vs the platform's kernel"),
    "torch_update": Case("launch.benchmarks.torch_update", "run",
                         "the RL update (two optimizer steps) in rlj and in PyTorch + transformers"),
    "agent_turns": Case("launch.benchmarks.agent_turns", "run",
                        "multi-turn rollouts: a continuing turn re-prefilled vs continued from its KV cache"),
}
ALL = ("train_step", "sampler", "logprobs", "rl_step")   # what --case all runs (sampler_hf needs torch)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--case", default="all", help=f"one of {sorted(CASES)} or 'all' ({', '.join(ALL)})")
  ap.add_argument("--model", default=None, help="preset (models.presets); default per case")
  ap.add_argument("--dtype", default="float32", help="compute dtype of the model and of the matmul peak")
  ap.add_argument("--batch", type=int, default=None,
                  help="rows (train_step, logprobs, decode_matmuls) / prompts (sampler)")
  ap.add_argument("--seq", type=int, default=None, help="train_step: tokens per row; sampler: prompt length")
  ap.add_argument("--new_tokens", type=int, default=None, help="sampler: decode steps; logprobs: T")
  ap.add_argument("--vocab", type=int, default=None, help="logprobs: vocabulary size")
  ap.add_argument("--steps", type=int, default=None, help="rl_step: timed RL steps after warm-up")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="rl_step: any config override of configs/grpo_tpu.py:runlocal, repeatable, e.g. "
                       "--set algo.kwargs.kl_coef=0.04 --set algo.name=gdpo (values parse as Python literals)")
  ap.add_argument("--ab", action="append", default=[], metavar="KEY=VALUE",
                  help="rl_step: also run the case with these overrides (B), its steps interleaved with A's in one "
                       "process, repeatable")
  ap.add_argument("--reward_ms", type=float, default=0.0,
                  help="rl_step: an extra reward that waits this long per call (a code runner, an HTTP judge)")
  ap.add_argument("--lengths", default="sampled", choices=("sampled", "skewed"),
                  help="rl_step: the completions as sampled, or cut to lengths spread evenly over 10%%-100%% of "
                       "--new_tokens (a length-skewed rollout)")
  ap.add_argument("--old_logp", default=None, choices=("auto", "recompute", "sampler"),
                  help="rl_step: train.old_logp (auto runs one minibatch: on-policy, no trainer log-prob pass)")
  ap.add_argument("--cache_phases", type=int, default=None,
                  help="sampler: KV-cache phases of the T-token call (rlj.sampler.SamplerConfig.cache_phases; "
                       "default: the platform's)")
  ap.add_argument("--rank", type=int, default=None, help="lora_sampling: the adapters' rank (default 16)")
  ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (after one warm-up)")
  ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append to ('' prints only)")
  return ap


def command_for(name: str, args: argparse.Namespace) -> str:
  """The one command that reproduces case ``name`` with the options given (defaults left out)."""
  defaults = vars(parser().parse_args([]))
  parts = ["python -m launch.bench", f"--case {name}"]
  for key, value in vars(args).items():
    if key not in ("case", "out") and value != defaults[key]:
      for v in value if isinstance(value, list) else [value]:   # --set is repeatable
        parts.append(f"--{key} {shlex.quote(str(v))}")
  return " ".join(parts)


def run_case(name: str, args: argparse.Namespace, *, command: str) -> list[dict]:
  case = CASES[name]
  before = load_average()
  rows, notes = case.run(args)
  after = load_average()
  section = markdown_section(name, case.description, rows, command=command, notes=notes, load_before=before,
                             load_after=after)
  print(section, flush=True)
  if args.out:
    append_markdown(args.out, section)
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  names = ALL if args.case == "all" else (args.case,)
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise SystemExit(f"unknown case {unknown[0]!r}; choose one of {sorted(CASES)} or 'all'")
  results = {}
  for name in names:
    results[name] = run_case(name, args, command=command_for(name, args))
  return results


if __name__ == "__main__":
  main()
