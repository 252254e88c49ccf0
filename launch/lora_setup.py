"""LoRA's config in the launcher: ``model.lora`` checked before anything is built (``check``), parsed
(``lora_config``), and the RL stage's adapters over the frozen base (``lora_state``, ``rlj.lora_policy``)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax

from launch import builders
from models import presets
from models.config import ModelConfig


def fail(key: str, msg: str):
  raise SystemExit(f"config key '{key}': {msg}")


LORA_BASE_DTYPES = ("", "float32", "bfloat16")


def model_config(config) -> ModelConfig:
  """The policy's shape as the job will build it (an HF checkpoint's config.json, else the preset), overrides
  applied; the vocabulary does not matter here."""
  overrides = {k: v for k, v in dict(config.model.overrides).items() if k != "vocab_size"}
  if config.init.policy == "hf":
    from models import hf_config
    with open(os.path.join(config.init.path, "config.json")) as f:
      base = hf_config.config_from_hf(json.load(f))
  else:
    base = presets.get(config.model.preset)
  return dataclasses.replace(base, **overrides)


def check(config) -> str | None:
  """``model.lora``: its values, a job and algorithm that train adapters, the rank against the model's smallest
  targeted projection. Returns the line ``--show`` prints, or None when LoRA is off."""
  from rlj import lora_policy
  section = config.model.get("lora")
  if section is None:
    return None
  try:
    cfg = lora_policy.parse_config(section)
  except (ValueError, TypeError, KeyError) as e:
    fail("model.lora", str(e))
  if cfg is None:
    return None
  if config.job != "rl":
    fail("model.lora.rank", f"LoRA trains the RL stage's policy; the {config.job!r} job trains every weight (set "
         f"model.lora.rank=0, or run the RL job: its SFT stage trains the base fully, then RL trains adapters)")
  if config.algo.name == "dno":
    fail("model.lora.rank", "DNO replaces its reference with the current policy every iteration, while with LoRA "
         "the reference is the frozen base; use GRPO, GSPO, CISPO, GDPO or P3O with LoRA, or set model.lora.rank=0")
  base_dtype = section.get("base_dtype", "")
  if base_dtype not in LORA_BASE_DTYPES:
    fail("model.lora.base_dtype", f"{base_dtype!r}; choose '' (the model's param dtype) | float32 | bfloat16")
  mc = model_config(config)
  side, name = lora_policy.smallest_side(cfg, mc)
  if cfg.rank > side:
    fail("model.lora.rank", f"{cfg.rank} exceeds {side}, the smallest side of the targeted projections (target "
         f"{name!r}: {list(lora_policy.lora.hf_features(name, mc))} in / out features); use rank <= {side}")
  return (f"model.lora: rank {cfg.rank}, alpha {cfg.alpha:g} on {', '.join(cfg.targets)}"
          f"{', base in ' + base_dtype if base_dtype else ''}")


def lora_config(config):
  """The config's ``model.lora`` as a ``models.lora.LoraConfig`` (None when rank is 0); a bad value stops in one
  line naming the key."""
  from rlj import lora_policy
  try:
    return lora_policy.parse_config(config.model.get("lora") or {})
  except (ValueError, TypeError) as e:
    raise SystemExit(f"config key 'model.lora': {e}") from None


def base_source(config, workdir: str) -> str:
  """Where a LoRA job's base weights come from, for its fingerprint and the messages that name it."""
  if builders.runs_sft_stage(config):
    return os.path.join(os.path.abspath(workdir), "sft", "checkpoints")
  if config.init.policy in ("hf", "rlj"):
    return os.path.abspath(config.init.path)
  return f"scratch (seed {config.seed})"


def lora_state(config, env, base, source: str):
  """``(LoraPolicy, TrainState of the adapters, its shardings)`` over the frozen ``base`` params."""
  from rlj import lora_policy
  policy, adapters = lora_policy.build(env.lora, env.model_config, base, mesh=env.mesh, rules=env.rules,
                                       rng=jax.random.fold_in(jax.random.key(config.seed), 7), source=source,
                                       base_dtype=config.model.lora.get("base_dtype", ""))
  state, state_sh = builders.train_state_of(adapters, policy.adapter_shardings, env.tx, env.mesh)
  return policy, state, state_sh
