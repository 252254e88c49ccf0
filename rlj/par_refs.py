"""PAR's reference rewards in the RL loop: reference completions of each new prompt, scored once and cached.

``rewards.par`` defines Preference As Reward (Fu et al., arXiv:2502.18770): a wrapped reward r scores a completion
y of prompt x as mean_m sigmoid(r(x, y) - r(x, y_ref_m)). The loop (``rlj.rl_loop.Trainer.rollout``) calls
``ParReferences.prepare`` with each prompt batch before the rollout's rewards:

  1. the prompts whose reference rewards are not cached yet (keys: ``rewards.par.prompt_key``) are counted over
     every process; none anywhere -> nothing runs (a prompt seen again costs nothing);
  2. else the reference policy (``source``: the frozen reference, i.e. the policy at RL step 0; or the current
     policy) completes this process's whole prompt batch: greedily with one completion per prompt
     (``decode="greedy"``, a sampler of its own), or with the rollout sampler, keeping the first ``num_refs`` of
     its G samples per prompt (``decode="sample"``). Whole batches on every process keep the sampling program
     collective; every process takes part when any process has a new prompt;
  3. each PAR reward's wrapped reward scores the new prompts' reference completions (``rewards.combine.compute``:
     the same metadata, fault policy and NaN rule as the rollout's rewards), and the results enter its cache.

State: the caches are this process's host state (``host_state`` / ``load_host_state``, saved with every checkpoint
by ``rlj.lifecycle.Lifecycle.save(host=...)``); each process caches the prompts of its own data shard, which it
gets back on resume, so a resumed run recomputes no reference.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rewards import combine, par
from rlj import evaluation, host_data

_PREFIX = "par/"


class ParReferences:
  """The reference rewards of every PAR reward of a run (they share one set of reference completions).

  Args:
    rewards: ``[(name, rewards.par.ParReward)]``, all with the same settings.
    sampler: draws the references: a greedy sampler with one sample per prompt (``decode="greedy"``) or the
      rollout's sampler (``decode="sample"``, at least ``num_refs`` samples per prompt).
    tokenizer: decodes the reference completions for the wrapped rewards.

  Raises:
    ValueError: rewards with different settings, or a sampler that does not fit them.
  """

  def __init__(self, rewards: Sequence[tuple[str, par.ParReward]], *, sampler, tokenizer):
    if not rewards:
      raise ValueError("ParReferences needs at least one PAR reward")
    settings = {fn.settings for _, fn in rewards}
    if len(settings) != 1:
      raise ValueError(f"the PAR rewards {[n for n, _ in rewards]} share one set of reference completions; give them "
                       f"the same settings, got {sorted(map(str, settings))}")
    self.rewards, self.settings = list(rewards), settings.pop()
    self.sampler, self.tokenizer = sampler, tokenizer
    s = sampler.config
    if self.settings.decode == "greedy" and (not s.greedy or s.num_samples != 1):
      raise ValueError("decode='greedy' needs a greedy sampler with one sample per prompt")
    if self.settings.decode == "sample" and s.num_samples < self.settings.num_refs:
      raise ValueError(f"num_refs={self.settings.num_refs} sampled references need a sampler with at least as many "
                       f"samples per prompt, it has {s.num_samples}")

  def prepare(self, prompts: Mapping[str, Any], *, rng, policy_weights: Callable[[], Any],
              reference_weights: Callable[[], Any]) -> dict[str, float]:
    """Caches the reference rewards of the prompts in ``prompts`` (this process's batch: ``prompt``, ``answer``,
    ``prompt_tokens``, ``prompt_mask``) that are not cached yet.

    Args:
      rng: the sampler's key (``decode="sample"``).
      policy_weights, reference_weights: the current policy's / the frozen reference's sampler weights, called
        only when references are drawn (``source`` picks one).

    Returns:
      Metrics: ``par/new_prompts`` (distinct, all processes), ``par/cached_prompts`` (this process) and, per reward,
      ``par/<name>/ref_reward`` (the mean reference reward of the batch's prompts); ``time/par_references`` when
      references were drawn.
    """
    prompt_texts = [str(p) for p in prompts["prompt"]]
    answers = [str(a) for a in prompts["answer"]]
    rubrics = None if "rubric" not in prompts else [str(r) for r in prompts["rubric"]]
    questions = None if "question" not in prompts else [str(q) for q in prompts["question"]]   # what a judge sees
    keys = [par.prompt_key(p, a if rubrics is None else a + "\x00" + rubrics[b])   # a rubric is part of the key
            for b, (p, a) in enumerate(zip(prompt_texts, answers))]
    first = {k: b for b, k in reversed(list(enumerate(keys)))}          # a prompt twice in a batch: scored once
    new = sorted(b for k, b in first.items() if any(k not in fn.cache for _, fn in self.rewards))
    n_new = host_data.process_sum(len(new))
    metrics = {"par/new_prompts": n_new}
    if n_new:
      t0 = time.perf_counter()
      weights = reference_weights() if self.settings.source == "reference" else policy_weights()
      ro = self.sampler.sample(weights, prompts["prompt_tokens"], prompts["prompt_mask"], rng)
      if new:
        self._score(ro, keys, prompt_texts, answers, new, rubrics, questions)
      metrics["time/par_references"] = time.perf_counter() - t0
    metrics["par/cached_prompts"] = float(len(self.rewards[0][1].cache))
    for name, fn in self.rewards:
      refs = fn.cache.get(keys)
      finite = np.isfinite(refs)
      total, count = host_data.process_sum(refs[finite].sum()), host_data.process_sum(finite.sum())
      metrics[f"par/{name}/ref_reward"] = total / count if count else float("nan")
    return metrics

  def _score(self, ro, keys: list[str], prompt_texts: list[str], answers: list[str], new: list[int],
             rubrics: list[str] | None = None, questions: list[str] | None = None) -> None:
    """The wrapped rewards of the new prompts' reference completions (rows b * S + m, m < num_refs) -> caches."""
    s, m = self.sampler.config.num_samples, self.settings.num_refs
    rows = np.array([b * s + j for b in new for j in range(m)])
    texts = evaluation.rollout_texts(self.tokenizer, ro, self.sampler.config.stop_set)
    local = {k: host_data.to_local(getattr(ro, k))[rows] for k in ("tokens", "attn_mask", "mask", "lengths")}
    batch = dict(answers=combine.repeat_per_prompt([answers[b] for b in new], m), lengths=local["lengths"],
                 tokens=local["tokens"], attn_mask=local["attn_mask"],
                 completion_mask=local["mask"].astype(np.float32), group_size=m)
    if rubrics is not None:
      batch["rubrics"] = combine.repeat_per_prompt([rubrics[b] for b in new], m)
    if questions is not None:   # the same reward call as the rollout's (rlj.rl_loop.Trainer.rollout)
      batch["questions"] = combine.repeat_per_prompt([questions[b] for b in new], m)
    new_prompts = combine.repeat_per_prompt([prompt_texts[b] for b in new], m)
    new_texts = [texts[i] for i in rows]
    for name, fn in self.rewards:
      values = combine.compute([(f"{name} (PAR reference)", fn.inner)], new_prompts, new_texts,
                               num_generations=m, **batch).values[..., 0]             # [len(new), M]
      fn.cache.put([keys[b] for b in new], values)

  def host_state(self) -> dict[str, np.ndarray]:
    """Every PAR reward's cache: ``par/<name>/keys`` and ``par/<name>/rewards``."""
    return {f"{_PREFIX}{name}/{k}": v for name, fn in self.rewards for k, v in fn.cache.host_state().items()}

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    for name, fn in self.rewards:
      prefix = f"{_PREFIX}{name}/"
      fn.cache.load_host_state({k[len(prefix):]: v for k, v in host.items() if k.startswith(prefix)})
