r"""Train-step case: model FLOPs utilisation of the trainer's jitted GRPO step against the measured matmul peak.

The step is the one ``rlj.rl_loop.Trainer`` runs, from the same factory (``rlj.programs.rl_programs``:
teacher-forced log-probs of the completions, the GRPO clipped surrogate with the runlocal loss options, AdamW,
donated state), on a
batch of N rows of S tokens whose last T are the completion, data-parallel over every device.

FLOPs of one step (forward + backward, the PaLM convention of arXiv:2204.02311, App. B), counting only what
the step needs:

  FLOPs = 6 · P_layers · N · S  +  6 · D · V · N · T  +  6 · L · H · Dh · N · S · (S + 1)

- P_layers, the block parameters that multiply activations: per layer D·Dh·(2H + 2KVH) (q, k, v, o) and
  3·D·F (gated MLP). 2·P_layers FLOPs per token forward, twice that backward. The input embedding is a
  gather and the norm scales are elementwise, so neither counts.
- The output projection (D·V, tied or not) runs only at the T positions that predict completion tokens
  (``Transformer(..., logits_at=...)``); the prompt's logits are never computed, so they do not count.
- Attention: q·kᵀ and p·v cost 2·Dh each per (query, key) pair and head forward, times 3 for forward +
  backward, over the S·(S + 1)/2 causal pairs of a row (``causal_self_attention`` skips most of the masked
  pairs; the ones it still computes, and the remat recomputation, are not counted).

MFU = FLOPs / (best step seconds) / (matmul peak at the same dtype, measured in the same process before and
after the steps, the larger of the two).

  python -m launch.bench --case train_step --model small-50m --batch 8 --seq 512
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from launch import bench
from models import presets
from models.config import ModelConfig
from models.transformer import Transformer
from rlj import programs, rl_loop, sharding, train_state

# The GRPO loss options of the runlocal config (configs/common.py), max_len added as the launcher does.
LOSS_KWARGS = dict(clip_eps=0.2, kl_coef=0.0, agg="token_mean", kl_estimator="k3_ratio")


def layer_params(c: ModelConfig) -> int:
  """P_layers: block parameters that multiply activations (see the module docstring)."""
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.embed_dim * c.mlp_dim
  return c.num_layers * (attn + mlp)


def forward_flops(c: ModelConfig, prompt, completion) -> int:
  """Forward FLOPs of rows of ``prompt`` + ``completion`` tokens (ints or per-row arrays), a third of the
  module docstring's step: the blocks' matmuls, causal attention and the completion tokens' logits."""
  length = np.asarray(prompt, np.int64) + np.asarray(completion, np.int64)
  blocks = 2 * layer_params(c) * length
  attention = 2 * c.num_layers * c.num_heads * c.head_dim * length * (length + 1)
  logits = 2 * c.embed_dim * c.vocab_size * np.asarray(completion, np.int64)
  return int(np.sum(blocks + attention + logits))


def train_step_flops(c: ModelConfig, rows: int, seq_len: int, completion_len: int) -> int:
  """FLOPs of one forward + backward step over ``rows`` x ``seq_len`` tokens (module docstring)."""
  return 3 * rows * forward_flops(c, seq_len - completion_len, completion_len)


def build_step(config: ModelConfig, *, completion_len: int, mesh):
  """(jitted trainer step, initial TrainState) for ``config`` on ``mesh``, built like the launcher does."""
  model = Transformer(config)
  rules = sharding.DEFAULT_RULES
  dummy = np.zeros((1, 8), np.int32)
  init = lambda rng: model.init(rng, dummy, dummy, dummy + 1)["params"]  # noqa: E731
  params, param_sh = sharding.sharded_init(init, mesh, rules, jax.random.key(0))
  tx = train_state.make_optimizer(train_state.OptimConfig(learning_rate=1e-6))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = train_state.state_shardings(param_sh, tx, abstract, mesh)
  state = jax.jit(lambda p: train_state.TrainState.create(p, tx), out_shardings=state_sh)(params)
  settings = programs.RLSettings(algo="grpo", loss_kwargs=dict(LOSS_KWARGS, max_len=completion_len),
                                 completion_len=completion_len, temperature=1.0)
  return programs.rl_programs(model, tx, settings, mesh=mesh, rules=rules, state_shardings=state_sh).step, state


