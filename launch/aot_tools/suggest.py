"""Settings that make a config fit: for each phase over HBM, the first rung of its ladder that fits.

``launch.aot --suggest`` runs this when a config does not fit. It recompiles only the phase that is over (the
same programs, ``launch.aot.compile_all(only=...)``) under settings that trade time for memory, cheapest first,
each rung keeping the ones before it:

  sampling           twice the sequential sampling calls (``sampler.chunks``: one chunk's KV cache at a time);
  train step         remat (``model.overrides.remat``), logits a chunk of tokens at a time (``train.logits_chunk``),
                     the KV cache freed after sampling (``sampler.keep_cache=False``) when it is over a quarter of
                     the chip, then twice the optimizer micro-batches (``train.num_microbatches``) per rung;
  rollout log-probs  ``train.logits_chunk``, ``sampler.keep_cache=False`` as above, then twice the row chunks of
                     the pass (``train.logp_microbatches``).

Sampling comes first: the kept KV cache is resident in every phase. A ladder of doublings ends when a rung no
longer lowers the phase's peak (more micro-batches stop paying once the parameters' gathers dominate).

None of these change what a step computes (the gradients of micro-batches are accumulated, chunks of rows and
tokens give the same log-probs), only how much of it is alive at once. A rung the launcher would refuse
(``launch.checks``: micro-batches that do not split the minibatch into whole rows over the batch axes, sampling
chunks that do not divide the prompts) ends the ladder.
"""
from __future__ import annotations

import copy
from typing import Callable

from launch import builders, checks
from launch.aot_tools import hbm

LOGITS_CHUNK = 512   # tokens per logits chunk the ladder tries
HEADROOM = 0.9       # a phase fits when its peak is within this share of the chip's HBM
DOUBLINGS = 8        # at most 2**8 times the micro-batches, row chunks or sampling chunks
DOUBLING_KEYS = ("train.num_microbatches", "train.logp_microbatches", "sampler.chunks")


def apply(config, settings: dict):
  """A copy of ``config`` with ``settings`` ({"train.num_microbatches": 4, ...}) set."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for key, value in settings.items():
      *path, leaf = key.split(".")
      node = c
      for part in path:
        node = node[part]
      node[leaf] = value
  return c


def _ladder(phase: str, config, settings: dict, *, kv_cache_heavy: bool = False) -> list[dict]:
  """The rungs for ``phase`` from ``settings`` already chosen: each a dict of keys to set; the doubling rungs are
  those that set a ``DOUBLING_KEYS`` key."""
  c = apply(config, settings)
  t_len = c.sampler.max_new_tokens
  rungs = []
  chunk = {"train.logits_chunk": LOGITS_CHUNK} if not c.train.get("logits_chunk", 0) and t_len > LOGITS_CHUNK else {}
  free_cache = [{"sampler.keep_cache": False}] if kv_cache_heavy and c.sampler.keep_cache else []
  if phase == "train step":
    if not c.model.overrides.get("remat", False):
      rungs.append({"model.overrides.remat": True})
    rungs += ([chunk] if chunk else []) + free_cache
    mb = int(c.train.num_microbatches)
    rungs += [{"train.num_microbatches": mb * 2 ** i} for i in range(1, DOUBLINGS + 1)]
  elif phase == "rollout log-probs":
    rungs += ([chunk] if chunk else []) + free_cache
    base = builders.loop_config(c).program_settings().logp_chunks   # the pass's row chunks now
    rungs += [{"train.logp_microbatches": base * 2 ** i} for i in range(1, DOUBLINGS + 1)]
  elif phase == "sampling":
    ch = int(c.sampler.get("chunks", 1))
    rungs += [{"sampler.chunks": ch * 2 ** i} for i in range(1, DOUBLINGS + 1)]
  return rungs


def _valid(config, devices, hosts: int) -> bool:
  try:
    checks.check_layout(config, num_devices=len(devices), num_processes=hosts)
  except SystemExit:
    return False
  return True


def search(config, devices, phases: dict, capacity: int, compile_all: Callable, *, hosts: int,
           log=print) -> dict | None:
  """Settings under which every phase of ``phases`` fits ``HEADROOM x capacity`` bytes per chip, or None (the
  headroom: a config at 99% leaves nothing for the runtime's own buffers and fragmentation).

  ``compile_all(config, devices, log=..., only={phase})`` compiles one phase (``launch.aot.compile_all``).
  """
  settings: dict = {}
  capacity = HEADROOM * capacity
  for phase in ("sampling", "train step", "rollout log-probs"):
    if phase not in phases:
      continue
    ph = phases[phase]
    if settings:   # an earlier phase's rungs (fewer kept cache bytes, logits_chunk) may already be enough here
      ph = compile_all(apply(config, settings), devices, log=lambda *_: None, only={phase})[0][phase]
    if ph.total <= capacity and not ph.program.error:
      continue
    heavy = ph.components.get("KV cache", 0) > capacity / 4
    fitted, last = False, ph.total
    for rung in _ladder(phase, config, settings, kv_cache_heavy=heavy):
      trial = {**settings, **rung}
      cfg = apply(config, trial)
      if not _valid(cfg, devices, hosts):
        break
      ph = compile_all(cfg, devices, log=lambda *_: None, only={phase})[0][phase]
      log(f"  {phase} with {flags(trial)}: {hbm.gib(ph.total).strip()} per chip"
          + (" (refused by the compiler)" if ph.program.error else ""))
      if ph.total <= capacity and not ph.program.error:
        settings, fitted = trial, True
        break
      if set(rung) & set(DOUBLING_KEYS) and ph.total >= last:   # doubling stopped paying
        break
      settings, last = trial, ph.total
    if not fitted:
      return None
  return settings


def flags(settings: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in settings.items())
