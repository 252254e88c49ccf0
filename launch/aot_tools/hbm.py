"""Per-chip HBM accounting of ahead-of-time compiled programs, and the fit verdict ``launch.aot`` prints.

One RL step runs several programs one after another (sampling, the rollout's log-prob passes, the optimizer
steps). While one runs, buffers that another program owns stay resident: the train state (params, optimizer
moments), the frozen reference params (with LoRA: the frozen base, which is also the reference, beside the
adapters' train state) and, with ``sampler.keep_cache``, the sampler's KV cache. So the HBM a
step needs on one chip is the largest, over the phases, of

  phase bytes = the program's compiled peak + the bytes of resident buffers that are not its arguments,

where the compiled peak (XLA's memory analysis of the executable) already counts the program's arguments,
outputs that do not alias a donated argument, and its temporaries (activations kept for the backward pass,
logits, gathered weights, collectives' buffers). Component sizes (params, optimizer state, ...) are the
per-chip shard bytes of the buffers as the compiled executable lays them out (its input shardings).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax

GIB = 1024 ** 3


def shard_bytes(tree: Any, shardings: Any = None) -> int:
  """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs), with ``shardings`` or their own."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
  total = 0
  for x, s in zip(leaves, shards, strict=True):
    shape = s.shard_shape(tuple(x.shape)) if s is not None else tuple(x.shape)
    total += math.prod(shape) * _itemsize(x.dtype)
  return total


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # a threefry key: two uint32 words
  return jax.numpy.dtype(dtype).itemsize


@dataclasses.dataclass
class Program:
  """One compiled program's per-chip figures (bytes, FLOPs and seconds are per device)."""
  name: str
  argument: int
  output: int
  alias: int
  temp: int
  peak: int
  flops: float
  seconds: float | None
  per_step: float                                  # runs per RL step (FLOPs and time multiply by it)
  args: Mapping[str, int] = dataclasses.field(default_factory=dict)   # component -> bytes among arguments
  error: str | None = None                         # the compiler's out-of-memory message, when it refused

  @property
  def temporaries(self) -> int:
    """Activations and other temporaries: what the peak holds beyond arguments and fresh outputs."""
    return max(self.temp, self.peak - self.argument - max(self.output - self.alias, 0))


def measure(name: str, compiled, *, per_step: float, args: Mapping[str, int]) -> Program:
  """Reads XLA's memory and cost analyses of ``compiled`` (a ``jax.stages.Compiled``)."""
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  argument, output = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
  alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
  peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
  peak = max(peak, argument + output - alias + temp)
  seconds = cost.get("optimal_seconds")
  return Program(name=name, argument=argument, output=output, alias=alias, temp=temp, peak=peak,
                 flops=float(cost.get("flops", 0.0)), seconds=None if seconds is None else float(seconds),
                 per_step=per_step, args=dict(args))


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}


def _parse_size(text: str) -> int:
  m = re.fullmatch(r"([\d.]+)([KMGT]?)B?", text)
  return int(float(m.group(1)) * _UNITS[m.group(2)])


def from_out_of_memory(name: str, message: str, *, per_step: float, args: Mapping[str, int]) -> Program:
  """A program the TPU compiler refused because it exceeds HBM, sized from the compiler's message.

  The message says either "the total memory required for HLO temporaries (50.81G) exceeds available HBM
  (15.75G)" or "Used 63.80G of 30.75G hbm"; the arguments are added from ``args`` in the first case.
  """
  argument = sum(args.values())
  m = re.search(r"HLO temporaries \(([\d.]+[KMGT]?)B?\)", message)
  if m:
    temp = _parse_size(m.group(1))
  else:
    m = re.search(r"Used ([\d.]+[KMGT]?)B? of", message)
    temp = max(_parse_size(m.group(1)) - argument, 0) if m else 0
  line = next((ln for ln in message.splitlines() if "memory" in ln.lower()), message.splitlines()[0])
  return Program(name=name, argument=argument, output=0, alias=0, temp=temp, peak=argument + temp, flops=0.0,
                 seconds=None, per_step=per_step, args=dict(args), error=line.strip())


@dataclasses.dataclass
class Phase:
  """A program plus the resident buffers it does not take as arguments."""
  program: Program
  resident: Mapping[str, int]

  @property
  def components(self) -> dict[str, int]:
    """Component -> bytes; the parts add up to ``total``."""
    p = self.program
    out = dict(p.args)
    out["other arguments / layout padding"] = max(p.argument - sum(p.args.values()), 0)
    out["activations / temporaries"] = p.temporaries
    out["outputs"] = max(p.output - p.alias, 0)
    for k, v in self.resident.items():
      out[k] = out.get(k, 0) + v
    return out

  @property
  def total(self) -> int:
    return self.program.peak + sum(self.resident.values())


