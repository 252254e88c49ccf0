"""Rewards in the launcher: every reward spec checked before anything is built (``check_specs``: fields, fault
policy, a function that resolves, reward-model and judge checkpoints; ``check_par``: PAR wrappers; ``check_process``:
process supervision's step rewards) and built (``reward_specs``, ``par_references``, ``step_rewards``)."""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from launch import builders, judge_setup, lora_setup
from rewards import combine


def fail(key: str, msg: str):
  raise SystemExit(f"config key '{key}': {msg}")


def check_specs(specs, key: str, *, tokenizer_vocab: int | None, text_only: bool = False,
                group_size: int = 0, data_source: str | None = None) -> None:
  """Every spec: known fields, unique names, a fault policy, a function that resolves (or a reward model)."""
  if not specs:
    fail(key, "needs at least one reward spec")
  fields = [f.name for f in dataclasses.fields(combine.RewardSpec)]
  seen = set()
  for i, r in enumerate(specs):
    k, spec = f"{key}[{i}]", dict(r)
    unknown = sorted(set(spec) - set(fields))
    if unknown or "name" not in spec or "fn" not in spec:
      fail(k, f"a reward spec has the fields {fields} (name and fn required); got {sorted(spec)}")
    if spec["name"] in seen:
      fail(f"{k}.name", f"{spec['name']!r} appears twice; reward names must be unique")
    seen.add(spec["name"])
    if spec.get("on_error", "raise") not in combine.ON_ERROR:
      fail(f"{k}.on_error", f"{spec['on_error']!r}; choose one of {combine.ON_ERROR}")
    if spec.get("par") is not None and key != "rewards":
      fail(f"{k}.par", "PAR scores the RL rollout's rewards against reference completions that the RL loop draws; "
           "only the specs of config key 'rewards' take it: drop par here")
    if spec["fn"] in judge_setup.FNS:
      if text_only:
        fail(f"{k}.fn", f"{spec['fn']!r} is a reward of the RL job; held-out evaluation takes text rewards")
      judge_setup.check(spec, k, group_size=group_size, num_devices=jax.device_count(), data_source=data_source)
      continue
    if spec["fn"] == "reward_model":
      if text_only:
        fail(f"{k}.fn", "'reward_model' scores sampled token rows; held-out evaluation takes text rewards")
      meta = reward_model_meta(spec, k)
      rm_vocab = meta["reward_model"]["model_config"]["vocab_size"]
      if tokenizer_vocab is not None and rm_vocab < tokenizer_vocab:
        fail(f"{k}.kwargs.path", f"the reward model embeds {rm_vocab} tokens but the policy's tokenizer has "
             f"{tokenizer_vocab}; the policy and the reward model must share a tokenizer")
      continue
    try:
      combine.resolve(spec["fn"])
    except (ValueError, ImportError, AttributeError) as e:
      fail(f"{k}.fn", str(e))


