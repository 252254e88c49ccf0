"""The RL loop: sample -> rewards -> advantages / pairs -> reference log-probs -> updates -> metrics.

One RL step is one rollout of ``B`` prompts x ``G`` completions followed by ``num_epochs`` passes of
``num_minibatches`` optimizer updates (the jitted ``rlj.train_step.train_step``). Everything the loop needs is
built by the launcher and handed in (``Components``); the loop reads no config.

RNG: the key of RL step ``s`` is ``fold_in(root, s)``; sampling, minibatch shuffling and evaluation take
named sub-streams of it, so a resumed run replays the same randomness.

DNO (``algo == "dno"``): iteration ``t`` covers ``dno_iteration_steps`` RL steps; the reference is the
policy at the start of the iteration (pi_t), and pairs of earlier iterations are replayed with the configured
fractions (their reference log-probs are recomputed under pi_t). ALGORITHMS.md §6.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rewards import combine
from rlj import evaluation, host_data, logprobs, rl_algos, sharding, train_state
from rlj.train_step import train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Plain settings of the RL loop (built from the config's ``algo``, ``train`` and ``sampler`` sections)."""
  algo: str
  loss_kwargs: Mapping[str, Any]
  adv_kwargs: Mapping[str, Any]
  total_steps: int
  num_generations: int
  temperature: float
  max_new_tokens: int
  num_epochs: int = 1
  num_minibatches: int = 1
  num_microbatches: int = 1
  recompute_old_logp: bool = False
  use_reference: bool = False
  eval_every: int = 0
  seed: int = 0
  dno_iteration_steps: int = 1
  dno_replay: Sequence[float] = ()
  dno_select: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_consecutive_skips: int = 0       # abort after this many non-finite updates in a row (0: never)

  @property
  def logp_chunks(self) -> int:
    """Chunks of the rollout's log-prob pass: one per optimizer micro-batch of the rollout."""
    return max(self.num_minibatches, 1) * max(self.num_microbatches, 1)


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
  checkpointer: Any = None
  eval_fn: Callable[[Any, int], dict] | None = None      # (params, step) -> held-out metrics
  sampler_shardings: Any = None
  sampler_dtype: Any = None


