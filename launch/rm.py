r"""The reward-model job (``job = "rm"``): ``python -m launch.train --config configs/rm_bt.py[:runlocal]``.

Config -> objects for a Bradley-Terry or IQN reward model (``models.reward_model.RewardModel``) on preference
pairs; the loop is the engine's (``rlj.rm_loop.run_rm``: the steps of ``rlj.rm_step``, held-out strict accuracy
every ``train.eval_every`` steps and at the end, printed as ``held-out accuracy: X``), and checkpoints follow the
one job lifecycle (``rlj.lifecycle``) with a meta record whose ``reward_model`` entry (``reward_model_meta``) is
everything ``rlj.rm_reward`` needs to rebuild the model from the run folder alone. A sentencepiece tokenizer's
``.model`` is copied to ``<workdir>/tokenizer.model``; every tokenizer's files go to ``<workdir>/tokenizer/``.

Sections: tokenizer -> data (sources, held-out split, pipelines) -> model and state -> the engine's loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from launch import builders
from rewards import quantile
from rlj import checkpoint, lifecycle, metrics_writer, preemption, rm_loop, rm_step, sharding, train_state
from rlj.rm_step import PreferenceBatch

TOKENIZER_FILE = "tokenizer.model"
PLOT_KEYS = ("loss", "accuracy", "eval/accuracy", "eval/loss", "margin", "grad_norm")
SOURCES = ("synthetic", "hh_rlhf", "generic")


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------

def _corpus(source, n: int) -> list[str]:
  from rlj.data import encoding
  texts = []
  for i in range(min(n, len(source))):
    r = source[i]
    texts += [encoding.text(r["prompt"]), encoding.text(r["chosen"]), encoding.text(r["rejected"])]
  return texts


def build_tokenizer(config, workdir: str, train_source):
  """The checkpoint's tokenizer (``tokenizer.kind`` auto | hf | sentencepiece, ``builders.load_tokenizer``) or one
  trained on the first ``tokenizer.train_records`` training pairs (``train_synthetic`` / ``train_data``); a
  sentencepiece model is kept in ``<workdir>/tokenizer.model``, every tokenizer in ``<workdir>/tokenizer/``."""
  from rlj.data import tokenizer as tok_lib
  t, path = config.tokenizer, os.path.join(workdir, TOKENIZER_FILE)
  if t.kind in ("auto", "hf", "sentencepiece"):
    tok = builders.load_tokenizer(config)
  elif t.kind in ("train_synthetic", "train_data"):
    if os.path.exists(path):  # a resumed run keeps its tokenizer
      return builders.save_tokenizer(tok_lib.Tokenizer.from_file(path), workdir)
    tok = tok_lib.train(_corpus(train_source, t.train_records), vocab_size=t.vocab_size,
                        byte_fallback=t.kind == "train_data")
  else:
    raise SystemExit(f"config key 'tokenizer.kind': {t.kind!r}; choose auto | hf | sentencepiece | "
                     f"train_synthetic | train_data")
  if jax.process_index() == 0 and not os.path.exists(path) and isinstance(tok, tok_lib.Tokenizer):
    tok.save(path)
  return builders.save_tokenizer(tok, workdir)


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subset:
  """Records ``[start, stop)`` of a random-access source, re-indexed from 0 (a train / held-out split)."""
  source: Any
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    return self.source[self.start + i]


def preference_sources(config, workdir: str):
  """(train, held-out) random-access sources of ``{"prompt", "chosen", "rejected", "index"}`` records.

  ``synthetic``: two ``PreferenceTask``s with different seeds. ``hh_rlhf`` / ``generic``: the tfds build of
  ``data.source_dir`` (into ``data.data_dir``, default ``<workdir>/tfds``); the held-out set is
  ``data.eval_split`` or, when that is empty, the last ``data.eval_records`` records of ``data.split`` by
  line number, and training uses the records before them (at most ``data.train_records``, 0 = all).
  """
  from rlj.data import synthetic, tfds_builders
  d = config.data
  if d.source not in SOURCES:
    raise SystemExit(f"config key 'data.source': {d.source!r}; choose one of {SOURCES}")
  if d.source == "synthetic":
    return (synthetic.PreferenceTask(d.train_records, seed=d.seed, max_target=d.max_target),
            synthetic.PreferenceTask(d.eval_records, seed=d.seed + 1000003, max_target=d.max_target))
  if not d.source_dir:
    raise SystemExit(f"config key 'data.source_dir': data.source={d.source!r} needs the folder with "
                     f"<split>.jsonl[.gz] files")
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  built = tfds_builders.build("preference", d.source, source_dir=d.source_dir, data_dir=data_dir)
  full = built.as_data_source(split=d.split)
  if d.eval_split:
    held_out = built.as_data_source(split=d.eval_split)
    held_out, train_stop = Subset(held_out, 0, min(d.eval_records or len(held_out), len(held_out))), len(full)
  else:
    if not 0 < d.eval_records < len(full):
      raise SystemExit(f"config key 'data.eval_records': {d.eval_records} must be in (0, {len(full)}) to hold "
                       f"out the tail of split {d.split!r}")
    train_stop = len(full) - d.eval_records
    held_out = Subset(full, train_stop, len(full))
  return Subset(full, 0, min(d.train_records or train_stop, train_stop)), held_out


def pipeline_config(config, tokenizer, *, batch_size: int, seed: int, shuffle: bool, num_epochs,
                    drop_remainder: bool):
  from rlj.data import pipeline
  d = config.data
  fmt = builders.prompt_format(config, tokenizer)
  return pipeline.PipelineConfig(batch_size=batch_size, buckets=tuple(d.buckets), prompt_format=fmt,
                                 add_bos=d.add_bos and fmt.add_bos(tokenizer), overflow=d.overflow, seed=seed,
                                 shuffle=shuffle,
                                 num_epochs=num_epochs, drop_remainder=drop_remainder,
                                 num_workers=d.num_workers)


def to_batch(host: dict, mesh, rules) -> PreferenceBatch:
  """A host batch of ``collate_preferences`` (valid rows only) as a ``PreferenceBatch`` on the mesh.

  Rows go over the batch axes when they divide evenly (always for training batches, which ``run`` checks),
  else, on one process, they are replicated (a held-out tail batch).
  """
  keep = np.asarray(host["valid"], bool)
  arrays = [np.asarray(host[k])[keep].astype(np.int32)
            for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")]
  rows = arrays[0].shape[0] * jax.process_count()
  if rows % sharding.data_parallel_size(mesh, rules) == 0:
    sh = sharding.batch_sharding(mesh, 2, rules)
    arrays = [jax.make_array_from_process_local_data(sh, a) for a in arrays]
  elif jax.process_count() == 1:
    arrays = [jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())) for a in arrays]
  else:
    raise SystemExit(f"config key 'data.eval_records': a held-out batch of {rows} pairs does not split over the "
                     f"{sharding.data_parallel_size(mesh, rules)}-way batch axes; use a multiple of "
                     f"train.eval_batch_size")
  return PreferenceBatch(*arrays)


# ------------------------------------------------------------------------------------------------------------
# Model, state, checkpoint meta
# ------------------------------------------------------------------------------------------------------------

def reward_model(config, model_config):
  from models.reward_model import RewardModel
  h = config.head
  return RewardModel(model_config, kind=h.kind, num_cosines=h.num_cosines, head_hidden_dim=h.hidden_dim or None,
                     monotone=h.monotone)


def init_args(model, num_taus: int) -> tuple:
  dummy = jnp.zeros((1, 8), jnp.int32)
  return (dummy, jnp.ones_like(dummy)) + (() if model.kind == "bt" else (quantile.midpoint_taus(num_taus),))


def init_params(config, model, mesh, rules, model_config):
  """Sharded reward-model params; the backbone comes from ``init.backbone`` (scratch | hf | rlj)."""
  args = init_args(model, config.loss.num_taus)
  params, shardings = sharding.sharded_init(lambda rng: model.init(rng, *args)["params"], mesh, rules,
                                            jax.random.key(config.seed))
  b = config.init.backbone
  if b == "hf":
    _, backbone = builders.load_hf(config.init.path, mesh, rules, dtype=model_config.param_dtype)
  elif b == "rlj":
    backbone, _ = checkpoint.restore_params(config.init.path, params["backbone"])
  elif b == "scratch":
    backbone = params["backbone"]
  else:
    raise SystemExit(f"config key 'init.backbone': {b!r}; choose scratch | hf | rlj")
  params = dict(params, backbone=sharding.reshard(backbone, shardings["backbone"]))
  return params, shardings


def build_model_config(config, tokenizer):
  """The backbone's ``ModelConfig``: the HF checkpoint's (plus ``model.overrides``) or preset + overrides."""
  if config.init.backbone == "hf":
    from models import hf
    if not os.path.isdir(config.init.path):
      raise SystemExit(f"config key 'init.path': {config.init.path!r} is not a Hugging Face checkpoint dir")
    with open(os.path.join(config.init.path, "config.json")) as f:
      mc = hf.config_from_hf(json.load(f))
    overrides = {k: v for k, v in dict(config.model.overrides).items() if k != "vocab_size"}
    mc = dataclasses.replace(mc, **overrides)
    if mc.vocab_size < tokenizer.vocab_size:
      raise SystemExit(f"config key 'tokenizer.path': the tokenizer has {tokenizer.vocab_size} pieces, the "
                       f"checkpoint's vocabulary only {mc.vocab_size}")
    return mc
  return builders.model_config(config, tokenizer.vocab_size)


def reward_model_meta(config, model_config, tokenizer=None) -> dict:
  """What ``rlj.rm_reward.load_reward_model`` rebuilds the model from (stored in every checkpoint's meta);
  ``tokenizer`` names the run's tokenizer: ``tokenizer.model`` for a sentencepiece model, else the folder."""
  from rlj.data import tokenizer as tok_lib
  tokenizer_file = TOKENIZER_FILE if tokenizer is None or isinstance(tokenizer, tok_lib.Tokenizer) else (
      builders.TOKENIZER_DIR)
  return {"model_config": dataclasses.asdict(model_config), "preset": config.model.preset,
          "overrides": dict(config.model.overrides), "kind": config.head.kind,
          "num_cosines": config.head.num_cosines, "head_hidden_dim": config.head.hidden_dim or None,
          "monotone": config.head.monotone, "num_taus": config.loss.num_taus, "tokenizer": tokenizer_file,
          "format": config.data.format, "template": config.data.user_template,
          "system_prompt": config.data.system_prompt, "add_bos": config.data.add_bos}


def _train_batches(it, mesh, rules) -> Iterator[PreferenceBatch]:
  for host in it:
    yield to_batch(host, mesh, rules)


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the reward model a config describes in ``workdir``; returns the final held-out
  metrics (``accuracy``, ``loss``, ``margin``, ``count``, and ``mean_accuracy`` for IQN)."""
  from rlj.data import pipeline
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh([tuple(x) for x in config.mesh])
  rules = [tuple(r) for r in config.sharding_rules]
  train_source, eval_source = preference_sources(config, workdir)
  tokenizer = build_tokenizer(config, workdir, train_source)
  mc = build_model_config(config, tokenizer)
  model = reward_model(config, mc)
  params, param_shardings = init_params(config, model, mesh, rules, mc)
  tx = train_state.make_optimizer(train_state.OptimConfig(**config.optim.to_dict()))
  state, _ = builders.train_state_of(params, param_shardings, tx, mesh)
  del params

  t = config.train
  dp = sharding.data_parallel_size(mesh, rules)
  for key in ("batch_size", "eval_batch_size"):
    if t[key] % jax.process_count() or t[key] % dp:
      raise SystemExit(f"config key 'train.{key}': {t[key]} pairs must split over the {dp}-way batch axes "
                       f"and {jax.process_count()} process(es)")
  it = pipeline.preference_pipeline(train_source, tokenizer, pipeline_config(
      config, tokenizer, batch_size=t.batch_size // jax.process_count(), seed=config.seed, shuffle=True, num_epochs=None,
      drop_remainder=True))
  eval_hosts = list(pipeline.preference_pipeline(eval_source, tokenizer, pipeline_config(
      config, tokenizer, batch_size=t.eval_batch_size // jax.process_count(), seed=0, shuffle=False, num_epochs=1,
      drop_remainder=False)))
  eval_batches = [to_batch(h, mesh, rules) for h in eval_hosts]
  loss_kwargs = dict(config.loss)
  with preemption.StopRequest() as stop:
    job = lifecycle.Lifecycle(os.path.join(workdir, "checkpoints"), builders.checkpoint_policy(config), job="rm",
                              total_steps=t.total_steps, stop=stop, data=it, label="reward model",
                              meta=builders.checkpoint_meta(mc))
    writer = None
    try:
      start, state, _, _ = job.resume(state)
      if start:
        print(f"resumed from step {start} in {workdir}", flush=True)
      writer = metrics_writer.MetricsWriter(workdir, total_steps=t.total_steps, phase="RM",
                                            enabled=jax.process_index() == 0, start_step=start)
      state, held_out, stopped = rm_loop.run_rm(
          state, train_fn=rm_step.make_train_step(model, tx, **loss_kwargs),
          eval_fn=rm_step.make_eval_step(model, **loss_kwargs), batches=_train_batches(it, mesh, rules),
          eval_batches=eval_batches, job=job, writer=writer, total_steps=t.total_steps, start_step=start,
          log_every=t.log_every, eval_every=t.eval_every, seed=config.seed,
          max_consecutive_skips=t.max_consecutive_skips, meta={"reward_model": reward_model_meta(config, mc, tokenizer)})
    finally:   # every exit path: the last save finished, orbax's threads and the data workers stopped
      job.close()
      if writer is not None:
        writer.close()
      it.close()
  if stopped:
    return {}
  if jax.process_index() == 0:
    metrics_writer.plot_curves(workdir, panels=PLOT_KEYS)
  extra = f" (quantile-mean accuracy {held_out['mean_accuracy']:.4f})" if "mean_accuracy" in held_out else ""
  print(f"held-out pairs: {int(held_out['count'])}, loss {held_out['loss']:.4f}{extra}", flush=True)
  print(f"held-out accuracy: {held_out['accuracy']:.4f}", flush=True)
  return held_out