def reward_model_meta(spec: dict, key: str) -> dict:
  """The checkpoint meta of a ``fn="reward_model"`` spec's ``kwargs.path``; SystemExit when it is no RM run."""
  kwargs, name = dict(spec.get("kwargs", {})), spec.get("name")
  if "path" not in kwargs:
    fail(f"{key}.kwargs.path", f"reward {name!r} with fn='reward_model' needs kwargs.path, the reward-model "
         f"run's workdir")
  path = kwargs["path"]
  from rlj import rm_reward
  if kwargs.get("scalarize", "mean") not in rm_reward.SCALARIZE:
    fail(f"{key}.kwargs.scalarize", f"{kwargs['scalarize']!r}; choose one of {sorted(rm_reward.SCALARIZE)}")
  if kwargs.get("method", "preference") not in rm_reward.PAIRWISE_METHODS:
    fail(f"{key}.kwargs.method", f"{kwargs['method']!r}; choose one of {list(rm_reward.PAIRWISE_METHODS)}")
  unknown = sorted(set(kwargs) - {"path", "scalarize", "alpha", "pairwise", "method", "temperature"})
  if unknown:
    fail(f"{key}.kwargs", f"unknown keys {unknown}; a reward_model reward takes path, scalarize, alpha, pairwise, "
         f"method, temperature")
  train_one = "train one with `python -m launch.train --config configs/rm_bt.py` (or rm_iqn.py) and pass its workdir"
  if not os.path.isdir(path):
    fail(f"{key}.kwargs.path", f"reward model checkpoint {path!r} of reward {name!r} does not exist; {train_one}")
  try:
    meta = rm_reward.read_meta(rm_reward.checkpoint_dir(path))
  except Exception as e:  # noqa: BLE001 (orbax raises several kinds for a folder that is not a checkpoint)
    fail(f"{key}.kwargs.path", f"{path!r} of reward {name!r} holds no readable checkpoint ({e}); {train_one}")
  if "reward_model" not in meta:
    fail(f"{key}.kwargs.path", f"{path!r} of reward {name!r} is not a reward-model run (its checkpoint has no "
         f"reward_model record); {train_one}")
  return meta


def check_process(config, tokenizer_vocab: int | None) -> str:
  """``algo.advantage.estimator="process"`` (``rewards.steps``): its step reward specs, each an import string of a
  function that returns one reward per step or a reward model scoring prefixes, and no dynamic sampling (whose
  filter reads the outcome rewards)."""
  key = "algo.process.rewards"
  for i, r in enumerate(config.algo.process.rewards):
    fn, kwargs = dict(r).get("fn"), dict(dict(r).get("kwargs", {}))
    if fn == "reward_model" and kwargs.get("pairwise"):
      fail(f"{key}[{i}].kwargs.pairwise", "a step reward scores each step's prefix alone; set it False")
    if isinstance(fn, str) and ":" not in fn and fn != "reward_model":
      fail(f"{key}[{i}].fn", f"{fn!r} is a reward of whole completions; a step reward is 'package.module:function' "
           f"returning, per completion, one reward per step (rewards/steps.py), or 'reward_model' (kwargs.path) "
           f"scoring the prefix that ends each step")
  check_specs(config.algo.process.rewards, key, tokenizer_vocab=tokenizer_vocab)
  if config.train.dynamic_sampling.enabled:
    fail("train.dynamic_sampling.enabled", "its group filter reads the outcome rewards (rewards), which "
         "algo.advantage.estimator='process' does not train on; set it False")
  names = ", ".join(repr(dict(r)["name"]) for r in config.algo.process.rewards)
  return f"step rewards: {names}, steps split at {config.algo.process.separator!r}"


def check_par(config) -> str | None:
  """Preference As Reward wrappers (``par`` in a spec of ``rewards``; ``rewards/par.py``, ``rlj/par_refs.py``): their
  settings, a scalar reward to wrap, references the run can draw, one set of settings for all of them. Returns
  the line ``--show`` prints, or None when no reward has ``par``."""
  from rewards import par
  first = None
  for i, r in enumerate(config.rewards):
    spec = dict(r)
    if spec.get("par") is None:
      continue
    k = f"rewards[{i}].par"
    try:
      s = par.parse(spec["par"])
    except par.ParSettingError as e:
      fail(f"{k}.{e.key}" if e.key else k, e.message)
    pairwise = spec["fn"] == "pairwise_judge" or (spec["fn"] == "reward_model" and
                                                  dict(spec.get("kwargs", {})).get("pairwise", False))
    if pairwise:
      fail(k, f"reward {spec['name']!r} is a win rate within the prompt's group, already a preference and no score "
           f"of one completion that PAR could compare with a reference's; drop par, or wrap a pointwise reward")
    g = config.sampler.num_generations
    if s.decode == "sample" and s.num_refs > g:
      fail(f"{k}.num_refs", f"{s.num_refs} sampled references are drawn as one rollout of the reference policy, "
           f"which has sampler.num_generations={g} completions per prompt; use num_refs <= {g}")
    if s.source == "reference" and not (builders.loop_config(config).use_reference
                                        or lora_setup.lora_config(config) is not None):
      fail(f"{k}.source", "'reference' draws the references from the frozen initial policy, and this run keeps none "
           f"(algo.name={config.algo.name!r} with these algo.kwargs uses no reference, and model.lora is off); set "
           "algo.kwargs.kl_coef > 0, use model.lora, or par.source='policy' (the policy at the step a prompt is "
           "first seen)")
    if first is not None and s != first[1]:
      fail(k, f"{s} differs from {first[0]}: {first[1]}; every PAR reward scores one shared set of reference "
           f"completions, so give them the same num_refs, decode and source")
    first = first or (k, s)
  if first is None:
    return None
  s = first[1]
  refs = "the greedy completion" if s.decode == "greedy" else f"{s.num_refs} sampled completions"
  who = "the frozen initial policy" if s.source == "reference" else "the policy when the prompt is first seen"
  return f"PAR references: {refs} of {who}, once per prompt"


