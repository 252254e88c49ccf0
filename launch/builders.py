"""Config -> objects: validation, mesh, tokenizer, data, model, params, samplers, rewards.

Everything that reads an ml_collections config for the RL / SFT jobs lives here or in ``launch/train.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import grpo
from algorithms import kl as kl_lib
from models import presets
from models.config import ModelConfig
from models.transformer import Transformer
from rewards import combine
from rlj import checkpoint, rl_algos, rl_loop, sharding, train_state
from rlj.sampler import Sampler, SamplerConfig

GROUP_ALGOS = ("grpo", "gdpo")


# ------------------------------------------------------------------------------------------------------------
# Validation (before any compilation)
# ------------------------------------------------------------------------------------------------------------

def fail(key: str, msg: str):
  """Stops the launch with a message that names the config key (and says how to fix it)."""
  raise SystemExit(f"config key '{key}': {msg}")


def validate(config) -> None:
  """Checks an RL / SFT config before anything is built or compiled; raises SystemExit naming the key and fix.

  Covers the algorithm table, group sizes, the mesh against the device count, the sharding rules against the
  mesh, batch sizes against the data-parallel size, init / tokenizer / data choices and files, the
  tokenizer's vocabulary against the model's, and every reward spec (function names, fault policy, reward-model
  checkpoints). Only files are read (the tokenizer, an HF config.json, a reward model's checkpoint meta).
  """
  if config.job not in ("rl", "sft"):
    return
  if config.job == "rl":
    _check_algo(config)
  dp = _check_mesh_and_rules(config)
  _check_batches(config, dp)
  _check_sources(config)
  tokenizer_vocab = _check_vocab(config)
  if config.job == "rl":
    _check_rewards(config.rewards, "rewards", tokenizer_vocab=tokenizer_vocab)
  if config.eval.num_prompts:
    _check_rewards(config.eval.rewards, "eval.rewards", tokenizer_vocab=tokenizer_vocab, text_only=True)


def _check_algo(config) -> None:
  a, g = config.algo, config.sampler.num_generations
  if a.name not in rl_algos.ALGORITHMS:
    fail("algo.name", f"unknown algorithm {a.name!r}; choose one of {sorted(rl_algos.ALGORITHMS)}")
  if a.name in GROUP_ALGOS + ("dno",) and g < 2:
    fail("sampler.num_generations", f"{a.name} compares completions of a prompt: needs >= 2, got {g}")
  if a.name == "p3o" and g % 2:
    fail("sampler.num_generations", f"p3o pairs completions: needs an even number, got {g}")
  kind = a.kwargs.get("kl_estimator", None)
  if kind is not None and kind not in kl_lib.KINDS:
    fail("algo.kwargs.kl_estimator", f"unknown estimator {kind!r}; choose one of {kl_lib.KINDS}")
  if a.name in GROUP_ALGOS:
    if a.advantage.scale not in grpo.SCALES:
      fail("algo.advantage.scale", f"{a.advantage.scale!r}; choose one of {grpo.SCALES}")
    if a.advantage.estimator not in ("grpo", "rloo"):
      fail("algo.advantage.estimator", f"{a.advantage.estimator!r}; choose grpo | rloo")
  s = config.sampler
  if s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or s.max_new_tokens < 1:
    fail("sampler", f"needs temperature > 0 (got {s.temperature}), 0 < top_p <= 1 (got {s.top_p}), top_k >= 0 "
         f"(got {s.top_k}) and max_new_tokens >= 1 (got {s.max_new_tokens})")


def _check_mesh_and_rules(config) -> int:
  """Resolves the mesh on this machine's devices, checks the rules' axes; returns the data-parallel size."""
  try:
    mesh_names, mesh_sizes = sharding.resolve_mesh_shape([tuple(x) for x in config.mesh], jax.device_count())
  except ValueError as e:
    fail("mesh", str(e))
  logical = {name for name, _ in sharding.DEFAULT_RULES}
  batch_axes = ()
  for i, (name, axes) in enumerate(config.sharding_rules):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if name not in logical:
      fail(f"sharding_rules[{i}]", f"unknown logical axis {name!r}; the models name {sorted(logical)}")
    unknown = [a for a in axes if a not in mesh_names]
    if unknown:
      fail(f"sharding_rules[{i}]", f"{name!r} maps to mesh axes {unknown} that config key 'mesh' does not have "
           f"({list(mesh_names)}); use those names or None")
    if name == "batch":
      batch_axes = axes
  dp = int(np.prod([size for name, size in zip(mesh_names, mesh_sizes) if name in batch_axes]))
  if dp % jax.process_count():
    fail("mesh", f"the batch axes ({dp} ways) must split evenly over {jax.process_count()} processes")
  return dp


def _check_batches(config, dp: int) -> None:
  t = config.train
  if config.job == "rl":
    if t.num_minibatches < 1 or t.num_microbatches < 1:
      fail("train.num_minibatches", f"num_minibatches ({t.num_minibatches}) and num_microbatches "
           f"({t.num_microbatches}) must be >= 1")
    rows = t.batch_prompts * config.sampler.num_generations * jax.process_count()
    unit = rl_algos.ALGORITHMS[config.algo.name].unit
    per_mb = rows // t.num_minibatches
    if config.algo.name != "dno" and (rows % t.num_minibatches or per_mb % dp):
      fail("train.batch_prompts", f"{rows} rows (batch_prompts x num_generations) must split into "
           f"train.num_minibatches={t.num_minibatches} minibatches of a multiple of the data-parallel size {dp}")
    if per_mb % (t.num_microbatches * unit):
      fail("train.num_microbatches", f"a minibatch of {per_mb} rows does not split into "
           f"{t.num_microbatches} micro-batches of whole {'pairs' if unit == 2 else 'rows'}")
  runs_sft = config.job == "sft" or config.init.policy == "sft"
  if runs_sft and config.sft.steps and (config.sft.batch_prompts * jax.process_count()) % dp:
    fail("sft.batch_prompts", f"{config.sft.batch_prompts} prompts per step must be a multiple of the "
         f"data-parallel size {dp}")


def _check_sources(config) -> None:
  if config.init.policy not in ("scratch", "hf", "rlj", "sft"):
    fail("init.policy", f"{config.init.policy!r}; choose scratch | hf | rlj | sft")
  if config.init.policy in ("hf", "rlj") and not os.path.isdir(config.init.path):
    fail("init.path", f"{config.init.path!r} is not a directory (needed by init.policy={config.init.policy!r})")
  if config.init.policy == "hf" and not os.path.isfile(os.path.join(config.init.path, "config.json")):
    fail("init.path", f"{config.init.path!r} has no config.json: init.policy='hf' needs a Hugging Face model folder")
  t = config.tokenizer
  if t.kind not in ("sentencepiece", "train_synthetic"):
    fail("tokenizer.kind", f"{t.kind!r}; choose sentencepiece | train_synthetic")
  if t.kind == "sentencepiece" and not os.path.isfile(t.path):
    fail("tokenizer.path", f"{t.path!r} is not a sentencepiece .model file")
  if t.kind == "train_synthetic" and t.vocab_size < 8:
    fail("tokenizer.vocab_size", f"train_synthetic needs the vocabulary size to train, got {t.vocab_size}")
  if config.data.source not in ("synthetic", "gsm8k", "generic"):
    fail("data.source", f"{config.data.source!r}; choose synthetic | gsm8k | generic")
  if config.init.policy != "hf":
    try:
      presets.get(config.model.preset)
    except ValueError as e:
      fail("model.preset", str(e))


def _check_vocab(config) -> int | None:
  """Checks that the model's embedding covers the tokenizer (larger is fine: padding up); returns the
  tokenizer's vocabulary size when a file gives it (None for ``train_synthetic``)."""
  t = config.tokenizer
  if t.kind == "sentencepiece":
    from rlj.data import tokenizer as tok_lib
    vocab = tok_lib.Tokenizer.from_file(t.path).vocab_size
    pieces = f"the tokenizer has {vocab} pieces"
  else:  # train_synthetic trains at most tokenizer.vocab_size pieces
    vocab = int(t.vocab_size)
    pieces = f"tokenizer.vocab_size allows up to {vocab} pieces"
  if config.init.policy == "hf":
    with open(os.path.join(config.init.path, "config.json")) as f:
      model_vocab = int(json.load(f)["vocab_size"])
    if model_vocab < vocab:
      fail("tokenizer.path", f"{pieces} but the checkpoint in init.path embeds only {model_vocab}; use the "
           f"tokenizer that came with the checkpoint")
  elif not config.model.vocab_from_tokenizer:
    model_vocab = int(dict(config.model.overrides).get("vocab_size", presets.get(config.model.preset).vocab_size))
    if model_vocab < vocab:
      fail("model.vocab_from_tokenizer", f"model {config.model.preset!r} embeds {model_vocab} tokens but "
           f"{pieces}; set model.vocab_from_tokenizer=True (or a model.overrides.vocab_size >= {vocab}), or "
           f"use the tokenizer that matches the preset")
  return vocab if t.kind == "sentencepiece" else None


def _check_rewards(specs, key: str, *, tokenizer_vocab: int | None, text_only: bool = False) -> None:
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


# ------------------------------------------------------------------------------------------------------------
# Environment: mesh, tokenizer, model, state
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Env:
  mesh: Any
  rules: Any
  tokenizer: Any
  model_config: ModelConfig
  model: Any
  tx: Any
  sft_tx: Any
  state: Any
  state_shardings: Any
  param_shardings: Any
  use_reference: bool


def build_tokenizer(config, workdir: str):
  from rlj.data import synthetic, tokenizer as tok_lib  # data extras (sentencepiece)
  t = config.tokenizer
  if t.kind == "sentencepiece":
    return tok_lib.Tokenizer.from_file(t.path)
  if t.kind != "train_synthetic":
    raise SystemExit(f"config key 'tokenizer.kind': {t.kind!r}; choose sentencepiece | train_synthetic")
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return tok_lib.Tokenizer.from_file(path)
  task = synthetic.ArithmeticTask(num_records=t.train_records, seed=config.data.seed, levels=tuple(config.data.levels))
  corpus = []
  for i in range(len(task)):
    r = task[i]
    corpus += [config.data.template.format(prompt=r["prompt"]), r["answer"]]
  tok = tok_lib.train(corpus, vocab_size=t.vocab_size, byte_fallback=False)
  if jax.process_index() == 0:
    tok.save(path)
  return tok


def model_config(config, vocab_size: int) -> ModelConfig:
  base = presets.get(config.model.preset)
  overrides = dict(config.model.overrides)
  if config.model.vocab_from_tokenizer:
    overrides["vocab_size"] = vocab_size
  mc = dataclasses.replace(base, **overrides)
  if mc.vocab_size < vocab_size:
    raise SystemExit(f"config key 'model': the model's vocabulary ({mc.vocab_size}) is smaller than the "
                     f"tokenizer's ({vocab_size}); set model.vocab_from_tokenizer=True or use the matching "
                     f"tokenizer")
  return mc


def build_env(config, workdir: str) -> Env:
  mesh = sharding.make_mesh([tuple(x) for x in config.mesh])
  rules = [tuple(r) for r in config.sharding_rules]
  tokenizer = build_tokenizer(config, workdir)
  if config.init.policy == "hf":
    from models import hf
    mc, params = hf.load_hf_checkpoint(config.init.path, mesh=mesh, rules=rules)
    mc = dataclasses.replace(mc, **{k: v for k, v in dict(config.model.overrides).items() if k != "vocab_size"})
  else:
    mc, params = model_config(config, tokenizer.vocab_size), None
  model = Transformer(mc)
  if params is None:
    dummy = jnp.zeros((1, 8), jnp.int32)
    init = lambda rng: model.init(rng, dummy, dummy, jnp.ones_like(dummy))["params"]  # noqa: E731
    params, param_shardings = sharding.sharded_init(init, mesh, rules, jax.random.key(config.seed))
  else:  # the loader already placed every tensor on its sharding
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
  if config.init.policy == "rlj":
    params, _ = checkpoint.restore_params(config.init.path, params)
  tx = train_state.make_optimizer(train_state.OptimConfig(**config.optim.to_dict()))
  sft_tx = train_state.make_optimizer(train_state.OptimConfig(**config.sft.optim.to_dict()))
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = train_state.state_shardings(param_shardings, tx, abstract_params, mesh)
  state = jax.jit(lambda p: train_state.TrainState.create(p, tx), out_shardings=state_sh)(params)
  use_ref = config.job == "rl" and (config.algo.name == "dno" or float(config.algo.kwargs.get("kl_coef", 0.0)) > 0)
  return Env(mesh=mesh, rules=rules, tokenizer=tokenizer, model_config=mc, model=model, tx=tx, sft_tx=sft_tx,
             state=state, state_shardings=state_sh, param_shardings=param_shardings, use_reference=use_ref)


def ckpt_tree(state, ref_params=None) -> dict:
  tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
  if ref_params is not None:
    tree["ref_params"] = ref_params
  return tree


def state_from_tree(state, tree):
  return state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

def prompt_source(config, split: str):
  from rlj.data import synthetic, tfds_builders
  d = config.data
  if d.source == "synthetic":
    n = d.train_records if split == "train" else d.eval_records
    seed = d.seed if split == "train" else d.seed + 1000003
    return synthetic.ArithmeticTask(num_records=n, seed=seed, levels=tuple(d.levels))
  if d.source in ("gsm8k", "generic"):
    if d.source_dir:
      tfds_builders.build("prompt_answer", d.source, source_dir=d.source_dir, data_dir=d.data_dir)
    return tfds_builders.data_source("prompt_answer", d.source, data_dir=d.data_dir,
                                     split=d.train_split if split == "train" else d.eval_split)
  raise SystemExit(f"config key 'data.source': {d.source!r}; choose synthetic | gsm8k | generic")


def prompt_iterator(config, env: Env, *, split: str, batch_prompts: int, seed: int, num_epochs=None,
                    shuffle: bool = True, drop_remainder: bool = True):
  from rlj.data import pipeline
  pc = pipeline.PipelineConfig(batch_size=batch_prompts, buckets=tuple(config.data.buckets),
                               template=config.data.template, add_bos=config.data.add_bos,
                               overflow=config.data.overflow, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                               drop_remainder=drop_remainder, num_workers=config.data.num_workers)
  return pipeline.prompt_pipeline(prompt_source(config, split), env.tokenizer, pc)


def make_sampler(config, env: Env, *, greedy: bool = False, num_samples: int | None = None):
  s = config.sampler
  sc = SamplerConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                     greedy=greedy, num_samples=num_samples or s.num_generations, eos_id=env.tokenizer.eos_id,
                     pad_id=env.tokenizer.pad_id, prompt_buckets=tuple(config.data.buckets),
                     batch_buckets=tuple(s.batch_buckets), keep_cache=s.keep_cache)
  return Sampler(env.model, sc, mesh=env.mesh, param_shardings=env.param_shardings, rules=env.rules)