# Component -> what to change when it is the biggest consumer.
FIXES = {
    "params": "shard the weights over more chips (a larger mesh 'fsdp' axis or a larger slice), or store them "
              "in bfloat16 (--config.model.overrides.param_dtype=bfloat16)",
    "optimizer state": "shard over more chips (a larger mesh 'fsdp' axis or a larger slice); the Adam moments "
                       "follow the params' sharding and dtype",
    "reference params": "turn the KL term off (--config.algo.kwargs.kl_coef=0) or shard over more chips",
    "sampler params": "shard over more chips (mesh 'fsdp' axis)",
    "KV cache": "sample the rollout in sequential chunks (--config.sampler.chunks), fewer rollout rows per chip "
                "(--config.train.batch_prompts or --config.sampler.num_generations), shorter "
                "--config.sampler.max_new_tokens, or --config.sampler.keep_cache=False",
    "batch": "fewer rows per optimizer step (--config.train.num_minibatches up)",
    "rollout tokens": "fewer prompts per RL step (--config.train.batch_prompts)",
    "activations / temporaries": None,      # depends on the phase, see ``fix_for``
    "other arguments / layout padding": "a mesh whose axes divide the array dimensions",
    "outputs": "donate the program's inputs",
    # LoRA runs (launch/aot_tools/lora_weights.py)
    "base params (frozen, also the reference)": "store the frozen base in bfloat16 "
                                                "(--config.model.lora.base_dtype=bfloat16) or shard over more chips",
    "adapters": "a lower rank (--config.model.lora.rank) or fewer targets (--config.model.lora.targets)",
    "sampler params (merged)": "sample in bfloat16 (--config.sampler.dtype=bfloat16) or shard over more chips",
    "merged params (old log-probs)": "take the sampler's old log-probs (--config.train.old_logp=sampler), store the "
                                     "base in bfloat16 (--config.model.lora.base_dtype=bfloat16) or shard over "
                                     "more chips",
}


def fix_for(component: str, phase: str) -> str:
  if component != "activations / temporaries":
    return FIXES[component]
  if phase == "train step":
    return ("remat (--config.model.overrides.remat=True), logits a chunk of tokens at a time "
            "(--config.train.logits_chunk=512), more micro-batches (--config.train.num_microbatches), "
            "or more chips on the batch axes; --suggest finds the smallest that fit")
  if phase.startswith("LoRA merge"):
    return ("shard the weights over more chips (a larger mesh 'fsdp' axis): the merge sums each kernel's "
            "W0 + (alpha / r) a b in float32")
  if phase == "rollout log-probs":
    return ("logits a chunk of tokens at a time (--config.train.logits_chunk=512), more row chunks of the pass "
            "(--config.train.logp_microbatches), or more chips on the batch axes; --suggest finds the smallest "
            "that fit")
  return ("sample the rollout in sequential chunks (--config.sampler.chunks; --suggest finds how many), fewer "
          "rollout rows per chip (--config.train.batch_prompts, --config.sampler.num_generations) or a shorter "
          "prompt bucket (--config.data.buckets)")


def gib(n: float) -> str:
  if n < GIB:
    return f"{n / 1024 ** 2:8.2f} MiB"
  return f"{n / GIB:8.2f} GiB"


def report(phases: Mapping[str, Phase], capacity: int, *, header: str) -> tuple[bool, str]:
  """(fits, text): every phase's breakdown against ``capacity`` and, when over, the biggest consumer."""
  lines = [header]
  worst_name = max(phases, key=lambda k: phases[k].total)
  width = max([34] + [len(c) + 1 for ph in phases.values() for c in ph.components])   # LoRA's labels are longer
  for name, ph in phases.items():
    lines.append(f"  {name} ({ph.program.name}): {gib(ph.total)} per chip")
    if ph.program.error:
      lines.append(f"      the TPU compiler refused it: {ph.program.error}")
    for comp, b in sorted(ph.components.items(), key=lambda kv: -kv[1]):
      if b:
        lines.append(f"      {comp:<{width}s}{gib(b)}")
  worst = phases[worst_name]
  fits = worst.total <= capacity and not any(ph.program.error for ph in phases.values())
  lines.append(f"  peak per chip: {gib(worst.total).strip()} in the {worst_name} phase, HBM {gib(capacity).strip()} "
               f"({100 * worst.total / capacity:.0f}%): {'FITS' if fits else 'DOES NOT FIT'}")
  if not fits:
    comp, b = max(worst.components.items(), key=lambda kv: kv[1])
    lines.append(f"  biggest consumer in the {worst_name} phase: {comp} ({gib(b).strip()}); "
                 f"fix: {fix_for(comp, worst_name)}")
  return fits, "\n".join(lines)


def cost_lines(costs) -> list[str]:
  """FLOPs per chip and the compiler's time estimate, per program and per RL step.

  ``costs``: (name, matmul FLOPs per chip of one run or None, runs per RL step, Program or None). The
  compiler's own FLOPs figure counts a loop body once (see ``launch/aot_tools/flops.py``), so it is shown apart.
  """
  lines = ["FLOPs per chip (matmuls, loops expanded) | XLA cost analysis (loop bodies counted once) | "
           "compiler's time estimate:"]
  total, total_s, have_s = 0.0, 0.0, True
  for name, f, per_step, prog in costs:
    xla = f"{prog.flops:10.3e}" if prog is not None and not prog.error else "       n/a"
    secs = prog.seconds if prog is not None and prog.seconds is not None and prog.seconds > 0 else None
    est = f"{secs * 1e3:9.2f} ms" if secs is not None else "      n/a"
    ours = f"{f:10.3e}" if f is not None else "  (above) "
    lines.append(f"  {name:<22s} {ours} | {xla} | {est}   x{per_step:g} per RL step")
    if f is not None:
      total += f * per_step
      if prog is not None:
        have_s = have_s and secs is not None
        total_s += (secs or 0.0) * per_step
  lines.append(f"  per RL step and chip: {total:.3e} FLOPs "
               "(the decode loop counted at all max_new_tokens - 1 forward passes)"
               + (f"; compiler's estimate of the log-prob and train programs {total_s:.3f} s" if have_s else
                  "; the compiler gives no time estimate for programs with loops"))
  return lines