def reward_specs(config, env=None) -> list[dict]:
  """The config's reward list; ``fn="reward_model"`` serves a trained rlj reward model (kwargs: ``path``,
  optional ``scalarize`` and ``alpha``) that scores the sampled token rows; ``fn="pairwise_judge"`` /
  ``"rubric_judge"`` a judge language model on ``env``'s mesh (``launch/judge_setup.py``)."""
  from launch import judge_setup
  specs = []
  for r in config.rewards:
    spec = dict(r)
    if spec["fn"] in judge_setup.FNS:
      fn = judge_setup.build(spec, mesh=env.mesh if env else None, rules=env.rules if env else None)
      spec.pop("kwargs", None)
      spec["fn"] = fn
    elif spec["fn"] == "reward_model":
      from rlj import rm_reward  # validate() checked kwargs.path
      kwargs = dict(spec.pop("kwargs", {}))
      path = kwargs.pop("path")
      spec["fn"] = rm_reward.reward_model_fn(path, **kwargs)
    specs.append(spec)
  return specs


def par_references(config, env, reward_fns, sampler):
  """The reference rewards of the PAR rewards (specs with ``par``; ``rlj.par_refs.ParReferences``), None when there
  are none. Greedy references get a sampler of their own (one greedy completion per prompt); sampled ones come
  from the rollout's ``sampler``."""
  from rewards import par
  pars = [(name, fn) for name, fn in reward_fns if isinstance(fn, par.ParReward)]
  if not pars:
    return None
  from rlj import par_refs
  if pars[0][1].settings.decode == "greedy":
    sampler = builders.make_sampler(config, env, greedy=True, num_samples=1)
  return par_refs.ParReferences(pars, sampler=sampler, tokenizer=env.tokenizer)


def step_rewards(config):
  """Process supervision's step reward functions (``algo.process``, ``rewards.steps.StepRewards``) when
  ``algo.advantage.estimator`` is "process"; None otherwise. ``fn="reward_model"`` (kwargs ``path``, optional
  ``scalarize`` and ``alpha``) scores each step's prefix with a trained reward model
  (``rlj.rm_reward.make_step_reward_fn``)."""
  if config.algo.advantage.get("estimator") != "process":
    return None
  from rewards import steps
  specs = [dict(r) for r in config.algo.process.rewards]
  for spec in specs:
    if spec["fn"] == "reward_model":    # a trained reward model scoring the prefix that ends each step
      from rlj import rm_reward  # validate() checked kwargs.path
      kwargs = dict(spec.pop("kwargs", {}))
      spec["fn"] = rm_reward.step_reward_model_fn(kwargs.pop("path"), **kwargs)
  weights = np.array([float(s.get("weight", 1.0)) for s in specs], np.float32)
  return steps.StepRewards(combine.build(specs), weights, str(config.algo.process.separator))