def eval_fn(config, env: Env):
  """``(params, step) -> metrics`` on the held-out split, or None when evaluation is off."""
  if not config.eval.num_prompts:
    return None
  from rlj import evaluation
  greedy = make_sampler(config, env, greedy=True, num_samples=1)
  sampled = make_sampler(config, env) if config.eval.sampled else None
  reward_fn = dict(combine.build([dict(r) for r in config.eval.rewards]))[config.eval.rewards[0]["name"]]
  batch = config.eval.batch_prompts

  def batches():
    it = prompt_iterator(config, env, split="eval", batch_prompts=batch, seed=0, num_epochs=1, shuffle=False,
                         drop_remainder=False)
    for i, b in enumerate(it):
      if i * batch >= config.eval.num_prompts:
        break
      yield b

  def fn(params, step):
    return evaluation.evaluate(params, batches(), tokenizer=env.tokenizer, reward_fn=reward_fn,
                               greedy_sampler=greedy, sampled_sampler=sampled,
                               rng=jax.random.fold_in(jax.random.key(config.seed), step),
                               max_examples=config.eval.num_prompts)
  return fn


# ------------------------------------------------------------------------------------------------------------
# RL pieces
# ------------------------------------------------------------------------------------------------------------

def reward_specs(config) -> list[dict]:
  """The config's reward list; ``fn="reward_model"`` serves a trained rlj reward model (kwargs: ``path``,
  optional ``scalarize`` and ``alpha``) that scores the sampled token rows."""
  specs = []
  for r in config.rewards:
    spec = dict(r)
    if spec["fn"] == "reward_model":
      from rlj import rm_reward  # validate() checked kwargs.path
      kwargs = dict(spec.pop("kwargs", {}))
      path = kwargs.pop("path")
      spec["fn"] = rm_reward.reward_model_fn(path, **kwargs)
    specs.append(spec)
  return specs


