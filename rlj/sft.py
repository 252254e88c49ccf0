"""Supervised fine-tuning (cold start): teacher-forced NLL of reference answers after their prompts.

Batches reuse the RL prompt pipeline (left-padded prompts with their reference answers); the answer is
tokenised with EOS, truncated or right-padded to the completion width T, and trained with the same jitted
``train_step`` as RL (objective ``rl_algos.sft_objective``), so an SFT checkpoint is an RL policy as is.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Mapping

import jax
import numpy as np

from rlj import host_data, rl_algos, train_state
from rlj.rl_loop import make_logp_fn
from rlj.train_step import train_step


def sft_batch(prompts: Mapping[str, np.ndarray], tokenizer, completion_len: int) -> dict[str, np.ndarray]:
  """Prompt batch + reference answers -> tokens [B, P+T], attn_mask, target mask [B, T]."""
  tok = np.asarray(prompts["prompt_tokens"], np.int32)
  pmask = np.asarray(prompts["prompt_mask"], np.int32)
  valid = np.asarray(prompts.get("valid", np.ones(len(tok), bool)), bool)
  b = tok.shape[0]
  target = np.full((b, completion_len), tokenizer.pad_id, np.int32)
  tmask = np.zeros((b, completion_len), np.int32)
  for i, answer in enumerate(prompts["answer"]):
    if not valid[i]:
      continue
    ids = tokenizer.encode(str(answer), add_eos=True)[:completion_len]
    target[i, :len(ids)] = ids
    tmask[i, :len(ids)] = 1
  return {"tokens": np.concatenate([tok, target], 1), "attn_mask": np.concatenate([pmask * valid[:, None], tmask], 1),
          "mask": tmask.astype(np.float32)}


def run_sft(state, *, model, tx, mesh, rules, state_shardings, tokenizer, train_iter, completion_len: int,
            steps: int, writer, start_step: int = 0, eval_fn=None, eval_every: int = 0, on_step_end=None,
            max_consecutive_skips: int = 0, seed: int = 0, log_prefix: str = "sft/") -> tuple[Any, list[dict]]:
  """Runs SFT updates ``start_step + 1 .. steps``; returns the final state and the logged records.

  ``on_step_end(done, state) -> bool`` runs after each step (the launcher saves there); True stops at that
  step boundary. A non-finite update is skipped by ``train_step``; ``max_consecutive_skips`` in a row raise
  ``train_state.NonFiniteUpdates``.
  """
  logp_fn = make_logp_fn(model.apply, completion_len=completion_len, temperature=1.0, mesh=mesh, rules=rules)
  step = functools.partial(train_step, logp_fn=logp_fn, objective=rl_algos.sft_objective, tx=tx)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  step_fn = jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated))
  root = jax.random.key(seed)
  history = []
  skips = train_state.SkipCounter(max_consecutive_skips, what="SFT updates",
                                  hint="Lower sft.optim.learning_rate or check the data")
  for i in range(start_step, steps):
    t0 = time.perf_counter()
    batch = sft_batch(next(train_iter), tokenizer, completion_len)
    with jax.set_mesh(mesh):
      state, m = step_fn(state, host_data.to_global(batch, mesh, rules), jax.random.fold_in(root, i))
    m = {log_prefix + k: float(v) for k, v in jax.device_get(m).items()}
    m["loss"] = m[log_prefix + "loss"]
    dt = time.perf_counter() - t0
    m["tokens_per_s"] = host_data.process_sum(batch["attn_mask"].sum()) / max(dt, 1e-9)
    done = i + 1
    if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
      m.update(eval_fn(state.params, done))
    writer.write(done, m)
    history.append({"step": done, **m})
    skips.add(m[log_prefix + "skipped"], f"at step {done}")
    if on_step_end is not None and on_step_end(done, state):
      break
  return state, history
