"""Config -> objects: mesh, tokenizer, model, params, samplers, rewards (checks: ``launch/checks.py``; data:
``launch/data_setup.py``, whose names are re-exported here).

Everything that reads an ml_collections config for the RL / SFT jobs lives here or in ``launch/train.py``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import presets
from models.config import ModelConfig
from models.transformer import Transformer
from rewards import combine
from rlj import checkpoint, lifecycle, programs, rl_loop, sharding, train_state
from rlj.batches import Settings
from rlj.dynamic_sampling import DynamicSampling
from rlj.kl_controller import KLControl
from rlj.sampler import SamplerConfig
from launch.data_setup import (GENERATED, JSONL_SOURCES, generated_source, prompt_format, prompt_iterator,  # noqa: F401
                               prompt_source, user_text)


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
  state: Any                      # the full TrainState (None for a LoRA job without an SFT stage: never built)
  state_shardings: Any
  param_shardings: Any
  use_reference: bool
  workdir: str = ""
  params: Any = None              # the initial policy params (the LoRA base when no SFT stage comes first)
  lora: Any = None                # models.lora.LoraConfig, or None (full fine-tuning)


TOKENIZER_DIR = "tokenizer"   # <workdir>/tokenizer: the run's tokenizer files (save_pretrained), for launch.export


def tokenizer_path(config) -> str:
  """``tokenizer.path``, or ``init.path`` (the checkpoint's own tokenizer) when it is empty."""
  return config.tokenizer.path or config.init.path


def load_tokenizer(config):
  """The checkpoint tokenizer that ``tokenizer.kind`` / ``path`` / ``pad_id`` / ``chat_template`` name.

  Raises:
    SystemExit: one line naming the key when the files are missing or do not parse.
  """
  from rlj.data import chat, tokenizer as tok_lib
  t = config.tokenizer
  path, key = tokenizer_path(config), "tokenizer.path" if config.tokenizer.path else "init.path"
  if not path:
    raise SystemExit("config key 'tokenizer.path': empty, and so is init.path; pass the checkpoint directory or "
                     "its tokenizer.json / tokenizer.model")
  try:
    return tok_lib.load(path, t.kind, pad_id=None if t.pad_id < 0 else int(t.pad_id),
                        chat_template=t.chat_template or None)
  except chat.ChatTemplateError as e:
    raise SystemExit(f"config key 'tokenizer.chat_template': {e}") from None
  except tok_lib.TokenizerError as e:
    raise SystemExit(f"config key '{key}': {e}") from None
  except OSError as e:   # a file that exists but cannot be read (permissions, a folder named like the file)
    raise SystemExit(f"config key '{key}': cannot read {e.filename or path} ({e.strerror or e}); pass a tokenizer "
                     f"file or checkpoint folder this user may read") from None


def build_tokenizer(config, workdir: str):
  """The checkpoint's tokenizer, or (``tokenizer.kind=train_synthetic``) one trained on the generated task
  (``data.source`` synthetic or calculator; an agent job's markers as single tokens) and kept in
  ``<workdir>/tokenizer.model``; process 0 saves it to ``<workdir>/tokenizer/`` for export."""
  from rlj.data import tokenizer as tok_lib  # data extras (sentencepiece)
  t = config.tokenizer
  if t.kind != "train_synthetic":
    return save_tokenizer(load_tokenizer(config), workdir)
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return save_tokenizer(tok_lib.Tokenizer.from_file(path), workdir)
  from launch import agent_setup
  task = generated_source(config, "train", num_records=t.train_records)
  corpus = []
  for i in range(len(task)):
    r = task[i]
    corpus += [user_text(config, r["prompt"]), r["answer"]]
  symbols = ["\n"] + agent_setup.marker_symbols(config)   # tool-call and observation markers: one token each
  tok = tok_lib.train(corpus, vocab_size=t.vocab_size, byte_fallback=False,
                      extra_options={"user_defined_symbols": symbols})
  if jax.process_index() == 0:
    tok.save(path)
  return save_tokenizer(tok, workdir)


def save_tokenizer(tok, workdir: str):
  """Writes ``tok``'s files to ``<workdir>/tokenizer/`` once (process 0); returns ``tok``."""
  directory = os.path.join(workdir, TOKENIZER_DIR)
  if jax.process_index() == 0 and "://" not in workdir and not os.path.isdir(directory):
    tok.save_pretrained(directory + ".tmp")
    os.replace(directory + ".tmp", directory)
  return tok


def checkpoint_meta(model_config: ModelConfig) -> dict:
  """What every checkpoint of a job records for ``launch.export``: the model config and the tokenizer folder
  (relative to the run's workdir)."""
  return {"model_config": dataclasses.asdict(model_config), "tokenizer_dir": TOKENIZER_DIR}


def stop_ids(config, tokenizer) -> tuple[int, ...]:
  """Every id that ends a completion: the tokenizer's EOS ids (its ``generation_config.json``) and
  ``sampler.stop_tokens`` (ids, or strings that are one token each)."""
  out = list(tokenizer.eos_ids)
  for i, token in enumerate(config.sampler.stop_tokens):
    key = f"sampler.stop_tokens[{i}]"
    if isinstance(token, str):
      tid, ids = tokenizer.single_token(token)
      if tid is None:
        raise SystemExit(f"config key '{key}': {token!r} is {len(ids)} tokens ({ids}), not one; a stop token must "
                         f"be a single token of the tokenizer (e.g. a turn marker such as '<|eot_id|>'), or its id")
    elif isinstance(token, int) and not isinstance(token, bool):
      tid = token
    else:
      raise SystemExit(f"config key '{key}': {token!r}; give a token string or an int id")
    if not 0 <= tid < tokenizer.vocab_size:
      raise SystemExit(f"config key '{key}': id {tid} is outside the tokenizer's vocabulary [0, "
                       f"{tokenizer.vocab_size})")
    out.append(int(tid))
  return tuple(dict.fromkeys(out))


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
  stop_ids(config, tokenizer)  # a bad sampler.stop_tokens fails here, before anything compiles
  if config.init.policy == "hf":
    mc, params = load_hf(config.init.path, mesh, rules)
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
  from launch import lora_setup
  lora_cfg = lora_setup.lora_config(config)
  if lora_cfg is not None and not runs_sft_stage(config):
    state, state_sh = None, None   # no full optimizer state: run_rl builds the adapters' (lora_state)
  else:
    state, state_sh = train_state_of(params, param_shardings, tx, mesh)
  use_ref = config.job == "rl" and loop_config(config, tokenizer.pad_id).use_reference
  return Env(mesh=mesh, rules=rules, tokenizer=tokenizer, model_config=mc, model=model, tx=tx, sft_tx=sft_tx,
             state=state, state_shardings=state_sh, param_shardings=param_shardings, use_reference=use_ref,
             workdir=workdir, params=params, lora=lora_cfg)


@dataclasses.dataclass
class RLStart:
  """What the RL stage starts from: its state, the reference (None with LoRA: the base is the reference), the
  LoRA policy and its state shardings (None for full fine-tuning), and what its checkpoints' meta adds."""
  state: Any
  ref_params: Any
  lora: Any = None
  state_shardings: Any = None
  meta: dict = dataclasses.field(default_factory=dict)


def rl_start(config, env: Env, params, workdir: str) -> RLStart:
  """The RL stage's start from the policy ``params`` (``env.params``, or an SFT stage's): full fine-tuning keeps a
  reference copy when the algorithm uses one; LoRA puts fresh adapters over the frozen ``params``."""
  if env.lora is not None:
    from launch import lora_setup
    lora, state, state_sh = lora_setup.lora_state(config, env, params, lora_setup.base_source(config, workdir))
    return RLStart(state, None, lora, state_sh, {"lora": dataclasses.asdict(env.lora), "lora_base": lora.fingerprint})
  if env.state is not None and params is env.state.params:
    state = env.state
  else:   # a fresh optimizer on the given weights (the SFT stage's)
    state = jax.device_put(train_state.TrainState.create(params, env.tx), env.state_shardings)
  # A copy: the state's buffers are donated to the train step, the reference must outlive them.
  ref = jax.tree.map(jnp.copy, state.params) if env.use_reference else None
  return RLStart(state, ref)


def load_hf(path: str, mesh, rules, **kwargs):
  """``models.hf.load_hf_checkpoint`` on the mesh; a folder it cannot read (an unsupported config.json key,
  missing or extra tensors) stops the launch in one line naming ``init.path``."""
  from models import hf
  try:
    return hf.load_hf_checkpoint(path, shardings=lambda names, shapes: sharding.tree_shardings(names, shapes, mesh,
                                                                                             rules), **kwargs)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise SystemExit(f"config key 'init.path': {path!r}: {e}") from None


def train_state_of(params, param_shardings, tx, mesh):
  """``(TrainState, its shardings)`` for placed params: optimizer moments follow their parameter."""
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = train_state.state_shardings(param_shardings, tx, abstract_params, mesh)
  state = jax.jit(lambda p: train_state.TrainState.create(p, tx), out_shardings=state_sh)(params)
  return state, state_sh


def runs_sft_stage(config) -> bool:
  """An RL job runs an SFT stage first (in ``<workdir>/sft``): from scratch (``init.policy=sft``), or on a
  Hugging Face checkpoint when ``sft.steps > 0``."""
  return config.init.policy == "sft" or (config.init.policy == "hf" and config.sft.steps > 0)


def checkpoint_policy(config) -> lifecycle.CheckpointPolicy:
  t = config.train
  return lifecycle.CheckpointPolicy(keep=t.keep_checkpoints, every_steps=t.ckpt_every,
                                    every_minutes=t.ckpt_every_minutes)


# ------------------------------------------------------------------------------------------------------------
# Samplers and evaluation (the data pipelines: launch/data_setup.py)
# ------------------------------------------------------------------------------------------------------------

def sampler_config(config, *, eos_id: int, pad_id: int, stop_ids: tuple[int, ...] = (), greedy: bool = False,
                   num_samples: int | None = None) -> SamplerConfig:
  """The config's ``sampler`` section as a ``SamplerConfig`` (the trainer's and ``launch.aot``'s); ``stop_ids``:
  further ids that end a completion besides ``eos_id`` (``stop_ids(config, tokenizer)``)."""
  s = config.sampler
  return SamplerConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       greedy=greedy, num_samples=num_samples or s.num_generations, eos_id=eos_id, pad_id=pad_id,
                       stop_ids=tuple(i for i in stop_ids if i != eos_id),
                       prompt_buckets=tuple(config.data.buckets), batch_buckets=tuple(s.batch_buckets),
                       keep_cache=s.keep_cache, cache_phases=s.get("cache_phases"))


