"""Held-out evaluation during training: greedy accuracy and sampled pass@k for verifiable tasks.

A completion is correct when ``reward_fn`` gives it a reward >= ``threshold`` (exact match gives 0/1).
Greedy: one argmax completion per prompt. Sampled: G completions per prompt at the training temperature;
``sampled_accuracy`` is the mean over all samples and ``pass@G`` the fraction of prompts with at least one
correct sample. In a multi-process job each process scores its own prompts and the metrics cover all of them.
Agent jobs evaluate greedy multi-turn trajectories instead (``evaluate_trajectories``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from rewards import combine
from rlj import host_data


def rollout_texts(tokenizer, rollout, stop_ids=None) -> list[str]:
  """Decodes this process's completion rows of a rollout, each up to and excluding its first stop id
  (``stop_ids``: the sampler's ``config.stop_set``; None: every EOS id of the tokenizer)."""
  from rlj.data import stops  # numpy only
  completion = host_data.to_local(rollout.completion)
  mask = host_data.to_local(rollout.mask)
  return stops.completion_texts(tokenizer, completion, mask, stop_ids=stop_ids)


def score(reward_fn: Callable, prompts: list[str], completions: list[str], answers: list[Any],
          lengths: np.ndarray) -> np.ndarray:
  return np.asarray(reward_fn(prompts, completions, answers=answers, lengths=lengths), np.float32)


def _every_process(values: np.ndarray) -> np.ndarray:
  """This process's per-prompt results -> all processes' (their number may differ; order is irrelevant)."""
  if not host_data.multiprocess():
    return values
  parts = host_data.allgather_json(values.tolist())
  return np.asarray([x for part in parts for x in part], values.dtype)


def evaluate(params: Any, batches: Iterable[Mapping[str, np.ndarray]], *, tokenizer, reward_fn: Callable,
             greedy_sampler=None, sampled_sampler=None, rng=None, threshold: float = 1.0,
             max_examples: int | None = None) -> dict[str, float]:
  """Runs the samplers over ``batches`` of prompts and returns accuracy metrics under ``eval/``."""
  import jax  # local: keeps the module importable for pure-numpy use
  correct_greedy, correct_sampled, pass_k, seen = [], [], [], 0
  for i, batch in enumerate(batches):
    valid = np.asarray(batch.get("valid", np.ones(len(batch["prompt"]), bool)), bool)
    prompts = [str(p) for p in batch["prompt"]]
    answers = [str(a) for a in batch["answer"]]
    if greedy_sampler is not None:
      ro = greedy_sampler.sample(params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(0))
      r = score(reward_fn, prompts, rollout_texts(tokenizer, ro, greedy_sampler.config.stop_set), answers,
                host_data.to_local(ro.lengths))
      correct_greedy.append(_every_process((r >= threshold)[valid]))
    if sampled_sampler is not None:
      g = sampled_sampler.config.num_samples
      ro = sampled_sampler.sample(params, batch["prompt_tokens"], batch["prompt_mask"], jax.random.fold_in(rng, i))
      r = score(reward_fn, combine.repeat_per_prompt(prompts, g),
                rollout_texts(tokenizer, ro, sampled_sampler.config.stop_set),
                combine.repeat_per_prompt(answers, g), host_data.to_local(ro.lengths)).reshape(-1, g)
      ok = (r >= threshold)[valid]
      correct_sampled.append(_every_process(ok.mean(axis=1)))
      pass_k.append(_every_process(ok.any(axis=1)))
    seen += int(host_data.process_sum(valid.sum()))
    if max_examples is not None and seen >= max_examples:
      break
  out = {"eval/examples": float(seen)}
  if correct_greedy:
    out["eval/accuracy"] = float(np.concatenate(correct_greedy).mean())
  if correct_sampled:
    out["eval/sampled_accuracy"] = float(np.concatenate(correct_sampled).mean())
    out[f"eval/pass@{sampled_sampler.config.num_samples}"] = float(np.concatenate(pass_k).mean())
  return out


AGENT_MEANS = ("turns", "tool_calls", "tool_errors", "malformed_calls", "hit_budget")


def evaluate_trajectories(params: Any, batches: Iterable[Mapping[str, np.ndarray]], *, sampler, reward_fn: Callable,
                          threshold: float = 1.0) -> dict[str, float]:
  """Greedy multi-turn trajectories (``sampler``: an ``rlj.agents.rollout.MultiTurnSampler``, one process) over
  ``batches``: under ``eval/``, the accuracy of their last turns, the fraction that called a tool
  (``tool_call_rate``) and the means of ``AGENT_MEANS`` per trajectory."""
  import jax  # local: keeps the module importable for pure-numpy use
  correct, stats = [], []
  for batch in batches:
    valid = np.asarray(batch.get("valid", np.ones(len(batch["prompt"]), bool)), bool)
    ar = sampler.sample(params, batch, jax.random.key(0))
    r = score(reward_fn, [str(p) for p in batch["prompt"]], ar.texts, [str(a) for a in batch["answer"]],
              ar.rollout.lengths)
    correct.append((r >= threshold)[valid])
    stats.append({k: v[valid] for k, v in ar.stats.items()})
  joined = {k: np.concatenate([s[k] for s in stats]) for k in AGENT_MEANS}
  out = {"eval/examples": float(sum(len(c) for c in correct)), "eval/accuracy": float(np.concatenate(correct).mean()),
         "eval/tool_call_rate": float(np.mean(joined["tool_calls"] > 0))}
  out.update({f"eval/{k}": float(np.mean(joined[k])) for k in AGENT_MEANS})
  return out