def grpo_batch(config: ModelConfig, rows: int, seq_len: int, completion_len: int, mesh) -> dict:
  """A placed GRPO minibatch of random tokens: every completion token counts, advantages are random."""
  rng = np.random.default_rng(0)
  t = completion_len
  batch = {"tokens": rng.integers(1, config.vocab_size, (rows, seq_len)).astype(np.int32),
           "attn_mask": np.ones((rows, seq_len), np.int32), "mask": np.ones((rows, t), np.float32),
           "old_logp": np.full((rows, t), -np.log(config.vocab_size), np.float32),
           "adv": rng.standard_normal(rows).astype(np.float32),
           "num_tokens": np.float32(rows * t), "num_seqs": np.float32(rows)}
  return rl_loop.place_batch(batch, mesh, sharding.DEFAULT_RULES)


def measure(config: ModelConfig, *, rows: int, seq_len: int, completion_len: int, repeats: int,
            peak_sizes=None) -> dict:
  """Times the trainer step and the matmul peak in this process; returns one result row."""
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  step_fn, state = build_step(config, completion_len=completion_len, mesh=mesh)
  batch = grpo_batch(config, rows, seq_len, completion_len, mesh)
  holder = {"state": state}
  peak_before = bench.matmul_peak(config.dtype, sizes=peak_sizes)

  def one_step():
    with jax.set_mesh(mesh):
      holder["state"], metrics = step_fn(holder["state"], batch, jax.random.key(0))
    return metrics
  times = bench.time_calls(one_step, repeats=repeats)
  skipped = float(jax.device_get(one_step()["skipped"]))
  del holder
  # The larger of the peaks measured before and after the steps: a load spike during one of them cannot
  # lower the peak and flatter the MFU.
  peak = max(peak_before, bench.matmul_peak(config.dtype, sizes=peak_sizes))
  flops = train_step_flops(config, rows, seq_len, completion_len)
  best = min(times)
  return {"rows x tokens": f"{rows} x {seq_len}", "dtype": config.dtype, "P_layers": layer_params(config),
          "GFLOP/step": flops / 1e9, "step s (best)": best, "step s (median)": float(np.median(times)),
          "tokens/s": rows * seq_len / best, "achieved GFLOP/s": flops / best / 1e9,
          "matmul peak GFLOP/s": peak / 1e9, "MFU": flops / best / peak, "skipped": skipped}


DEFAULT_SHAPES = {"tiny": (8, 64), "small-50m": (8, 512)}


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  rows = []
  for name in [args.model] if args.model else ["tiny", "small-50m"]:
    config = dataclasses.replace(presets.get(name), dtype=args.dtype)
    n, s = DEFAULT_SHAPES.get(name, (8, 512))
    n, s = args.batch or n, args.seq or s
    row = measure(config, rows=n, seq_len=s, completion_len=s // 2, repeats=args.repeats)
    rows.append({"model": name, **row})
  notes = ["FLOPs = 6 * P_layers * N * S + 6 * D * V * N * T + 6 * L * H * Dh * N * S * (S + 1): blocks, output "
           "projection at the T completion positions, causal attention pairs (launch/benchmarks/train_step.py); MFU = FLOPs / best "
           "step time / best matmul peak (measured in this process before and after the steps, at the row's "
           "dtype).",
           "Step: rlj.programs.rl_programs(...).step, as the Trainer runs it (GRPO token-mean loss, AdamW, donated state), completions are the "
           "last S/2 tokens of each row; data-parallel over every device."]
  return rows, notes