def make_sampler(config, env: Env, *, greedy: bool = False, num_samples: int | None = None):
  """The compiled sampler of the config; with ``sampler.rounds`` > 1 (not in agent jobs, whose turns are rounds
  already) a ``rlj.sampler_rounds.RoundSampler`` over rounds of ``ceil(max_new_tokens / rounds)`` tokens; the
  training rollout's sampler (not ``greedy``) samples its prompts in ``sampler.chunks`` sequential calls
  (``rlj.sampler_chunks.ChunkedSampler``)."""
  sc = sampler_config(config, eos_id=env.tokenizer.eos_id, pad_id=env.tokenizer.pad_id,
                      stop_ids=stop_ids(config, env.tokenizer), greedy=greedy, num_samples=num_samples)
  from launch import agent_setup
  rounds = int(config.sampler.get("rounds", 1))
  chunks = 1 if greedy else int(config.sampler.get("chunks", 1))
  make = lambda c: programs.sampler(env.model, c, mesh=env.mesh, param_shardings=env.param_shardings,  # noqa: E731
                                    rules=env.rules)
  if rounds <= 1 or agent_setup.enabled(config):
    sampler = make(sc)
  else:
    from rlj.sampler_rounds import round_sampler
    rows = sc.num_samples * (config.eval.batch_prompts if greedy else config.train.batch_prompts) // chunks
    sampler = round_sampler(make, sc, rounds=rounds, max_prompt_len=max(config.data.buckets), rows=rows)
  if chunks > 1:
    from rlj.sampler_chunks import ChunkedSampler
    sampler = ChunkedSampler(sampler, chunks)
  return sampler


