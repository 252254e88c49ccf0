"""The program factory: every jitted program of a training job, built in one place.

The RL trainer, the SFT stage, ``launch.aot`` (which compiles them for a TPU slice) and the benchmarks all call
these functions, so what AOT proves and what the benchmarks time is exactly what training runs:

- ``train_step``: ``rlj.train_step.train_step`` with the model's teacher-forced log-probs, an objective, the
  optimizer and the micro-batch count bound, jitted with the state donated and laid out as ``state_shardings``;
- ``rollout_logp``: the teacher-forced log-prob pass over a whole rollout (old and reference log-probs), in
  chunks of one optimizer micro-batch (``RLSettings.logp_chunks``);
- ``sampler``: the compiled sampler (``rlj.sampler.Sampler``) for a ``SamplerConfig``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from rlj import logprobs, rl_algos
from rlj import train_step as train_step_lib
from rlj.sampler import Sampler, SamplerConfig


def train_step(model, tx, *, objective: Callable, mesh, rules, state_shardings, completion_len: int,
               temperature: float = 1.0, num_microbatches: int = 1, sum_microbatches: bool = True,
               combine: Callable | None = None, logits_chunk: int = 0):
  """``jit(train_step)``: ``(state, batch, rng[, frozen]) -> (state, metrics)``, the state donated (``frozen``,
  the LoRA base read through ``combine``, is not)."""
  logp_fn = logprobs.make_logp_fn(model.apply, completion_len=completion_len, temperature=temperature, mesh=mesh,
                                  rules=rules, logits_chunk=logits_chunk)
  step = functools.partial(train_step_lib.train_step, logp_fn=logp_fn, objective=objective, tx=tx,
                           num_microbatches=num_microbatches, sum_microbatches=sum_microbatches, combine=combine)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, replicated))


def rollout_logp(model, *, mesh, rules, completion_len: int, temperature: float, num_chunks: int = 1,
                 logits_chunk: int = 0):
  """``jit``: ``(params, tokens [N, P+T], attn_mask) -> logp [N, T]`` in ``num_chunks`` row chunks, with logits
  ``logits_chunk`` tokens at a time (0: all T)."""
  return jax.jit(logprobs.make_logp_fn(model.apply, completion_len=completion_len, temperature=temperature,
                                       mesh=mesh, rules=rules, num_chunks=num_chunks, logits_chunk=logits_chunk))


def sampler(model, config: SamplerConfig, *, mesh=None, param_shardings=None, rules=None) -> Sampler:
  """The compiled sampler; without a mesh it runs on the default device."""
  extra = {} if rules is None else {"rules": rules}
  return Sampler(model, config, mesh=mesh, param_shardings=param_shardings, **extra)


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """What the RL programs depend on besides the model, optimizer and mesh."""
  algo: str
  loss_kwargs: dict
  completion_len: int
  temperature: float
  num_minibatches: int = 1
  num_microbatches: int = 1
  logp_microbatches: int = 0    # row chunks of the rollout log-prob pass; 0: one per optimizer micro-batch
  logits_chunk: int = 0         # completion tokens projected to logits at a time (log-prob passes, loss); 0: all

  @property
  def logp_chunks(self) -> int:
    """Chunks of the rollout's log-prob pass: ``logp_microbatches``, or one per optimizer micro-batch."""
    if self.logp_microbatches > 0:
      return self.logp_microbatches
    return max(self.num_minibatches, 1) * max(self.num_microbatches, 1)


@dataclasses.dataclass(frozen=True)
class RLPrograms:
  step: Any          # (state, batch, rng) -> (state, metrics)
  logp: Any          # (params, tokens, attn_mask) -> logp, over a whole rollout


def rl_programs(model, tx, s: RLSettings, *, mesh, rules, state_shardings, combine: Callable | None = None
                ) -> RLPrograms:
  """The RL step's programs for algorithm ``s.algo`` (its objective and micro-batch rule from its row);
  ``combine``: LoRA's ``(base, adapters) -> params`` (``rlj.lora_policy.LoraPolicy.step_params``)."""
  row = rl_algos.get(s.algo)
  step = train_step(model, tx, objective=functools.partial(row.objective, **s.loss_kwargs), mesh=mesh, rules=rules,
                    state_shardings=state_shardings, completion_len=s.completion_len, temperature=s.temperature,
                    num_microbatches=s.num_microbatches, sum_microbatches=row.sum_microbatches, combine=combine,
                    logits_chunk=s.logits_chunk)
  logp = rollout_logp(model, mesh=mesh, rules=rules, completion_len=s.completion_len, temperature=s.temperature,
                      num_chunks=s.logp_chunks, logits_chunk=s.logits_chunk)
  return RLPrograms(step=step, logp=logp)


def sft_step(model, tx, *, mesh, rules, state_shardings, completion_len: int):
  """The SFT stage's step: the same ``train_step`` with the NLL objective at temperature 1."""
  return train_step(model, tx, objective=rl_algos.sft_objective, mesh=mesh, rules=rules,
                    state_shardings=state_shardings, completion_len=completion_len)
