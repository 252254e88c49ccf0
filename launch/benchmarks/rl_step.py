r"""RL-step case: one full GRPO step of the runlocal config, broken down with the trainer's own timers.

The trainer is built exactly as ``launch/train.py`` builds it (``launch.builders.build_env``,
``rl_components``, ``loop_config``, ``rlj.rl_loop.Trainer``), from ``configs/grpo_tpu.py:runlocal`` with the
SFT cold start and evaluation switched off (they are not part of an RL step) and a scratch policy. After
``warmup`` steps (compilation), ``steps`` timed steps run; ``rlj.rl_loop`` records per step

  time/sample      rollout: the compiled sampler and the device -> host copy of its outputs,
  time/reward      host reward functions (detokenise, extract, compare),
  time/reference   old/reference log-prob forward passes (none in runlocal GRPO: kl_coef = 0),
  time/update      minibatch host->device copies and the jitted train steps,
  time/host_overhead = time/step - sample - reference - update (so it includes the reward),

and this case adds the fraction of wall time that is not model compute, (step - sample - reference -
update) / step.

  python -m launch.bench --case rl_step --steps 3

Another shape and where old log-probs come from (``train.old_logp``): ``--model`` takes a preset (its own
vocabulary; sampled ids past the tokenizer's decode to nothing), ``--batch`` prompts x 8 completions,
``--seq`` prompt bucket, ``--new_tokens``, ``--old_logp`` (with one minibatch, so the update is on-policy: ``auto``
then skips the rollout's trainer log-prob pass, ``time/reference``, that ``recompute`` runs):

  python -m launch.bench --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --old_logp recompute
  python -m launch.bench --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --old_logp auto

``--lengths skewed`` cuts each sampled completion to a length spread evenly between 10% and 100% of
``--new_tokens`` (one length per row, shuffled per step; the sampler still decodes every step, so
``time/sample`` does not change), the length-skewed rollout of reasoning RL, on which ``train.packing`` runs the
log-prob passes and updates on the rows' real tokens only:

  python -m launch.bench --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --lengths skewed
  python -m launch.bench --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --lengths skewed \
      --set train.packing=True

Every row also gives the step's useful FLOPs (model FLOPs on real tokens only: the sampler's forward, each
log-prob pass and the update's forward + backward over each row's real prompt and completion tokens, with
causal attention and the completion's logits; ``useful_flops``) over the step's time, as a fraction of the
matmul peak measured in the same process (``launch.bench.matmul_peak``).

``--ab KEY=VALUE`` (repeatable) runs the case twice in one process, as given (A) and with these overrides too
(B), one RL step of each in turn, so that a change in the machine's speed hits both alike; B's row gives its
step time over A's:

  python -m launch.bench --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --lengths skewed \
      --set model.overrides.scan_unroll=1 --ab train.packing=True --ab model.overrides.scan_unroll=0

``--set KEY=VALUE`` (repeatable) overrides any other key, e.g. the algorithm and its KL coefficient (a positive
``kl_coef`` keeps a reference copy of the policy, as ``launch.train`` does, and times its log-prob pass):

  python -m launch.bench --case rl_step --set algo.kwargs.kl_coef=0.04 --set algo.name=gdpo
"""
from __future__ import annotations

import argparse
import ast
import os
import tempfile
import time

import numpy as np

from configs import grpo_tpu

KEYS = ("time/sample", "time/reward", "time/reference", "time/update", "time/host_overhead", "time/step")


class _NullWriter:
  """The loop's metrics sink, discarding everything (the bench reads the returned history)."""

  def write(self, step, metrics):
    del step, metrics

  def close(self):
    pass


def runlocal_config(*, total_steps: int, overrides: dict | None = None):
  """``grpo_tpu.py:runlocal`` as one RL stage: scratch policy, no SFT, no evaluation or checkpoints."""
  c = grpo_tpu.get_config("runlocal")
  c.init.policy = "scratch"
  c.sft.steps = 0
  c.train.total_steps = total_steps
  c.train.eval_every = 0
  c.train.ckpt_every = 0
  c.eval.num_prompts = 0
  c.lock()   # an override of a key the config does not have fails instead of adding it
  for key, value in (overrides or {}).items():
    node = c
    *path, leaf = key.split(".")
    try:
      for part in path:
        node = node[part]
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      why = str(e.args[0] if isinstance(e, KeyError) and e.args else e).replace("\n", "; ")
      raise SystemExit(f"rl_step override {key}={value!r}: no such key ({why}); the keys are those of "
                       f"configs/grpo_tpu.py:runlocal (python -m launch.train --config "
                       f"configs/grpo_tpu.py:runlocal --show)") from None
  return c