def make_logp_fn(apply_fn, *, completion_len: int, temperature: float, mesh=None, rules=None,
                 num_chunks: int = 1):
  """``(params, tokens [N, P+T], attn_mask) -> logp [N, T]`` with P taken from the tokens' width.

  ``apply_fn`` is a ``Transformer``'s apply: only the T positions that predict the completion are projected
  to logits (``logits_at``).

  With ``mesh`` (and ``rules``) the model's activation constraints apply (``sharding.activation_rules``), so
  the batch stays split over the batch axes through the logits instead of being gathered onto every device.

  ``num_chunks`` > 1 runs the rows in that many chunks one after another (``lax.map``; gcd(N, num_chunks) when
  it does not divide N), so the activations and [rows, T, V] logits alive at once are a chunk's: the trainer's
  rollout pass uses chunks of one optimizer micro-batch, whose forward and backward fit by construction.
  """
  def fn(params, tokens, attn_mask):
    with contextlib.ExitStack() as stack:
      if mesh is not None:
        stack.enter_context(sharding.activation_rules(mesh, sharding.DEFAULT_RULES if rules is None else rules))
      return logprobs.completion_logprobs(apply_fn, params, tokens, attn_mask, tokens.shape[1] - completion_len,
                                          temperature=temperature, logits_window=True)

  if num_chunks < 1:
    raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
  if num_chunks == 1:
    return fn

  def chunked(params, tokens, attn_mask):
    n = tokens.shape[0]
    k = math.gcd(n, num_chunks)
    if k == 1:
      return fn(params, tokens, attn_mask)
    split = lambda x: _rows_sharded(x.reshape((k, n // k) + x.shape[1:]), 1)      # each chunk over every device
    out = jax.lax.map(lambda xs: fn(params, *xs), (split(tokens), split(attn_mask)))
    return _rows_sharded(out.reshape((n,) + out.shape[2:]), 0)

  def _rows_sharded(x, axis):
    if mesh is None:
      return x
    names = (None,) * axis + ("batch",) + (None,) * (x.ndim - axis - 1)
    return jax.lax.with_sharding_constraint(   # replicated where the batch shards do not divide
        x, sharding.fitted_sharding(names, x.shape, mesh, sharding.DEFAULT_RULES if rules is None else rules))
  return chunked


def place_batch(batch: Mapping[str, np.ndarray], mesh, rules) -> dict:
  """Whole host arrays (the same on every process) -> device arrays: leading dim over the batch axes when it
  divides, scalars replicated (``rlj.host_data.from_host``)."""
  return host_data.from_host(batch, mesh, rules)


class Trainer:
  """Holds the compiled functions; ``run`` drives the loop from ``start_step`` to ``total_steps``."""

  def __init__(self, comps: Components, cfg: LoopConfig):
    self.c, self.cfg = comps, cfg
    self.algo = rl_algos.pick(rl_algos.ALGORITHMS, cfg.algo, "algorithm (config key algo.name)")
    make_logp = functools.partial(make_logp_fn, comps.model.apply, completion_len=cfg.max_new_tokens,
                                  temperature=cfg.temperature, mesh=comps.mesh, rules=comps.rules)
    logp_fn = make_logp()
    objective = functools.partial(self.algo.objective, **dict(cfg.loss_kwargs))
    step = functools.partial(train_step, logp_fn=logp_fn, objective=objective, tx=comps.tx,
                             num_microbatches=cfg.num_microbatches, sum_microbatches=self.algo.sum_microbatches)
    replicated = jax.sharding.NamedSharding(comps.mesh, jax.P())
    self.step_fn = jax.jit(step, donate_argnums=0, out_shardings=(comps.state_shardings, replicated))
    # The rollout's old / reference log-probs: all N rows, in chunks of one optimizer micro-batch.
    self.logp_fn = jax.jit(make_logp(num_chunks=cfg.logp_chunks))
    self.root = jax.random.key(cfg.seed)
    self.dno_history: list[dict] = []      # pair pools of finished DNO iterations (newest last)
    self.dno_current: list[dict] = []
    self.skips = train_state.SkipCounter(
        cfg.max_consecutive_skips, what="optimizer updates",
        hint="Check the rewards and advantages for NaN/Inf, lower optim.learning_rate")

  # ---------------------------------------------------------------------------------------------- rollout
  def sampler_params(self, params):
    if self.c.sampler_shardings is None and self.c.sampler_dtype is None:
      return params
    shard = self.c.sampler_shardings or jax.tree.map(lambda x: x.sharding, params)
    return sharding.sync_weights(params, shard, dtype=self.c.sampler_dtype)

  def host_logp(self, params, tokens: np.ndarray, attn_mask: np.ndarray) -> np.ndarray:
    """Teacher-forced log-probs [N, T] of whole host rows (the same on every process), as numpy."""
    placed = place_batch({"tokens": tokens, "attn_mask": attn_mask}, self.c.mesh, self.c.rules)
    with jax.set_mesh(self.c.mesh):
      return host_data.gather(self.logp_fn(params, placed["tokens"], placed["attn_mask"]))

  def rollout(self, state, ref_params, prompts: Mapping[str, np.ndarray], rng) -> tuple[dict, Any, dict]:
    c, cfg, g = self.c, self.cfg, self.cfg.num_generations
    t0 = time.perf_counter()
    # This process's prompts -> the global batch's rollout (multi-process: every process samples its rows).
    ro = c.sampler.sample(self.sampler_params(state.params), prompts["prompt_tokens"], prompts["prompt_mask"], rng)
    # Rewards of this process's rows (its own prompts, all G completions of each), then of every row.
    local = {"tokens": host_data.to_local(ro.tokens), "attn_mask": host_data.to_local(ro.attn_mask),
             "mask": host_data.to_local(ro.mask).astype(np.float32)}
    t1 = time.perf_counter()
    texts = evaluation.rollout_texts(c.tokenizer, ro)
    prompt_texts = combine.repeat_per_prompt([str(p) for p in prompts["prompt"]], g)
    answers = combine.repeat_per_prompt([str(a) for a in prompts["answer"]], g)
    rewards = combine.compute(c.reward_fns, prompt_texts, texts, num_generations=g, answers=answers,
                              lengths=host_data.to_local(ro.lengths), tokens=local["tokens"],
                              attn_mask=local["attn_mask"], completion_mask=local["mask"])
    values = host_data.gather_rows(rewards.values.reshape((-1,) + rewards.values.shape[2:]), c.mesh, c.rules)
    rewards = rewards._replace(values=values.reshape((-1,) + rewards.values.shape[1:]))    # [B, G, K] global
    t2 = time.perf_counter()
    # The whole batch on every process: advantages, pairs and minibatches are then those of one process.
    arrays = {"tokens": host_data.gather(ro.tokens), "attn_mask": host_data.gather(ro.attn_mask),
              "mask": host_data.gather(ro.mask).astype(np.float32),
              "old_logp": host_data.gather(ro.logp).astype(np.float32)}
    lengths = host_data.gather(ro.lengths)
    tokens, attn = arrays["tokens"], arrays["attn_mask"]
    if cfg.recompute_old_logp and self.algo.needs_old_logp:
      arrays["old_logp"] = self.host_logp(state.params, tokens, attn)
    if cfg.use_reference:  # without a KL term no reference forward pass runs (and no KL is reported)
      arrays["ref_logp"] = self.host_logp(ref_params, tokens, attn)
    t3 = time.perf_counter()
    metrics = {"time/sample": t1 - t0, "time/reward": t2 - t1, "time/reference": t3 - t2,
               "response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
               "sampled_tokens": float(lengths.sum())}
    summed = rl_algos.scalar_rewards(rewards.values, c.reward_weights)
    metrics["reward/mean"] = float(np.nanmean(summed))
    for k, name in enumerate(rewards.names):
      metrics[f"reward/{name}"] = float(np.nanmean(rewards.values[..., k]))
    constant = np.nanstd(summed, axis=1) == 0
    metrics["frac_reward_zero_std"] = float(constant.mean())
    metrics.update({k: host_data.process_sum(v) for k, v in rewards.fault_metrics().items()})  # on_error="missing"
    return arrays, rewards, metrics

  # ---------------------------------------------------------------------------------------------- batches
  def build_batch(self, arrays: dict, rewards, ref_params, step: int) -> tuple[dict, dict]:
    cfg, c = self.cfg, self.c
    if cfg.algo in ("grpo", "gdpo"):
      adv = rl_algos.advantages(cfg.algo, rewards.values, c.reward_weights, cfg.adv_kwargs)
      m = {"adv/abs_mean": float(np.abs(adv).mean()), "adv/distinct": float(len(np.unique(adv.round(4))))}
      if cfg.algo == "gdpo":  # GDPO's resolution against GRPO on the summed reward, same rollout
        base = rl_algos.advantages("grpo", rewards.values, c.reward_weights, cfg.adv_kwargs)
        m["adv/distinct_grpo_sum"] = float(len(np.unique(base.round(4))))
      return rl_algos.policy_gradient_batch(arrays, adv), m
    if cfg.algo == "p3o":
      return rl_algos.p3o_batch(arrays, rewards.values, c.reward_weights), {}
    sel = dict(cfg.dno_select)
    batch, m = rl_algos.dno_pairs(arrays, rewards.values, c.reward_weights, **sel)
    self.dno_current.append(rl_algos.take_units(batch, np.flatnonzero(batch["pair_valid"] > 0), 2))
    parts = [batch]
    n_pairs = batch["pair_valid"].shape[0]
    for back, frac in enumerate(cfg.dno_replay):
      if back >= len(self.dno_history) or frac <= 0:
        continue
      pool = self.dno_history[-(back + 1)]
      pool_pairs = pool["pair_valid"].shape[0]
      want = int(frac * n_pairs) // max(cfg.num_minibatches, 1) * max(cfg.num_minibatches, 1)
      if pool_pairs == 0 or want == 0:
        continue
      rng = np.random.default_rng([cfg.seed, step, back])
      pick = rng.choice(pool_pairs, size=want, replace=pool_pairs < want)
      parts.append(rl_algos.take_units(pool, pick, 2))
      m[f"dno/replay_pairs_{back + 1}"] = float(want)
    batch = rl_algos.concat_batches(parts, c.tokenizer.pad_id) if len(parts) > 1 else batch
    # Reference log-probs under pi_t, also for replayed pairs of earlier iterations.
    batch["ref_logp"] = self.host_logp(ref_params, batch["tokens"], batch["attn_mask"])
    return batch, m

  def dno_advance(self, state) -> Any:
    """Ends a DNO iteration: its pairs join the replay history and pi_{t+1} becomes the reference."""
    if self.dno_current:
      self.dno_history.append(rl_algos.concat_batches(self.dno_current, self.c.tokenizer.pad_id))
      self.dno_history = self.dno_history[-max(len(self.cfg.dno_replay), 1):]
    self.dno_current = []
    return jax.tree.map(jnp.copy, state.params)

  # ---------------------------------------------------------------------------------------------- updates
  def update(self, state, batch: dict, rng, step: int) -> tuple[Any, dict]:
    cfg, c = self.cfg, self.c
    shuffle_rng = np.random.default_rng([cfg.seed, step, 1])
    per_update = []
    for epoch in range(cfg.num_epochs):
      for i, mb in enumerate(rl_algos.minibatches(batch, num_minibatches=cfg.num_minibatches, unit=self.algo.unit,
                                                  rng=shuffle_rng)):
        with jax.set_mesh(c.mesh):
          state, m = self.step_fn(state, place_batch(mb, c.mesh, c.rules),
                                  jax.random.fold_in(rng, epoch * cfg.num_minibatches + i))
        per_update.append(m)
    per_update = jax.device_get(per_update)  # one transfer per RL step, after every update was dispatched
    metrics = {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}
    for m in per_update:
      self.skips.add(float(m["skipped"]), f"in RL step {step + 1}")
    metrics["skipped"] = float(sum(m["skipped"] for m in per_update))
    metrics["skipped_total"] = float(self.skips.total)
    return state, metrics

  # ---------------------------------------------------------------------------------------------- host state
  def host_state(self) -> dict[str, np.ndarray]:
    """This process's loop state that is not in the train state: DNO replay pools and skip counters."""
    out = {"skips_in_row": np.int64(self.skips.in_row), "skips_total": np.int64(self.skips.total),
           "dno_pools": np.int64(len(self.dno_history)), "dno_current": np.int64(len(self.dno_current))}
    for name, pools in (("hist", self.dno_history), ("cur", self.dno_current)):
      for j, pool in enumerate(pools):
        out.update({f"dno_{name}{j}/{k}": np.asarray(v) for k, v in pool.items()})
    return out

  def load_host_state(self, host: Mapping[str, np.ndarray]) -> None:
    self.skips.in_row, self.skips.total = int(host["skips_in_row"]), int(host["skips_total"])
    def pools(name, n):
      return [{k.split("/", 1)[1]: v for k, v in host.items() if k.startswith(f"dno_{name}{j}/")} for j in range(n)]
    self.dno_history = pools("hist", int(host["dno_pools"]))
    self.dno_current = pools("cur", int(host["dno_current"]))

  # ---------------------------------------------------------------------------------------------- eval
  def evaluate(self, params, step: int) -> dict:
    if self.c.eval_fn is None:
      return {}
    return self.c.eval_fn(self.sampler_params(params), step)

  # ---------------------------------------------------------------------------------------------- loop
  def run(self, state, ref_params, *, start_step: int = 0, on_step_end=None) -> tuple[Any, Any, list[dict]]:
    """Runs RL steps ``start_step + 1 .. total_steps``; returns ``(state, ref_params, history)``.

    ``on_step_end(done, state, ref_params) -> bool`` runs after each step's metrics are written (the
    launcher saves checkpoints there); True stops the loop at that step boundary (a stop request).

    Raises:
      train_state.NonFiniteUpdates: after ``max_consecutive_skips`` non-finite updates in a row.
    """
    cfg, c = self.cfg, self.c
    history = []
    if start_step == 0 and cfg.eval_every:
      m = self.evaluate(state.params, 0)
      c.writer.write(0, m)
      history.append({"step": 0, **m})
    for step in range(start_step, cfg.total_steps):
      t0 = time.perf_counter()
      if cfg.algo == "dno" and step > 0 and step % cfg.dno_iteration_steps == 0:
        ref_params = self.dno_advance(state)
      rng = jax.random.fold_in(self.root, step)
      rng_sample, rng_train = jax.random.split(rng)
      prompts = next(c.train_iter)
      arrays, rewards, metrics = self.rollout(state, ref_params, prompts, rng_sample)
      t1 = time.perf_counter()
      batch, bm = self.build_batch(arrays, rewards, ref_params, step)
      metrics.update(bm)
      state, um = self.update(state, batch, rng_train, step)
      t2 = time.perf_counter()
      metrics.update(um)
      metrics["time/update"] = t2 - t1
      metrics["time/step"] = t2 - t0
      metrics["time/host_overhead"] = max(metrics["time/step"] - metrics["time/sample"] - metrics["time/reference"]
                                          - metrics["time/update"], 0.0)
      metrics["tokens_per_s"] = metrics["sampled_tokens"] / max(metrics["time/step"], 1e-9)
      if cfg.algo == "dno":
        metrics["dno/iteration"] = float(step // cfg.dno_iteration_steps)
      done = step + 1
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.total_steps):
        metrics.update(self.evaluate(state.params, done))
      c.writer.write(done, metrics)
      history.append({"step": done, **metrics})
      if on_step_end is not None and on_step_end(done, state, ref_params):
        break
    return state, ref_params, history
