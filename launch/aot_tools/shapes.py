"""The shapes an RL config implies on a slice, for ``launch.aot``: its mesh, one rollout's and one optimizer step's
batch as zero host arrays (only shapes and dtypes matter), and their abstract placed versions."""
from __future__ import annotations

import os

import jax
import numpy as np

from launch import builders, checks
from rlj import packing, sharding
from rlj.batches import minibatches
from rlj.kl_controller import AdaptiveKL



def check_mesh(config, num_devices: int, hosts: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The config's mesh on ``num_devices`` chips of ``hosts`` hosts, with the launcher's layout checks."""
  names, sizes, _ = checks.check_layout(config, num_devices=num_devices, num_processes=hosts)
  return names, sizes


def example_rollout(config, rows: int, prompt_len: int) -> dict:
  """Zero host arrays shaped like ``Trainer.rollout``'s output (only shapes and dtypes matter)."""
  t = config.sampler.max_new_tokens
  out = {"tokens": np.zeros((rows, prompt_len + t), np.int32), "attn_mask": np.ones((rows, prompt_len + t), np.int32),
         "mask": np.ones((rows, t), np.float32), "old_logp": np.zeros((rows, t), np.float32)}
  if config.algo.advantage.get("estimator") == "process":   # process supervision's steps (rewards.steps)
    out.update(step_rewards=np.zeros((rows, t), np.float32), step_ends=np.full((rows, t), -1, np.int32))
  return out


def special_ids(config, vocab_size: int) -> dict:
  """The tokenizer's eos / pad / stop ids when its files are on this machine. They only change which tokens end
  a row, never a program's shapes, so without the files the model's last two ids stand in."""
  path = builders.tokenizer_path(config)
  if config.tokenizer.kind != "train_synthetic" and path and os.path.exists(path):
    tok = builders.load_tokenizer(config)
    return {"eos_id": tok.eos_id, "pad_id": tok.pad_id, "stop_ids": builders.stop_ids(config, tok)}
  return {"eos_id": vocab_size - 1, "pad_id": vocab_size - 2}


def example_minibatch(config, lc, arrays: dict, prompts: int) -> dict:
  """One optimizer step's batch, built by the algorithm row's own batcher and the trainer's minibatches (with
  reference log-probs where the row uses them, as ``Trainer.build_batch`` adds them)."""
  g, k = config.sampler.num_generations, len(config.rewards)
  values, weights = np.zeros((prompts, g, k), np.float32), np.ones((k,), np.float32)
  batch, _ = lc.row.batcher(lc.algo_settings).build(arrays, values, weights, 0)
  if lc.use_reference:
    batch["ref_logp"] = np.zeros_like(batch["old_logp"] if "old_logp" in batch else batch["mask"])
  batch.update(AdaptiveKL.for_loop(lc).batch_fields())   # the adaptive KL coefficient, as Trainer.run adds it
  mb = minibatches(batch, num_minibatches=lc.num_minibatches, unit=lc.row.unit, rng=np.random.default_rng(0),
                   shuffle=False)[0]
  if lc.packing:   # the largest packing bucket: what a rollout whose rows fill their width runs
    mb.update(packing.worst_case(*mb["tokens"].shape, mb["mask"].shape[1]))
  return mb


def abstract_batch(batch: dict, mesh, rules) -> dict:
  """ShapeDtypeStructs placed as ``rl_loop.place_batch`` places the host arrays."""
  dp = sharding.data_parallel_size(mesh, rules)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = (sharding.batch_sharding(mesh, v.ndim, rules) if v.ndim and v.shape[0] % dp == 0
         else jax.sharding.NamedSharding(mesh, jax.P()))
    out[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
  return out


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
