"""Config -> objects: mesh, tokenizer, data, model, params, samplers, rewards (checks: ``launch/checks.py``).

Everything that reads an ml_collections config for the RL / SFT jobs lives here or in ``launch/train.py``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from launch.checks import GROUP_ALGOS
from models import presets
from models.config import ModelConfig
from models.transformer import Transformer
from rewards import combine
from rlj import checkpoint, rl_loop, sharding, train_state
from rlj.sampler import Sampler, SamplerConfig


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
                     batch_buckets=tuple(s.batch_buckets), keep_cache=s.keep_cache,
                     cache_phases=s.get("cache_phases"))
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
      eval_every=t.eval_every, seed=config.seed, max_consecutive_skips=t.max_consecutive_skips,
      dno_iteration_steps=a.dno.iteration_steps, dno_replay=tuple(a.dno.replay),
      dno_select=dict(min_chosen_score=a.dno.min_chosen_score, min_margin=a.dno.min_margin,
                      max_pairs=a.dno.max_pairs, win_rate=a.dno.win_rate))
