"""Plain settings of the RL loop (``rlj.rl_loop.Trainer``), built by the launcher from the config's ``algo``,
``train`` and ``sampler`` sections (``launch.builders.loop_config``), and the decisions that follow from them
alone: where old log-probs come from, when the trainer's log-prob pass runs, whether a reference is kept."""
from __future__ import annotations

import dataclasses

from rlj import programs, rl_algos
from rlj.batches import Settings
from rlj.dynamic_sampling import DynamicSampling
from rlj.kl_controller import KLControl


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Plain settings of the RL loop (built from the config's ``algo``, ``train`` and ``sampler`` sections)."""
  algo: str
  algo_settings: Settings
  total_steps: int
  temperature: float
  num_epochs: int = 1
  num_microbatches: int = 1
  logp_microbatches: int = 0           # row chunks of the rollout log-prob pass (0: one per optimizer micro-batch)
  logits_chunk: int = 0                # completion tokens projected to logits at a time (0: all)
  packing: bool = False                # log-prob passes and updates on packed rows (rlj.packing)
  sample_ahead: bool = False           # the next rollout is sampled while this one is scored (rlj.sample_ahead)
  mask_truncated: bool = False         # DAPO overlong filtering: no loss on completions cut at max_new_tokens
  old_logp: str = "sampler"            # auto | recompute | sampler: where old log-probs come from (old_logp_source)
  mismatch_check_every: int = 0        # sampler / on-policy old log-probs: the trainer's pass every N steps (0: never)
  mismatch_correction: str = "none"    # algorithms.mismatch.MODES
  mismatch_low: float = 0.5
  mismatch_high: float = 2.0
  eval_every: int = 0
  max_consecutive_skips: int = 0       # abort after this many non-finite updates in a row (0: never)
  dynamic_sampling: DynamicSampling = DynamicSampling()   # DAPO's group filter and refill (rlj.dynamic_sampling)
  kl_control: KLControl = KLControl()                     # the adaptive KL coefficient (rlj.kl_controller)

  @property
  def num_generations(self) -> int:
    return self.algo_settings.num_generations

  @property
  def max_new_tokens(self) -> int:
    return self.algo_settings.max_new_tokens

  @property
  def num_minibatches(self) -> int:
    return self.algo_settings.num_minibatches

  @property
  def seed(self) -> int:
    return self.algo_settings.seed

  @property
  def row(self) -> rl_algos.Algorithm:
    return rl_algos.get(self.algo)

  @property
  def loss_kwargs(self) -> dict:
    return self.row.loss_kwargs(self.algo_settings)

  @property
  def old_logp_source(self) -> str:
    """Where the update's old log-probs come from: "current" (``old_logp="auto"`` with one epoch of one minibatch
    and no correction: the update is on-policy, the objective takes the current log-probs under stop-gradient
    and no extra pass runs), "recompute" (the trainer's log-prob pass over the rollout, ``rollout_logp``: what
    ``auto`` picks otherwise, and what a mismatch correction needs) or "sampler" (the sampler's own). A row
    whose objective reads no old log-probs keeps the sampler's in its batch, unused. With ``sample_ahead`` the
    rollout is one update old, so ``auto`` takes the sampling policy's, the sampler's (``rlj.sample_ahead``)."""
    if not self.row.needs_old_logp:
      return "sampler"
    if self.mismatch_correction != "none":
      return "recompute"
    if self.old_logp == "auto":
      if self.sample_ahead:
        return "sampler"
      return "current" if self.num_epochs == 1 and self.num_minibatches == 1 else "recompute"
    return self.old_logp

  def trainer_pass(self, step: int) -> bool:
    """Whether RL step ``step`` (0-based) runs the trainer's log-prob pass over its rollout: every step when old
    log-probs are recomputed, every ``mismatch_check_every`` steps otherwise (for the mismatch metrics)."""
    every = self.mismatch_check_every
    return self.old_logp_source == "recompute" or (every > 0 and (step + 1) % every == 0)

  @property
  def use_reference(self) -> bool:
    """Whether a frozen reference is kept and its log-probs computed (the algorithm's row decides)."""
    return self.row.uses_reference(self.algo_settings.loss_kwargs)

  def program_settings(self) -> programs.RLSettings:
    return programs.RLSettings(algo=self.algo, loss_kwargs=self.loss_kwargs, completion_len=self.max_new_tokens,
                               temperature=self.temperature, num_minibatches=self.num_minibatches,
                               num_microbatches=self.num_microbatches, logp_microbatches=self.logp_microbatches,
                               logits_chunk=self.logits_chunk)