class _Rollouts:
  """The trainer's sampler, recording each rollout's real prompt and completion tokens per row; with ``skewed``
  it first cuts row n's completion to ``lengths[n]`` tokens (``skewed_lengths``)."""

  def __init__(self, inner, skewed: bool):
    self.inner, self.skewed, self.real = inner, skewed, []
    self.calls = 0

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def sample(self, params, prompt_tokens, prompt_mask, rng, **kw):
    ro = self.inner.sample(params, prompt_tokens, prompt_mask, rng, **kw)
    if self.skewed:
      ro = cut(ro, skewed_lengths(ro.mask.shape[0], ro.mask.shape[1], seed=self.calls),
               pad_id=self.inner.config.pad_id)
    self.calls += 1
    self.real.append(ro)    # read in ``real_tokens``, after the step: reading it here would wait for the sampler
    return ro

  def real_tokens(self, first: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rollouts ``first .. first + count - 1``: each row's real prompt and completion tokens."""
    return [(np.asarray(ro.prompt_mask).sum(1), np.asarray(ro.mask).sum(1))
            for ro in self.real[first:first + count]]


def skewed_lengths(rows: int, t: int, *, seed: int) -> np.ndarray:
  """Completion lengths spread evenly between 10% and 100% of ``t`` (shuffled with ``seed``)."""
  lengths = np.rint(np.linspace(0.1 * t, t, rows)).astype(np.int32)
  return np.random.default_rng(seed).permutation(np.maximum(lengths, 1))


def cut(ro, lengths: np.ndarray, *, pad_id: int):
  """Rollout ``ro`` with row n's completion cut after ``min(lengths[n], its length)`` tokens (on the host: it waits
  for the sampler; the same cut as jnp ops on the device made the packed updates after it measurably slower)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mask = np.asarray(ro.mask)
  t = mask.shape[1]
  keep = (np.arange(t)[None] < np.minimum(lengths, mask.sum(1))[:, None]) & (mask > 0)
  completion = np.where(keep, np.asarray(ro.completion), pad_id)
  p = ro.tokens.shape[1] - t
  tokens = np.concatenate([np.asarray(ro.tokens)[:, :p], completion], 1)
  attn = np.concatenate([np.asarray(ro.attn_mask)[:, :p], keep.astype(np.asarray(ro.attn_mask).dtype)], 1)
  return ro._replace(tokens=jnp.asarray(tokens), completion=jnp.asarray(completion),
                     logp=jnp.asarray(np.where(keep, np.asarray(ro.logp), 0)),
                     mask=jnp.asarray(keep.astype(np.asarray(ro.mask).dtype)),
                     lengths=jnp.asarray(keep.sum(1).astype(np.int32)), attn_mask=jnp.asarray(attn))


def useful_flops(mc, real: tuple[np.ndarray, np.ndarray], *, logp_passes: int, epochs: int) -> float:
  """One RL step's model FLOPs on real tokens (``real``: each row's prompt and completion tokens): the sampler's
  forward, ``logp_passes`` teacher-forced forwards and ``epochs`` forward + backward passes (3x the forward), by
  ``launch.benchmarks.train_step.forward_flops``."""
  from launch.benchmarks import train_step as ts_bench  # pylint: disable=g-import-not-at-top
  return float(ts_bench.forward_flops(mc, *real) * (1 + logp_passes + 3 * epochs))


class _Run:
  """One trainer of the case, built as ``launch.train`` builds it, stepped one RL step at a time."""

  def __init__(self, config, workdir: str, skewed: bool):
    from launch import builders  # pylint: disable=g-import-not-at-top
    from rlj import rl_loop  # pylint: disable=g-import-not-at-top
    self.config = config
    self.env = env = builders.build_env(config, workdir)
    data = builders.prompt_iterator(config, env, split="train", batch_prompts=config.train.batch_prompts,
                                    seed=config.seed)
    start = builders.rl_start(config, env, env.params, workdir)    # as launch.train starts RL (LoRA included)
    comps = builders.rl_components(config, env, data, _NullWriter(), lora=start.lora,
                                   state_shardings=start.state_shardings)
    comps.sampler = self.rollouts = _Rollouts(comps.sampler, skewed)
    self.lc = builders.loop_config(config, env.tokenizer.pad_id)
    self.trainer = rl_loop.Trainer(comps, self.lc)
    self.state, self.ref = start.state, start.ref_params
    self.history: list[dict] = []

  def step(self, i: int, count: int = 1) -> None:
    """RL steps ``i .. i + count - 1`` in one ``run`` call."""
    self.state, self.ref, h = self.trainer.run(self.state, self.ref, start_step=i, end_step=i + count)
    self.history += h

  def summary(self, warmup: int, steps: int) -> tuple[dict, dict]:
    timed = self.history[warmup:warmup + steps]
    means = {k: float(np.mean([h[k] for h in timed])) for k in KEYS}
    means["sampled_tokens"] = float(np.mean([h["sampled_tokens"] for h in timed]))
    lc, config = self.lc, self.config
    passes = int(lc.old_logp_source == "recompute") + int(lc.use_reference)
    flops = [useful_flops(self.env.model_config, real, logp_passes=passes, epochs=lc.num_epochs)
             for real in self.rollouts.real_tokens(warmup, steps)]
    means["useful_flops"] = float(np.mean(flops))
    means["fill"] = float(np.mean([h.get("packing/fill", np.nan) for h in timed]))
    facts = {"prompts x G": f"{config.train.batch_prompts} x {config.sampler.num_generations}",
             "old_logp": lc.old_logp_source,
             "new tokens": config.sampler.max_new_tokens, "minibatches": config.train.num_minibatches,
             "params": self.env.model_config.num_params()}
    return means, facts


def measure_many(configs: list[dict], *, steps: int, warmup: int = 2,
                 skewed: bool = False) -> list[tuple[dict, dict]]:
  """Runs ``warmup + steps`` RL steps of each override set, one step of each in turn (so that a change in the
  machine's speed during the case hits every set alike); returns (mean seconds per key over the timed steps,
  config facts) per set. A set with ``train.sample_ahead`` leaves device work running when its step returns, which
  the next set's step would wait for: then each set runs its steps in one go, one set after the other."""
  from launch import checks  # pylint: disable=g-import-not-at-top
  built = [runlocal_config(total_steps=warmup + steps + 1, overrides=o) for o in configs]
  for config in built:
    checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    dirs = [os.path.join(workdir, str(k)) for k in range(len(built))]
    for d in dirs:
      os.makedirs(d)
    runs = [_Run(config, d, skewed) for config, d in zip(built, dirs)]
    if any(config.train.get("sample_ahead", False) for config in built):
      for r in runs:   # one step more: with sample_ahead a step's time runs to the end of the next step's rewards
        r.step(0, warmup + steps + 1)
    else:
      for i in range(warmup + steps):
        for r in runs:
          r.step(i)
  return [r.summary(warmup, steps) for r in runs]


