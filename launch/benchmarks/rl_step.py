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

``--set KEY=VALUE`` (repeatable) overrides any other key, e.g. the algorithm and its KL coefficient (a positive
``kl_coef`` keeps a reference copy of the policy, as ``launch.train`` does, and times its log-prob pass):

  python -m launch.bench --case rl_step --set algo.kwargs.kl_coef=0.04 --set algo.name=gdpo
"""
from __future__ import annotations

import argparse
import ast
import tempfile

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


def measure(*, steps: int, warmup: int = 2, overrides: dict | None = None) -> tuple[dict, dict]:
  """Runs ``warmup + steps`` RL steps; returns (mean seconds per key over the timed steps, config facts)."""
  from launch import builders, checks  # pylint: disable=g-import-not-at-top
  from rlj import rl_loop  # pylint: disable=g-import-not-at-top
  config = runlocal_config(total_steps=warmup + steps, overrides=overrides)
  checks.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    env = builders.build_env(config, workdir)
    data = builders.prompt_iterator(config, env, split="train", batch_prompts=config.train.batch_prompts,
                                    seed=config.seed)
    start = builders.rl_start(config, env, env.params, workdir)    # as launch.train starts RL (LoRA included)
    comps = builders.rl_components(config, env, data, _NullWriter(), lora=start.lora,
                                   state_shardings=start.state_shardings)
    trainer = rl_loop.Trainer(comps, builders.loop_config(config, env.tokenizer.pad_id))
    _, _, history = trainer.run(start.state, start.ref_params, start_step=0)
  timed = history[warmup:]
  means = {k: float(np.mean([h[k] for h in timed])) for k in KEYS}
  means["sampled_tokens"] = float(np.mean([h["sampled_tokens"] for h in timed]))
  facts = {"prompts x G": f"{config.train.batch_prompts} x {config.sampler.num_generations}",
           "new tokens": config.sampler.max_new_tokens, "minibatches": config.train.num_minibatches,
           "params": env.model_config.num_params()}
  return means, facts


def breakdown_row(means: dict) -> dict:
  step = means["time/step"]
  non_model = step - means["time/sample"] - means["time/reference"] - means["time/update"]
  row = {k.split("/")[1] + " ms": means[k] * 1e3 for k in KEYS}
  row.update({"host overhead %": 100 * means["time/host_overhead"] / step, "not model compute %": 100 * non_model / step,
              "sampled tokens/s": means["sampled_tokens"] / step})
  return row


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
  old_logp = getattr(args, "old_logp", None)
  if old_logp:   # one epoch of one minibatch (on-policy), so the settings differ only in the log-prob pass
    out["train.old_logp"] = old_logp
    out["train.num_minibatches"] = 1
  return out


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  steps = args.steps or 5
  overrides = shape_overrides(args)
  means, facts = measure(steps=steps, overrides=overrides)
  facts["old_logp"] = overrides.get("train.old_logp", "sampler")
  notes = [f"configs/grpo_tpu.py:runlocal (init.policy=scratch, no SFT, no eval); mean of {steps} steps after 2 "
           "warm-up steps; timers from rlj.rl_loop (host overhead = step - sample - reference - update, reward "
           "included)." + (f" Overrides: {overrides}." if overrides else "")]
  return [{**facts, **breakdown_row(means)}], notes
