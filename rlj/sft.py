"""Supervised fine-tuning (cold start): teacher-forced NLL of reference answers after their prompts.

Batches reuse the RL prompt pipeline (left-padded prompts with their reference answers); the answer is
tokenised with EOS, truncated or right-padded to the completion width T, and trained with the same jitted
``train_step`` as RL (``rlj.programs.sft_step``, objective ``rl_algos.sft_objective``), so an SFT checkpoint is an
RL policy as is. Checkpoints and resume follow the one job lifecycle (``rlj.lifecycle``).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import jax
import numpy as np

from rlj import host_data, programs, train_state


def sft_batch(prompts: Mapping[str, np.ndarray], tokenizer, completion_len: int,
              skip_spans: tuple = ()) -> dict[str, np.ndarray]:
  """Prompt batch + reference answers -> tokens [B, P+T], attn_mask, target mask [B, T].

  ``skip_spans``: ``((open_id, close_id), ...)``; the tokens from an ``open_id`` through the next ``close_id`` are
  attended to but not trained on (an agent demonstration's observations, which the environment writes).
  """
  tok = np.asarray(prompts["prompt_tokens"], np.int32)
  pmask = np.asarray(prompts["prompt_mask"], np.int32)
  valid = np.asarray(prompts.get("valid", np.ones(len(tok), bool)), bool)
  b = tok.shape[0]
  target = np.full((b, completion_len), tokenizer.pad_id, np.int32)
  tmask = np.zeros((b, completion_len), np.int32)
  loss = np.zeros((b, completion_len), np.float32)
  for i, answer in enumerate(prompts["answer"]):
    if not valid[i]:
      continue
    ids = tokenizer.encode(str(answer), add_eos=True)[:completion_len]
    target[i, :len(ids)] = ids
    tmask[i, :len(ids)] = 1
    loss[i, :len(ids)] = 1
    for open_id, close_id in skip_spans:
      inside = False
      for k, t in enumerate(ids):
        inside = inside or t == open_id
        if inside:
          loss[i, k] = 0
        inside = inside and t != close_id
  return {"tokens": np.concatenate([tok, target], 1), "attn_mask": np.concatenate([pmask * valid[:, None], tmask], 1),
          "mask": loss}


def run_sft(state, *, model, tx, mesh, rules, state_shardings, tokenizer, train_iter, completion_len: int,
            steps: int, writer, start_step: int = 0, eval_fn=None, eval_every: int = 0, job=None,
            max_consecutive_skips: int = 0, seed: int = 0, log_prefix: str = "sft/",
            skip_spans: tuple = ()) -> tuple[Any, list[dict]]:
  """Runs SFT updates ``start_step + 1 .. steps``; returns the final state and the logged records.

  With ``job`` (an ``rlj.lifecycle.Lifecycle``) checkpoints are saved when due, on the last step and on a stop
  request, which ends the loop at that step boundary. A non-finite update is skipped by ``train_step``;
  ``max_consecutive_skips`` in a row raise ``train_state.NonFiniteUpdates``.
  """
  step_fn = programs.sft_step(model, tx, mesh=mesh, rules=rules, state_shardings=state_shardings,
                              completion_len=completion_len)
  on_step_end = job.hook(lambda done, st: job.save(done, st)) if job is not None else None
  root = jax.random.key(seed)
  history = []
  skips = train_state.SkipCounter(max_consecutive_skips, what="SFT updates",
                                  hint="Lower sft.optim.learning_rate or check the data")
  for i in range(start_step, steps):
    t0 = time.perf_counter()
    batch = sft_batch(next(train_iter), tokenizer, completion_len, skip_spans)
    with jax.set_mesh(mesh):
      state, m = step_fn(state, host_data.to_global(batch, mesh, rules), jax.random.fold_in(root, i))
    done = i + 1
    m = skips.update(jax.device_get(m), f"at step {done}")
    m = {log_prefix + k: float(v) for k, v in m.items()}
    m["loss"] = m[log_prefix + "loss"]
    dt = time.perf_counter() - t0
    m["tokens_per_s"] = host_data.process_sum(batch["attn_mask"].sum()) / max(dt, 1e-9)
    if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
      m.update(eval_fn(state.params, done))
    writer.write(done, m)
    history.append({"step": done, **m})
    if on_step_end is not None and on_step_end(done, state):
      break
  return state, history