def measure(*, steps: int, warmup: int = 2, overrides: dict | None = None,
            skewed: bool = False) -> tuple[dict, dict]:
  """Runs ``warmup + steps`` RL steps; returns (mean seconds per key over the timed steps, config facts)."""
  return measure_many([overrides or {}], steps=steps, warmup=warmup, skewed=skewed)[0]


def breakdown_row(means: dict) -> dict:
  step = means["time/step"]
  non_model = step - means["time/sample"] - means["time/reference"] - means["time/update"]
  row = {k.split("/")[1] + " ms": means[k] * 1e3 for k in KEYS}
  row.update({"host overhead %": 100 * means["time/host_overhead"] / step, "not model compute %": 100 * non_model / step,
              "sampled tokens/s": means["sampled_tokens"] / step})
  if "useful_flops" in means:
    row["useful GFLOP"] = means["useful_flops"] / 1e9
    if means.get("peak"):
      row["useful FLOPs / peak %"] = 100 * means["useful_flops"] / step / means["peak"]
  return row


def slow_reward(prompts, completions, *, seconds: float = 0.0, **_) -> np.ndarray:
  """A reward that waits ``seconds`` per call and scores 0 (``--reward_ms``): an expensive host reward, a code runner
  or an HTTP judge, whose wait releases the host while the device works. Added to the config's rewards, it leaves
  the advantages as they were (a constant)."""
  del prompts
  time.sleep(seconds)
  return np.zeros(len(completions), np.float32)