def eval_fn(config, env: Env):
  """``(params, step) -> metrics`` on the held-out split, or None when evaluation is off."""
  if not config.eval.num_prompts:
    return None
  from launch import agent_setup
  from rlj import evaluation
  batch = config.eval.batch_prompts
  source = prompt_source(config, "eval", env.workdir)   # built (or found) once, read at every evaluation

  def batches():
    it = prompt_iterator(config, env, split="eval", batch_prompts=batch, seed=0, num_epochs=1, shuffle=False,
                         drop_remainder=False, source=source)
    for i, b in enumerate(it):
      if i * batch >= config.eval.num_prompts:
        break
      yield b

  reward_fn = dict(combine.build([dict(r) for r in config.eval.rewards]))[config.eval.rewards[0]["name"]]
  if agent_setup.enabled(config):   # greedy multi-turn trajectories
    trajectories = agent_setup.multi_turn_sampler(config, env, greedy=True, num_samples=1)
    return lambda params, step: evaluation.evaluate_trajectories(params, batches(), sampler=trajectories,
                                                                 reward_fn=reward_fn)
  greedy = make_sampler(config, env, greedy=True, num_samples=1)
  sampled = make_sampler(config, env) if config.eval.sampled else None

  def fn(params, step):
    return evaluation.evaluate(params, batches(), tokenizer=env.tokenizer, reward_fn=reward_fn,
                               greedy_sampler=greedy, sampled_sampler=sampled,
                               rng=jax.random.fold_in(jax.random.key(config.seed), step),
                               max_examples=config.eval.num_prompts)
  return fn


