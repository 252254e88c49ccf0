"""The RL loop: sample -> rewards -> train batch -> reference log-probs -> updates -> metrics -> checkpoint.

One RL step is one rollout of ``B`` prompts x ``G`` completions followed by ``num_epochs`` passes of
``num_minibatches`` optimizer updates (the jitted ``rlj.train_step.train_step``). Everything the loop needs is
built by the launcher and handed in (``Components``); the loop reads no config and names no algorithm: the
algorithm's row (``rlj.rl_algos``) builds the batch, says whether a reference is used, and keeps whatever host
state it needs (DNO's replay pools and reference swaps, ``rlj.dno_replay``). The programs come from
``rlj.programs``, the checkpoints from ``rlj.lifecycle``. With ``sample_ahead`` the steps run pipelined, the next
rollout sampled while this one is scored (``rlj.sample_ahead.run``, with the same methods).

RNG: the key of RL step ``s`` is ``fold_in(root, s)``; sampling, minibatch shuffling and evaluation take
named sub-streams of it, so a resumed run replays the same randomness.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from algorithms import common, mismatch
from rewards import combine
from rlj import evaluation, host_data, logprobs, packing, programs, rollout_stats, sample_ahead, sharding, train_state
from rlj.agents import rollout as rollout_agent
from rlj.batches import minibatches
from rlj.dynamic_sampling import DynamicSampler
from rlj.kl_controller import AdaptiveKL
from rlj.loop_config import LoopConfig  # noqa: F401  (re-exported: rl_loop.LoopConfig)


@dataclasses.dataclass
class Components:
  """Built objects the loop uses."""
  model: Any
  tx: Any
  mesh: Any
  rules: Any
  state_shardings: Any
  sampler: Any
  tokenizer: Any
  train_iter: Any
  reward_fns: list
  reward_weights: np.ndarray
  writer: Any
  eval_fn: Callable[[Any, int], dict] | None = None      # (params, step) -> held-out metrics
  sampler_shardings: Any = None
  sampler_dtype: Any = None
  lora: Any = None        # rlj.lora_policy.LoraPolicy: the state holds adapters, the frozen base is the reference
  step_rewards: Any = None   # rewards.steps.StepRewards: process supervision's step rewards (estimator "process")
  par: Any = None         # rlj.par_refs.ParReferences: the reference rewards of PAR rewards (rewards.par)
  agent: Any = None       # rlj.agents.rollout.MultiTurnSampler: multi-turn trajectories instead of completions


def place_batch(batch: Mapping[str, np.ndarray], mesh, rules) -> dict:
  """Whole host arrays (the same on every process) -> device arrays: leading dim over the batch axes when it
  divides, scalars replicated (``rlj.host_data.from_host``)."""
  return host_data.from_host(batch, mesh, rules)


class Trainer:
  """Holds the compiled programs and the algorithm's batcher; ``run`` drives the loop to ``total_steps``."""

  def __init__(self, comps: Components, cfg: LoopConfig):
    self.c, self.cfg = comps, cfg
    self.algo = cfg.row
    progs = programs.rl_programs(comps.model, comps.tx, cfg.program_settings(), mesh=comps.mesh, rules=comps.rules,
                                 state_shardings=comps.state_shardings,
                                 combine=None if comps.lora is None else comps.lora.step_params)
    self.step_fn, self.logp_fn = progs.step, progs.logp
    self.batcher = self.algo.batcher(cfg.algo_settings)
    self.dynamic = DynamicSampler(cfg.dynamic_sampling, weights=comps.reward_weights, group_size=cfg.num_generations,
                                  pad_id=cfg.algo_settings.pad_id)
    self.kl_control = AdaptiveKL.for_loop(cfg)
    self.root = jax.random.key(cfg.seed)
    self.skips = train_state.SkipCounter(
        cfg.max_consecutive_skips, what="optimizer updates",
        hint="Check the rewards and advantages for NaN/Inf, lower optim.learning_rate")
    # The held-out eval before any RL update (step 0); saved in every checkpoint's meta as "start_eval" so that
    # a resumed run can still compare against it. The launcher sets it from a resumed checkpoint's meta.
    self.start_eval: dict | None = None
    self._early_ref = None   # (rollout tokens, reference log-probs started by ``rollout``) for ``build_batch``
    if cfg.sample_ahead:
      comps.train_iter = sample_ahead.wrap(comps.train_iter, track=True)

  # ---------------------------------------------------------------------------------------------- weights
  def policy_weights(self, params):
    """The policy's full weights: the state's params, or with LoRA the base merged with the state's adapters."""
    return params if self.c.lora is None else self.c.lora.merged(params)

  def sampler_params(self, params):
    """The sampler's weights (its dtype and shardings); with LoRA merged and cast in one program."""
    c = self.c
    if c.lora is not None and c.sampler_shardings is None:
      return c.lora.merged(params, c.sampler_dtype)
    params = self.policy_weights(params)
    if c.sampler_shardings is None and c.sampler_dtype is None:
      return params
    shard = c.sampler_shardings or jax.tree.map(lambda x: x.sharding, params)
    return sharding.sync_weights(params, shard, dtype=c.sampler_dtype)

  def reference_params(self, ref_params):
    """The reference's weights: with LoRA the frozen base itself (adapters off), else the kept copy."""
    return ref_params if self.c.lora is None else self.c.lora.base

  def reference_sampler_params(self, ref_params):
    """The reference's weights for the sampler (its dtype and shardings): the policy at RL step 0 (with LoRA the
    base: the adapters start at zero). For PAR's reference completions (``rlj.par_refs``)."""
    c, params = self.c, self.reference_params(ref_params)
    if params is None:
      raise ValueError("PAR source='reference' needs the frozen reference, and this run keeps none")
    if c.sampler_shardings is None and c.sampler_dtype is None:
      return params
    shard = c.sampler_shardings or jax.tree.map(lambda x: x.sharding, params)
    return sharding.sync_weights(params, shard, dtype=c.sampler_dtype)

  # ---------------------------------------------------------------------------------------------- rollout

  def host_logp(self, params, tokens: np.ndarray, attn_mask: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Teacher-forced log-probs [N, T] of whole host rows (the same on every process), as numpy."""
    return host_data.gather(self.dispatch_logp(params, tokens, attn_mask, mask))

  def dispatch_logp(self, params, tokens: np.ndarray, attn_mask: np.ndarray, mask: np.ndarray) -> jax.Array:
    """Starts the log-prob pass of ``host_logp`` and returns its device result without waiting for it; on packed
    rows with ``packing`` (``mask``, the trained completion tokens, says what each row must keep)."""
    c = self.c
    rows = {"tokens": tokens, "attn_mask": attn_mask}
    if self.cfg.packing:
      chunks = logprobs.chunk_count(tokens.shape[0], self.cfg.program_settings().logp_chunks)
      rows = packing.packed_batch({**rows, "mask": mask}, chunks=chunks, mesh=c.mesh, rules=c.rules,
                                  pad_id=self.cfg.algo_settings.pad_id)
    placed = place_batch(rows, c.mesh, c.rules)
    with jax.set_mesh(c.mesh):
      return self.logp_fn(params, placed["tokens"], placed["attn_mask"], packing.of(placed))

  def sample(self, state, prompts: Mapping[str, np.ndarray], rng) -> tuple:
    """Starts this process's rollout of ``prompts`` with the policy of ``state`` (the sampler's program is
    dispatched, not waited for): ``(rollout, texts or None, reward extras, agent metrics)``."""
    weights = self.sampler_params(state.params)
    if self.c.agent is None:
      return self.c.sampler.sample(weights, prompts["prompt_tokens"], prompts["prompt_mask"], rng), None, {}, {}
    ar = self.c.agent.sample(weights, prompts, rng)   # multi-turn trajectories: rewards read the last model turn
    return ar.rollout, ar.texts, {"turn_rewards": ar.turn_rewards}, rollout_agent.summary(ar)

  def rollout(self, state, prompts: Mapping[str, np.ndarray], rng, step: int = 0,
              ref_params=None, sampled: tuple | None = None) -> tuple[dict, Any, dict]:
    c, cfg, g = self.c, self.cfg, self.cfg.num_generations
    t0 = time.perf_counter()
    # This process's prompts -> the global batch's rollout (multi-process: every process samples its rows);
    # ``sampled``: started earlier by ``sample`` (sample_ahead).
    ro, texts, extra, agent_m = self.sample(state, prompts, rng) if sampled is None else sampled
    extra = dict(extra)
    # Rewards of this process's rows (its own prompts, all G completions of each), then of every row.
    local = {"tokens": host_data.to_local(ro.tokens), "attn_mask": host_data.to_local(ro.attn_mask),
             "mask": host_data.to_local(ro.mask).astype(np.float32)}
    # The whole batch on every process: advantages, pairs and minibatches are then those of one process.
    arrays = {"tokens": host_data.gather(ro.tokens), "attn_mask": host_data.gather(ro.attn_mask),
              "mask": host_data.gather(ro.mask).astype(np.float32)}
    t1 = time.perf_counter()
    # The log-prob passes that read only the rollout start now; the device runs them while the host detokenises
    # and scores it (JAX dispatches asynchronously); their results are read after the rewards.
    trainer_pending = (self.dispatch_logp(self.policy_weights(state.params), arrays["tokens"], arrays["attn_mask"],
                                          arrays["mask"]) if cfg.trainer_pass(step) else None)
    self._early_ref = None
    if cfg.use_reference and self.algo.fixed_rows and not cfg.dynamic_sampling.enabled:
      self._early_ref = (arrays["tokens"], self.dispatch_logp(self.reference_params(ref_params), arrays["tokens"],
                                                              arrays["attn_mask"], arrays["mask"]))
    if texts is None:
      texts = evaluation.rollout_texts(c.tokenizer, ro, c.sampler.config.stop_set)
    prompt_texts = combine.repeat_per_prompt([str(p) for p in prompts["prompt"]], g)
    answers = combine.repeat_per_prompt([str(a) for a in prompts["answer"]], g)
    if "question" in prompts:   # the examples' own prompt texts, what a judge is shown (not the rendered prompt)
      extra["questions"] = combine.repeat_per_prompt([str(q) for q in prompts["question"]], g)
    if "rubric" in prompts:   # per-example rubric items (data.source=rubric), for rubric_judge items="data"
      extra["rubrics"] = combine.repeat_per_prompt([str(r) for r in prompts["rubric"]], g)
    # PAR: the reference rewards of prompts seen for the first time, before the rewards that read them.
    par_m = {} if c.par is None else c.par.prepare(
        prompts, rng=jax.random.split(rng)[0], policy_weights=lambda: self.sampler_params(state.params),
        reference_weights=lambda: self.reference_sampler_params(ref_params))
    rewards = combine.compute(c.reward_fns, prompt_texts, texts, num_generations=g, answers=answers,
                              lengths=host_data.to_local(ro.lengths), tokens=local["tokens"],
                              attn_mask=local["attn_mask"], completion_mask=local["mask"], group_size=g, **extra)
    values = host_data.gather_rows(rewards.values.reshape((-1,) + rewards.values.shape[2:]), c.mesh, c.rules)
    rewards = rewards._replace(values=values.reshape((-1,) + rewards.values.shape[1:]))    # [B, G, K] global
    steps = {} if c.step_rewards is None else self.step_rewards(ro, prompt_texts, answers, local)
    t2 = time.perf_counter()
    arrays.update(steps)
    sampler_logp = host_data.gather(ro.logp).astype(np.float32)
    if cfg.old_logp_source != "current":  # on-policy: the objective takes the current log-probs
      arrays["old_logp"] = sampler_logp
    lengths = host_data.gather(ro.lengths)
    mm = {} if trainer_pending is None else self.trainer_logp(trainer_pending, arrays, sampler_logp)
    t3 = time.perf_counter()
    completion = arrays["tokens"][:, arrays["tokens"].shape[1] - arrays["mask"].shape[1]:]
    sc = c.sampler.config
    metrics = {**mm, **par_m, **agent_m, "time/sample": t1 - t0, "time/reward": t2 - t1, "time/reference": t3 - t2,
               **rollout_stats.completion_lengths(completion, arrays["mask"], max_new_tokens=completion.shape[1],
                                                  stop_ids=sc.stop_set),
               **rollout_stats.finished_row_steps(lengths),
               "entropy": rollout_stats.sampler_entropy(sampler_logp, arrays["mask"]),   # of the sampler's q
               "sampled_tokens": float(lengths.sum())}
    if cfg.mask_truncated:   # DAPO's overlong filtering: the rewards stay, the tokens leave the loss
      arrays["mask"] = rollout_stats.overlong_filtered(arrays["mask"], rollout_stats.truncated(
          completion, arrays["mask"], max_new_tokens=completion.shape[1], stop_ids=sc.stop_set))
    summed = combine.weighted_total(rewards.values, c.reward_weights)
    metrics["reward/mean"] = float(np.nanmean(summed))
    for k, name in enumerate(rewards.names):
      metrics[f"reward/{name}"] = float(np.nanmean(rewards.values[..., k]))
    metrics["frac_reward_zero_std"] = float(_frac_constant(summed))
    metrics.update({k: host_data.process_sum(v) for k, v in rewards.fault_metrics().items()})  # on_error="missing"
    return arrays, rewards, metrics

  def step_rewards(self, ro, prompt_texts: list, answers: list, local: dict) -> dict:
    """Process supervision: this process's rows split into steps, their step rewards and end tokens
    (``rewards.steps.StepRewards``), then every row's: ``step_rewards`` / ``step_ends`` [N, T]."""
    c, sc = self.c, self.c.sampler.config
    out = c.step_rewards(lambda ids: c.tokenizer.decode(ids, stop_at_eos=False), prompt_texts,
                         host_data.to_local(ro.completion), local["mask"],
                         stop_ids=c.tokenizer.eos_ids if sc.stop_set is None else sc.stop_set, answers=answers,
                         lengths=host_data.to_local(ro.lengths), tokens=local["tokens"],
                         attn_mask=local["attn_mask"], completion_mask=local["mask"],
                         group_size=self.cfg.num_generations)
    return {k: host_data.gather_rows(v, c.mesh, c.rules) for k, v in out.items()}

  def trainer_logp(self, pending: jax.Array, arrays: dict, sampler_logp: np.ndarray) -> dict:
    """The trainer's log-probs of the rollout (``pending``, from ``dispatch_logp``): the old log-probs when
    recomputed, the mismatch correction's ``is_weight`` when one is set (both into ``arrays``); returns the
    ``mismatch/*`` metrics."""
    cfg = self.cfg
    trainer = host_data.gather(pending)
    band = {"low": cfg.mismatch_low, "high": cfg.mismatch_high}
    m = _mismatch_diagnostics(trainer, sampler_logp, arrays["mask"], **band)
    if cfg.old_logp_source == "recompute":
      arrays["old_logp"] = trainer
    if cfg.mismatch_correction != "none":
      w = _mismatch_weights(trainer, sampler_logp, arrays["mask"], mode=cfg.mismatch_correction, **band)
      arrays["is_weight"] = np.asarray(w)
      m["weight_mean"] = common.masked_mean(w, arrays["mask"])
    return {f"mismatch/{k}": float(v) for k, v in m.items()}

  # ---------------------------------------------------------------------------------------------- batches
  def build_batch(self, arrays: dict, rewards, ref_params, step: int) -> tuple[dict, dict]:
    """The algorithm's train batch, with reference log-probs of its rows when the algorithm uses them."""
    batch, m = self.batcher.build(arrays, rewards.values, self.c.reward_weights, step)
    if self.cfg.use_reference:  # without one no reference forward pass runs (and no KL is reported)
      t0 = time.perf_counter()
      early, self._early_ref = self._early_ref, None
      if early is not None and batch["tokens"] is early[0]:   # the rollout's own rows: started in ``rollout``
        batch["ref_logp"] = host_data.gather(early[1])
      else:
        batch["ref_logp"] = self.host_logp(self.reference_params(ref_params), batch["tokens"], batch["attn_mask"],
                                           batch["mask"])
      m["time/reference"] = time.perf_counter() - t0
    return batch, m

  def train_batch(self, arrays: dict, rewards, ref_params, step: int, metrics: dict) -> tuple[dict, float]:
    """``build_batch`` plus the KL controller's beta_t (a traced scalar; none without the controller); its metrics
    go into ``metrics`` (the reference pass's time added to ``time/reference``). Returns (batch, that time)."""
    batch, bm = self.build_batch(arrays, rewards, ref_params, step)
    batch.update(self.kl_control.batch_fields())
    reference_time = bm.pop("time/reference", 0.0)
    metrics["time/reference"] += reference_time
    metrics.update(bm)
    return batch, reference_time

  # ---------------------------------------------------------------------------------------------- updates
  def update(self, state, batch: dict, rng, step: int) -> tuple[Any, dict]:
    state, pending = self.dispatch_update(state, batch, rng, step)
    return state, self.finish_update(pending, step)

  def dispatch_update(self, state, batch: dict, rng, step: int) -> tuple[Any, tuple]:
    """Dispatches the step's optimizer updates; returns the new state and what ``finish_update`` reads."""
    cfg, c = self.cfg, self.c
    frozen = () if c.lora is None else (c.lora.base,)
    shuffle_rng = np.random.default_rng([cfg.seed, step, 1])
    per_update, fills = [], []
    for epoch in range(cfg.num_epochs):
      for i, mb in enumerate(minibatches(batch, num_minibatches=cfg.num_minibatches, unit=self.algo.unit,
                                         rng=shuffle_rng)):
        if cfg.packing:   # one packing group per (micro-batch, batch shard): rlj.packing
          mb = packing.packed_batch(mb, chunks=cfg.num_microbatches, mesh=c.mesh, rules=c.rules,
                                    pad_id=cfg.algo_settings.pad_id)
          fills.append(packing.fill(mb))
        with jax.set_mesh(c.mesh):
          state, m = self.step_fn(state, place_batch(mb, c.mesh, c.rules),
                                  jax.random.fold_in(rng, epoch * cfg.num_minibatches + i), *frozen)
        per_update.append(m)
    return state, (per_update, fills)

  def finish_update(self, pending: tuple, step: int) -> dict:
    """The update metrics of ``dispatch_update`` (waits for the updates); counts non-finite ones."""
    per_update, fills = pending
    per_update = jax.device_get(per_update)  # one transfer per RL step, after every update was dispatched
    per_update = [self.skips.update(m, f"in RL step {step + 1}") for m in per_update]
    metrics = {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}
    metrics["skipped"] = float(sum(m["skipped"] for m in per_update))
    metrics["skipped_total"] = float(self.skips.total)
    if fills:
      metrics["packing/fill"] = float(np.mean(fills))
    return metrics

  # ---------------------------------------------------------------------------------------------- host state
  def host_state(self) -> dict[str, np.ndarray]:
    """This process's loop state that is not in the train state (the algorithm batcher's, the KL controller's)."""
    return {**self.batcher.host_state(), **self.kl_control.host_state(),
            **({} if self.c.par is None else self.c.par.host_state())}

  def load_host_state(self, host: Mapping[str, np.ndarray] | None) -> None:
    if host:
      self.batcher.load_host_state(host)
      self.kl_control.load_host_state(host)
      if self.c.par is not None:
        self.c.par.load_host_state(host)

  # ---------------------------------------------------------------------------------------------- eval
  def evaluate(self, params, step: int) -> dict:
    if self.c.eval_fn is None:
      return {}
    return self.c.eval_fn(self.sampler_params(params), step)

  # ---------------------------------------------------------------------------------------------- loop
  def step_rngs(self, step: int) -> tuple[jax.Array, jax.Array]:
    """(sampling, training) keys of RL step ``step``."""
    rng_sample, rng_train = jax.random.split(jax.random.fold_in(self.root, step))
    return rng_sample, rng_train

  def run(self, state, ref_params, *, start_step: int = 0, job=None,
          end_step: int | None = None) -> tuple[Any, Any, list[dict]]:
    """Runs RL steps ``start_step + 1 .. total_steps`` (or ``.. end_step``); returns ``(state, ref_params,
    history)``. With ``sample_ahead`` a rollout started ahead by one call is taken by the next call.

    With ``job`` (an ``rlj.lifecycle.Lifecycle``) checkpoints are saved when due, on the last step and on a
    stop request, which ends the loop at that step boundary.

    Raises:
      train_state.NonFiniteUpdates: after ``max_consecutive_skips`` non-finite updates in a row.
    """
    cfg, c = self.cfg, self.c
    history = []
    on_step_end = None
    if job is not None:
      on_step_end = job.hook(lambda done, st, ref: job.save(
          done, st, extra={"ref_params": ref if cfg.use_reference and c.lora is None else None},
          host=self.host_state(), meta={"start_eval": self.start_eval} if self.start_eval else None))
    if start_step == 0 and cfg.eval_every:
      m = self.evaluate(state.params, 0)
      self.start_eval = {k: float(v) for k, v in m.items()} or None
      c.writer.write(0, m)
      history.append({"step": 0, **m})
    end = cfg.total_steps if end_step is None else end_step
    if cfg.sample_ahead:
      state, ref_params = sample_ahead.run(self, state, ref_params, start_step=start_step, end_step=end,
                                           on_step_end=on_step_end, history=history)
      return state, ref_params, history
    for step in range(start_step, end):
      t0 = time.perf_counter()
      ref_params = self.batcher.begin_step(step, state.params, ref_params)
      rng_sample, rng_train = self.step_rngs(step)
      # One rollout of the next prompt batch; with dynamic sampling more until the batch's groups have spread.
      arrays, rewards, metrics = self.dynamic.collect(
          lambda r: self.rollout(state, next(c.train_iter), r, step, ref_params), rng_sample, step)
      t1 = time.perf_counter()
      batch, reference_time = self.train_batch(arrays, rewards, ref_params, step, metrics)
      state, um = self.update(state, batch, rng_train, step)
      t2 = time.perf_counter()
      metrics["time/update"] = t2 - t1 - reference_time
      metrics["time/step"] = t2 - t0
      if self.end_step(state, ref_params, step, metrics, um, batch["tokens"].shape[0], history, on_step_end):
        break
    return state, ref_params, history

  def end_step(self, state, ref_params, step: int, metrics: dict, um: dict, rows: int, history: list,
               on_step_end) -> bool:
    """The end of RL step ``step``: update metrics, the KL controller, evaluation when due, the metrics record,
    then ``on_step_end`` (checkpoint when due); returns True to stop."""
    cfg, c = self.cfg, self.c
    metrics.update(um)
    metrics.update(self.kl_control.update(um.get("kl"), rows))
    metrics["time/host_overhead"] = max(metrics["time/step"] - metrics["time/sample"] - metrics["time/reference"]
                                        - metrics["time/update"], 0.0)
    metrics["tokens_per_s"] = metrics["sampled_tokens"] / max(metrics["time/step"], 1e-9)
    metrics.update(self.batcher.step_metrics(step))
    done = step + 1
    if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.total_steps):
      metrics.update(self.evaluate(state.params, done))
    c.writer.write(done, metrics)
    history.append({"step": done, **metrics})
    return on_step_end is not None and on_step_end(done, state, ref_params)


_frac_constant = jax.jit(common.frac_constant_groups)
_mismatch_diagnostics = jax.jit(mismatch.diagnostics)
_mismatch_weights = jax.jit(mismatch.weights, static_argnames="mode")