def shape_overrides(args: argparse.Namespace) -> dict:
  """Config overrides for ``--model`` / ``--batch`` / ``--seq`` / ``--new_tokens`` / ``--old_logp``."""
  out = {}
  if getattr(args, "model", None):
    out.update({"model.preset": args.model, "model.vocab_from_tokenizer": False,
                "model.overrides": dict(param_dtype="float32", dtype=args.dtype or "float32", remat=False)})
  if getattr(args, "batch", None):
    out["train.batch_prompts"] = args.batch
  if getattr(args, "seq", None):
    out["data.buckets"] = (args.seq,)
  if getattr(args, "new_tokens", None):
    out["sampler.max_new_tokens"] = args.new_tokens
  for item in getattr(args, "set", None) or []:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: give KEY=VALUE, e.g. --set algo.kwargs.kl_coef=0.04")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value    # a bare string, e.g. --set algo.name=gdpo
  if getattr(args, "reward_ms", 0.0):
    slow = {"name": "slow", "fn": "launch.benchmarks.rl_step:slow_reward", "kwargs": {"seconds": args.reward_ms / 1e3}}
    out["rewards"] = tuple(grpo_tpu.get_config("runlocal").rewards) + (slow,)
  old_logp = getattr(args, "old_logp", None)
  if old_logp:   # one epoch of one minibatch (on-policy), so the settings differ only in the log-prob pass
    out["train.old_logp"] = old_logp
    out["train.num_minibatches"] = 1
  return out


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  from launch import bench  # pylint: disable=g-import-not-at-top
  steps = args.steps or 5
  overrides = shape_overrides(args)
  skewed = getattr(args, "lengths", "sampled") == "skewed"
  sets = [overrides]
  ab = getattr(args, "ab", None) or []
  if ab:   # the same case again with these overrides, its steps interleaved with the first's
    sets.append({**overrides, **shape_overrides(argparse.Namespace(set=ab))})
  results = measure_many(sets, steps=steps, skewed=skewed)
  peak = bench.matmul_peak(getattr(args, "dtype", None) or "float32")
  rows, fills = [], []
  for (means, facts), o in zip(results, sets):
    means["peak"] = peak
    facts["lengths"] = "skewed" if skewed else "sampled"
    facts["packing"] = bool(o.get("train.packing", False))
    if ab:
      facts["set"] = "A" if o is overrides else "B: " + " ".join(ab)
    rows.append({**facts, **breakdown_row(means)})
    fills.append(f"{means['fill']:.0%}" if np.isfinite(means["fill"]) else None)
  if ab:
    rows[1]["step vs A"] = rows[1]["step ms"] / rows[0]["step ms"]
  notes = [f"configs/grpo_tpu.py:runlocal (init.policy=scratch, no SFT, no eval); mean of {steps} steps after 2 "
           "warm-up steps; timers from rlj.rl_loop (host overhead = step - sample - reference - update, reward "
           "included)." + (f" Overrides: {overrides}." if overrides else "")
           + ((" A and B run in one process, one after the other." if any(o.get("train.sample_ahead") for o in sets)
               else " A and B run in one process, one RL step of each in turn.") if ab else "")]
  notes.append(f"In-process matmul peak: {peak / 1e9:.0f} GFLOP/s; useful FLOPs count real tokens only "
               "(launch/benchmarks/rl_step.py useful_flops)"
               + "".join(f"; packed slots filled{' (' + r.get('set', '')[:1] + ')' if ab else ''}: {f}"
                         for r, f in zip(rows, fills) if f) + ".")
  return rows, notes