# ------------------------------------------------------------------------------------------------------------
# RL pieces
# ------------------------------------------------------------------------------------------------------------

def rl_components(config, env: Env, data, writer, *, lora=None, state_shardings=None) -> rl_loop.Components:
  """The trainer's components; ``lora`` (an ``rlj.lora_policy.LoraPolicy``) and the adapters' state shardings for
  a LoRA job."""
  from launch import reward_setup
  specs = reward_setup.reward_specs(config, env)
  reward_fns = combine.build(specs)
  weights = np.array([float(s.get("weight", 1.0)) for s in specs], np.float32)
  comps = rl_loop.Components(
      model=env.model, tx=env.tx, mesh=env.mesh, rules=env.rules,
      state_shardings=state_shardings or env.state_shardings, sampler=make_sampler(config, env),
      tokenizer=env.tokenizer, train_iter=data, reward_fns=reward_fns, reward_weights=weights, writer=writer,
      lora=lora)
  weights_dtype = env.model_config.param_dtype if lora is None else jax.tree.leaves(lora.base)[0].dtype
  if jnp.dtype(config.sampler.dtype) != jnp.dtype(weights_dtype):
    comps.sampler_dtype = jnp.dtype(config.sampler.dtype)
  comps.eval_fn = eval_fn(config, env)
  from launch import agent_setup
  if agent_setup.enabled(config):
    comps.agent = agent_setup.multi_turn_sampler(config, env)
  comps.step_rewards = reward_setup.step_rewards(config)
  comps.par = reward_setup.par_references(config, env, reward_fns, comps.sampler)
  return comps


def algo_settings(config, pad_id: int = 0) -> Settings:
  """The config's ``algo`` section (and the sizes it depends on) as the algorithm row's plain settings."""
  from launch import agent_setup
  a, t, s = config.algo, config.train, config.sampler
  options = {k: dict(v) for k, v in a.items() if k not in ("name", "kwargs")}
  return Settings(loss_kwargs=dict(a.kwargs), options=options, num_generations=s.num_generations,
                  max_new_tokens=agent_setup.completion_len(config), num_minibatches=t.num_minibatches,
                  seed=config.seed, pad_id=pad_id)


def loop_config(config, pad_id: int = 0) -> rl_loop.LoopConfig:
  t = config.train
  return rl_loop.LoopConfig(
      algo=config.algo.name, algo_settings=algo_settings(config, pad_id), total_steps=t.total_steps,
      temperature=config.sampler.temperature, num_epochs=t.num_epochs, num_microbatches=t.num_microbatches,
      logp_microbatches=int(t.get("logp_microbatches", 0)), logits_chunk=int(t.get("logits_chunk", 0)),
      packing=bool(t.get("packing", False)), sample_ahead=bool(t.get("sample_ahead", False)),
      mask_truncated=bool(t.get("mask_truncated", False)),
      old_logp=t.old_logp, mismatch_check_every=t.mismatch_check_every, mismatch_correction=t.mismatch_correction,
      mismatch_low=t.mismatch_low, mismatch_high=t.mismatch_high, eval_every=t.eval_every,
      max_consecutive_skips=t.max_consecutive_skips,
      dynamic_sampling=DynamicSampling(enabled=bool(t.dynamic_sampling.enabled),
                                       max_extra_rollouts=int(t.dynamic_sampling.max_extra_rollouts)),
      kl_control=KLControl(target=float(config.algo.kl_control.target),
                           horizon=float(config.algo.kl_control.horizon)))
