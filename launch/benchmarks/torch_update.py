r"""The RL update against PyTorch: the same optimizer steps in rlj's jitted train step and in ``transformers``.

Both sides run ``--batch`` rows x ``--seq`` tokens per optimizer step, with the loss on the last
``--new_tokens`` tokens of each row, for two optimizer steps (the runlocal config's two minibatches), from the
preset's shape:

- rlj: ``rlj.programs.train_step`` (GRPO token-mean loss, AdamW, the state donated), as the trainer runs it;
- PyTorch: ``transformers``' Llama of the same shape (SDPA attention, untied head), a log-softmax of the
  completion positions, ``backward`` and ``torch.optim.AdamW``, with as many threads as JAX's CPU devices use.

It also gives each side's best square float32 matmul (1024 and 2048), so the two updates can be set against
the speed of their matmuls. Needs torch and transformers (requirements-test.txt).

  python -m launch.bench --case torch_update --model small-3m --batch 32 --seq 96 --new_tokens 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from launch import bench
from launch.benchmarks import train_step as ts_bench
from models import presets
from rlj import sharding

UPDATES = 2   # optimizer steps per RL step (runlocal: two minibatches)


def _torch_update(mc, *, rows: int, seq: int, completion: int, repeats: int) -> tuple[list[float], float]:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.embed_dim, intermediate_size=mc.mlp_dim,
                    num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                    num_key_value_heads=mc.num_kv_heads, head_dim=mc.head_dim, tie_word_embeddings=False,
                    attn_implementation="sdpa")
  model = LlamaForCausalLM(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
  x = torch.randint(0, mc.vocab_size, (rows, seq))

  def rl_update():
    for _ in range(UPDATES):
      logits = model(input_ids=x).logits[:, seq - completion - 1:-1].float()
      logp = torch.log_softmax(logits, -1).gather(-1, x[:, seq - completion:, None])[..., 0]
      (-logp.mean()).backward()
      opt.step()
      opt.zero_grad()

  times = bench.time_calls(rl_update, repeats=repeats, warmup=2)
  peak = 0.0
  for n in (1024, 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
      a @ b
    peak = max(peak, 2 * n ** 3 / ((time.perf_counter() - t0) / 5))
  return times, peak


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
  import jax  # pylint: disable=g-import-not-at-top
  name = args.model or "small-3m"
  mc = presets.get(name)
  rows, seq, completion = args.batch or 32, args.seq or 96, args.new_tokens or 64
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  step, state = ts_bench.build_step(mc, completion_len=completion, mesh=mesh)
  batch = ts_bench.grpo_batch(mc, rows, seq, completion, mesh)
  holder = {"state": state}

  def rl_update():
    s = holder["state"]
    with jax.set_mesh(mesh):
      for i in range(UPDATES):
        s, m = step(s, batch, jax.random.key(i))
    jax.block_until_ready(m)
    holder["state"] = s

  ours = bench.time_calls(rl_update, repeats=args.repeats, warmup=2)
  theirs, torch_peak = _torch_update(mc, rows=rows, seq=seq, completion=completion, repeats=args.repeats)
  flops = UPDATES * ts_bench.train_step_flops(mc, rows, seq, completion)
  shape = f"{UPDATES} x {rows} x {seq} ({completion} trained)"
  out = []
  for who, times, peak in (("rlj (jax.jit)", ours, bench.matmul_peak("float32")), ("PyTorch + transformers",
                                                                                     theirs, torch_peak)):
    out.append({"update": who, "model": name, "steps x rows x tokens": shape, "best ms": min(times) * 1e3,
                "median ms": statistics.median(times) * 1e3, "matmul peak GFLOP/s": peak / 1e9,
                "FLOPs / own peak": flops / min(times) / peak})
  out[1]["vs rlj"] = float(np.float64(min(theirs)) / min(ours))
  notes = [f"{UPDATES} optimizer steps per update, float32; FLOPs per step from launch/benchmarks/train_step.py "
           f"({flops / UPDATES / 1e9:.1f} GFLOP); best and median of {args.repeats} after 2 warm-ups."]
  return out, notes