def rl_components(config, env: Env, data, writer) -> rl_loop.Components:
  specs = reward_specs(config)
  reward_fns = combine.build(specs)
  weights = np.array([float(s.get("weight", 1.0)) for s in specs], np.float32)
  comps = rl_loop.Components(
      model=env.model, tx=env.tx, mesh=env.mesh, rules=env.rules, state_shardings=env.state_shardings,
      sampler=make_sampler(config, env), tokenizer=env.tokenizer, train_iter=data, reward_fns=reward_fns,
      reward_weights=weights, writer=writer)
  if config.sampler.dtype != env.model_config.param_dtype:
    comps.sampler_dtype = jnp.dtype(config.sampler.dtype)
  comps.eval_fn = eval_fn(config, env)
  return comps


def loop_config(config, env: Env) -> rl_loop.LoopConfig:
  a, t, s = config.algo, config.train, config.sampler
  loss_kwargs = dict(a.kwargs)
  if a.name in GROUP_ALGOS:
    loss_kwargs.setdefault("max_len", s.max_new_tokens)
  return rl_loop.LoopConfig(
      algo=a.name, loss_kwargs=loss_kwargs, adv_kwargs=dict(a.advantage), total_steps=t.total_steps,
      num_generations=s.num_generations, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
      num_epochs=t.num_epochs, num_minibatches=t.num_minibatches, num_microbatches=t.num_microbatches,
      recompute_old_logp=t.recompute_old_logp, use_reference=env.use_reference and a.name != "dno",
      eval_every=t.eval_every, ckpt_every=t.ckpt_every, seed=config.seed,
      dno_iteration_steps=a.dno.iteration_steps, dno_replay=tuple(a.dno.replay),
      dno_select=dict(min_chosen_score=a.dno.min_chosen_score, min_margin=a.dno.min_margin,
                      max_pairs=a.dno.max_pairs, win_rate=a.dno.win_rate))
