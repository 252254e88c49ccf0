r"""The reward-model job (``job = "rm"``): ``python -m launch.train --config configs/rm_bt.py[:runlocal]``.

Trains a Bradley-Terry or IQN reward model (``models.reward_model.RewardModel``) on preference pairs with the
pure steps of ``rlj.rm_step``, logs with ``rlj.metrics_writer``, evaluates strict held-out accuracy every
``train.eval_every`` steps and at the end (printed as ``held-out accuracy: X``), and writes orbax
checkpoints to ``<workdir>/checkpoints`` with state ``{"params", "opt_state", "step"}`` and a meta record
whose ``reward_model`` entry (``reward_model_meta``) is everything ``rlj.rm_reward`` needs to rebuild the
model from the run folder alone. The tokenizer's ``.model`` is copied to ``<workdir>/tokenizer.model``.

Sections: tokenizer -> data (sources, held-out split, pipelines) -> model and state -> loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from launch import builders
from rewards import quantile
from rlj import checkpoint, metrics_writer, preemption, rm_step, sharding, train_state
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
  """A sentencepiece file (``tokenizer.kind=sentencepiece``) or one trained on the first
  ``tokenizer.train_records`` training pairs (``train_synthetic`` / ``train_data``), saved in ``workdir``."""
  from rlj.data import tokenizer as tok_lib
  t, path = config.tokenizer, os.path.join(workdir, TOKENIZER_FILE)
  if t.kind == "sentencepiece":
    tok = tok_lib.Tokenizer.from_file(t.path)
  elif t.kind in ("train_synthetic", "train_data"):
    if os.path.exists(path):  # a resumed run keeps its tokenizer
      return tok_lib.Tokenizer.from_file(path)
    tok = tok_lib.train(_corpus(train_source, t.train_records), vocab_size=t.vocab_size,
                        byte_fallback=t.kind == "train_data")
  else:
    raise SystemExit(f"config key 'tokenizer.kind': {t.kind!r}; choose sentencepiece | train_synthetic | "
                     f"train_data")
  if jax.process_index() == 0 and not os.path.exists(path):
    tok.save(path)
  return tok


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
  tfds_builders.build("preference", d.source, source_dir=d.source_dir, data_dir=data_dir)
  full = tfds_builders.data_source("preference", d.source, data_dir=data_dir, split=d.split)
  if d.eval_split:
    held_out = tfds_builders.data_source("preference", d.source, data_dir=data_dir, split=d.eval_split)
    held_out, train_stop = Subset(held_out, 0, min(d.eval_records or len(held_out), len(held_out))), len(full)
  else:
    if not 0 < d.eval_records < len(full):
      raise SystemExit(f"config key 'data.eval_records': {d.eval_records} must be in (0, {len(full)}) to hold "
                       f"out the tail of split {d.split!r}")
    train_stop = len(full) - d.eval_records
    held_out = Subset(full, train_stop, len(full))
  return Subset(full, 0, min(d.train_records or train_stop, train_stop)), held_out


def pipeline_config(config, *, batch_size: int, seed: int, shuffle: bool, num_epochs, drop_remainder: bool):
  from rlj.data import pipeline
  d = config.data
  return pipeline.PipelineConfig(batch_size=batch_size, buckets=tuple(d.buckets), template=d.template,
                                 add_bos=d.add_bos, overflow=d.overflow, seed=seed, shuffle=shuffle,
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
    from models import hf
    _, backbone = hf.load_hf_checkpoint(config.init.path, mesh=mesh, rules=rules, dtype=model_config.param_dtype)
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


def reward_model_meta(config, model_config) -> dict:
  """What ``rlj.rm_reward.load_reward_model`` rebuilds the model from (stored in every checkpoint's meta)."""
  return {"model_config": dataclasses.asdict(model_config), "preset": config.model.preset,
          "overrides": dict(config.model.overrides), "kind": config.head.kind,
          "num_cosines": config.head.num_cosines, "head_hidden_dim": config.head.hidden_dim or None,
          "monotone": config.head.monotone, "num_taus": config.loss.num_taus, "tokenizer": TOKENIZER_FILE,
          "template": config.data.template, "add_bos": config.data.add_bos}


def ckpt_tree(state) -> dict:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


# ------------------------------------------------------------------------------------------------------------
# Job
# ------------------------------------------------------------------------------------------------------------

class _LaggedSkips:
  """``train_state.SkipCounter`` fed each step's device flag one step late, so the host never waits for the
  device; ``flush`` reads the pending flag (before a checkpoint)."""

  def __init__(self, limit: int):
    self.counter = train_state.SkipCounter(limit, what="steps", hint="Lower optim.learning_rate")
    self._pending = None

  def add(self, step: int, skipped: jax.Array) -> None:
    self.flush()
    self._pending = (step, skipped)

  def flush(self) -> None:
    if self._pending is not None:
      step, skipped = self._pending
      self._pending = None
      self.counter.add(float(skipped), f"at step {step}")


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
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = train_state.state_shardings(param_shardings, tx, abstract, mesh)
  state = jax.jit(lambda p: train_state.TrainState.create(p, tx), out_shardings=state_sh)(params)
  del params

  t = config.train
  dp = sharding.data_parallel_size(mesh, rules)
  for key in ("batch_size", "eval_batch_size"):
    if t[key] % jax.process_count() or t[key] % dp:
      raise SystemExit(f"config key 'train.{key}': {t[key]} pairs must split over the {dp}-way batch axes "
                       f"and {jax.process_count()} process(es)")
  it = pipeline.preference_pipeline(train_source, tokenizer, pipeline_config(
      config, batch_size=t.batch_size // jax.process_count(), seed=config.seed, shuffle=True, num_epochs=None,
      drop_remainder=True))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints,
                                 every_steps=t.ckpt_every, every_minutes=t.ckpt_every_minutes)
  start = 0
  restored = ckpt.restore_latest(ckpt_tree(state))
  if restored is not None:
    start, tree, meta = restored
    state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
    it.set_state(meta["data"])
    print(f"resumed from step {start} in {workdir}", flush=True)
  eval_hosts = list(pipeline.preference_pipeline(eval_source, tokenizer, pipeline_config(
      config, batch_size=t.eval_batch_size // jax.process_count(), seed=0, shuffle=False, num_epochs=1,
      drop_remainder=False)))
  eval_batches = [to_batch(h, mesh, rules) for h in eval_hosts]

  loss_kwargs = dict(config.loss)
  train_fn = rm_step.make_train_step(model, tx, **loss_kwargs)
  eval_fn = rm_step.make_eval_step(model, **loss_kwargs)
  writer = metrics_writer.MetricsWriter(workdir, total_steps=t.total_steps, enabled=jax.process_index() == 0,
                                        start_step=start)
  rm_meta = reward_model_meta(config, mc)
  root = jax.random.key(config.seed)

  def evaluate(step):
    held_out = rm_step.evaluate(eval_fn, state.params, eval_batches)
    writer.write(step, {f"eval/{k}": v for k, v in held_out.items()})
    return held_out

  def save(step):
    skips.flush()
    meta = {"job": "rm", "step": step, "data": it.get_state(), "reward_model": rm_meta, "eval": held_out}
    ckpt.save(step, ckpt_tree(state), meta)

  held_out = None
  batches = _train_batches(it, mesh, rules)
  t0, pairs = time.time(), 0
  skips = _LaggedSkips(t.max_consecutive_skips)
  stopped = False
  with preemption.StopRequest() as stop:
    on_step_end = preemption.checkpoint_hook(ckpt, stop, total_steps=t.total_steps, save=save,
                                             label="reward model")
    for step in range(start + 1, t.total_steps + 1):
      batch = next(batches)
      state, metrics = train_fn(state, batch, jax.random.fold_in(root, step))
      skips.add(step, metrics["skipped"])
      pairs += batch.chosen_tokens.shape[0]
      if step % t.log_every == 0 or step == t.total_steps:
        metrics = jax.device_get(metrics)
        metrics["pairs_per_s"] = pairs / max(time.time() - t0, 1e-9)
        writer.write(step, metrics)
        t0, pairs = time.time(), 0
      last = step == t.total_steps
      if last or (t.eval_every and step % t.eval_every == 0):
        held_out = evaluate(step)
      stopped = on_step_end(step)
      if stopped:
        break
  ckpt.close()
  writer.close()
  it.close()
  if stopped:
    return {}
  if held_out is None:  # the run had already finished: report the restored model
    held_out = evaluate(start)
  if jax.process_index() == 0:
    metrics_writer.plot_curves(workdir, keys=PLOT_KEYS)
  extra = f" (quantile-mean accuracy {held_out['mean_accuracy']:.4f})" if "mean_accuracy" in held_out else ""
  print(f"held-out pairs: {int(held_out['count'])}, loss {held_out['loss']:.4f}{extra}", flush=True)
  print(f"held-out accuracy: {held_out['accuracy']:.4f}", flush=True)
  return held_out
