r"""An rlj run's policy as a Hugging Face checkpoint: ``python -m launch.export --workdir runs/X [--step N] [--out DIR]``.

Reads the newest checkpoint of ``<workdir>/checkpoints`` (or the one of step ``N``): its params and its meta
record, which holds the model config and the run's tokenizer folder (``launch.builders.checkpoint_meta``; every
RL, SFT and reward-model job writes them). Writes into ``--out`` (default ``<workdir>/export/step_<N>``):

- ``config.json`` and safetensors (``models.hf.save_hf_checkpoint``: numbered shards and
  ``model.safetensors.index.json`` past ``--max_shard_gb``), which transformers' ``from_pretrained`` loads;
- the tokenizer files the run used (``<workdir>/tokenizer/``: ``tokenizer.json`` or ``tokenizer.model``,
  ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``);
- ``generation_config.json``: the BOS, PAD and every EOS id, merged with the list the checkpoint shipped (never
  dropping one), so that ``generate`` stops where the rlj sampler did.

For an RL run with an SFT stage the policy is the RL checkpoint's (``<workdir>/checkpoints``); pass
``--workdir <run>/sft`` for the SFT stage's. Every failure is one line naming the flag and the fix.

A LoRA run (``model.lora.rank > 0``) checkpoints its adapters only. ``--lora merged`` (the default) reads the base
the run recorded (its Hugging Face folder or rlj checkpoint, checked against the base's fingerprint) and writes
W0 + (alpha / r) B A as the full checkpoint above; ``--lora adapter`` writes the adapter alone in PEFT's layout
(``adapter_config.json`` + ``adapter_model.safetensors``, ``models.lora.write_peft_adapter``) with the tokenizer
files, which ``peft.PeftModel.from_pretrained`` loads onto the base; a base that is no Hugging Face folder (an
SFT stage's weights) is written beside it as ``<out>/base`` and named in ``adapter_config.json``.
"""
from __future__ import annotations

if __name__ == "__main__":   # before JAX starts: no TPU runtime probe on a host without TPUs (launch/malloc_env.py)
  from launch import malloc_env
  malloc_env.set_jax_platforms()

import dataclasses
import json
import os
import shutil

from absl import app, flags, logging

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def fail(flag: str, msg: str):
  raise SystemExit(f"launch.export --{flag}: {msg}")


def checkpoint_dir(workdir: str) -> str:
  """``<workdir>/checkpoints``, or ``workdir`` itself when it is a checkpoints folder."""
  if not os.path.isdir(workdir):
    fail("workdir", f"{workdir!r} does not exist; pass the --workdir of a launch.train run")
  sub = os.path.join(workdir, "checkpoints")
  if os.path.isdir(sub):
    return sub
  if any(name.isdigit() for name in os.listdir(workdir)):
    return workdir
  fail("workdir", f"{workdir!r} is not an rlj run (no checkpoints/ folder); pass the --workdir of a launch.train "
       f"run")


def read_meta(directory: str, step: int | None) -> tuple[int, dict]:
  """``(step, meta record)`` of the newest checkpoint in ``directory`` or of ``step`` (no arrays are read)."""
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      fail("workdir", f"{directory!r} holds no checkpoint yet; train first (checkpoints are written every "
           f"train.ckpt_every steps and at the end)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      fail("step", f"no checkpoint at step {step} in {directory!r}; it has steps {steps}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mngr.close()
  return step, dict(meta or {})


def model_config_of(meta: dict, directory: str):
  """The ``ModelConfig`` a checkpoint's meta records (JSON lists back to tuples)."""
  from models.config import ModelConfig
  if meta.get("job") == "rm" or "reward_model" in meta:
    fail("workdir", f"{directory!r} is a reward-model run; launch.export writes policies (RL / SFT runs)")
  if "model_config" not in meta:
    fail("workdir", f"the checkpoint in {directory!r} records no model config (it predates launch.export, or is "
         f"not an rlj policy run); rerun or resume the job with this version to write one")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items() if k in fields}
  try:
    return ModelConfig(**values)
  except TypeError as e:
    fail("workdir", f"the checkpoint's model config does not fit this version's ModelConfig ({e})")


def tokenizer_dir(workdir: str, meta: dict) -> str:
  """The run's tokenizer folder: ``meta["tokenizer_dir"]`` under the run folder (or its parent, for an RL run's
  ``sft`` stage)."""
  name = meta.get("tokenizer_dir")
  candidates = [os.path.join(d, name) for d in (workdir, os.path.dirname(os.path.abspath(workdir)))] if name else []
  for path in candidates:
    if os.path.isdir(path):
      return path
  fail("workdir", f"the run's tokenizer folder ({name or 'tokenizer'}/) is missing from {workdir!r}; it is written "
       f"when the job starts")


def generation_config(tok, shipped: dict) -> dict:
  """``shipped`` (the checkpoint's generation_config.json) with the tokenizer's BOS / PAD and every EOS id of
  both (the shipped ones first)."""
  out = dict(shipped)
  eos = shipped.get("eos_token_id")
  eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
  eos = list(dict.fromkeys([*eos, *tok.eos_ids]))
  out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  if tok.bos_id is not None:
    out.setdefault("bos_token_id", tok.bos_id)
  if tok.pad_id is not None:
    out.setdefault("pad_token_id", tok.pad_id)
  return out


def write_tokenizer(source: str, out: str) -> dict:
  """Copies the tokenizer files of ``source`` into ``out``; returns the generation config to write."""
  from rlj.data import tokenizer as tok_lib
  try:
    tok = tok_lib.load(source)
  except tok_lib.TokenizerError as e:
    fail("workdir", f"the run's tokenizer does not load: {e}")
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
  shipped = {}
  if os.path.isfile(os.path.join(source, "generation_config.json")):
    with open(os.path.join(source, "generation_config.json")) as f:
      shipped = json.load(f)
  return generation_config(tok, shipped)


def restore_policy(directory: str, mc, step: int):
  """The params of ``Transformer(mc)`` saved at ``step`` in ``directory``, on the first device."""
  import flax.linen as nn
  import jax
  from models import hf
  from rlj import checkpoint
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          nn.unbox(hf.abstract_params(mc)))
  return checkpoint.restore_params(directory, abstract, step=step)[0]


LORA_MODES = ("merged", "adapter")


def lora_of(meta: dict):
  """The ``LoraConfig`` a LoRA run's checkpoint meta records, or None."""
  from models import lora
  if not meta.get("lora"):
    return None
  d = dict(meta["lora"])
  return lora.LoraConfig(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                         dropout=float(d.get("dropout", 0.0)))


def restore_adapters(directory: str, mc, cfg, step: int):
  """The adapters saved at ``step`` (the LoRA run's ``TrainState.params``), on the first device."""
  import flax.linen as nn
  import jax
  from models import hf, lora
  from rlj import checkpoint
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  base = nn.unbox(hf.abstract_params(mc))
  shapes = jax.eval_shape(lambda: lora.init_adapters(jax.random.key(0), base, cfg))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  return checkpoint.restore_params(directory, abstract, step=step)[0]


def load_base(meta: dict, mc):
  """The frozen base a LoRA run recorded (``meta["lora_base"]``): its Hugging Face folder or rlj checkpoint,
  checked against the recorded fingerprint. Returns ``(params, is_hf_folder)``."""
  from rlj import checkpoint, lora_policy
  record = meta.get("lora_base") or {}
  source = record.get("source", "")
  if os.path.isfile(os.path.join(source, "config.json")):
    from models import hf
    _, params = hf.load_hf_checkpoint(source)
    is_hf = True
  elif os.path.isdir(source):
    try:
      params = restore_policy(source, mc, None)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointMismatchError) as e:
      fail("workdir", f"the LoRA run's base {source!r} does not restore as this model: {e}")
    is_hf = False
  else:
    fail("lora", f"the run's adapters sit on the base {source!r}, which is not a folder on this machine; use "
         f"--lora adapter to write the adapter alone, or put the base back at that path")
  now = lora_policy.fingerprint(params, source)
  if now["hash"] != record.get("hash"):
    fail("lora", f"the base at {source!r} has changed since the adapters were trained (hash {record.get('hash')} "
         f"then, {now['hash']} now); put the original base back, or use --lora adapter")
  return params, is_hf


def export_lora(directory: str, meta: dict, mc, cfg, step: int, out: str, *, mode: str, max_shard_bytes: int,
                dtype: str | None) -> None:
  """Writes a LoRA run's policy into ``out``: merged into the base as a Hugging Face checkpoint, or the adapter
  alone in PEFT's layout (with the base as ``<out>/base`` when it is no Hugging Face folder)."""
  import jax
  from models import hf, lora
  adapters = restore_adapters(directory, mc, cfg, step)
  if mode == "adapter":
    base_path = (meta.get("lora_base") or {}).get("source", "")
    if not os.path.isfile(os.path.join(base_path, "config.json")):
      base, _ = load_base(meta, mc)
      base_path = os.path.join(out, "base")
      hf.save_hf_checkpoint(base, mc, base_path, max_shard_bytes=max_shard_bytes, dtype=dtype)
    lora.write_peft_adapter(out, adapters, cfg, mc, base_path=os.path.abspath(base_path))
    return
  base, _ = load_base(meta, mc)
  merged = jax.jit(lambda b, a: lora.merge(b, a, cfg))(base, adapters)
  hf.save_hf_checkpoint(merged, mc, out, max_shard_bytes=max_shard_bytes, dtype=dtype)


def export(workdir: str, *, step: int | None = None, out: str | None = None, max_shard_bytes: int = 5 * 10**9,
           dtype: str | None = None, lora: str = "merged") -> str:
  """Writes the policy of ``workdir``'s checkpoint (newest, or ``step``) as a Hugging Face folder (a LoRA run's:
  merged, or ``lora="adapter"`` in PEFT's layout); returns it."""
  from models import hf
  if lora not in LORA_MODES:
    fail("lora", f"{lora!r}; choose merged | adapter")
  directory = checkpoint_dir(workdir)
  step, meta = read_meta(directory, step)
  mc = model_config_of(meta, directory)
  source = tokenizer_dir(workdir, meta)
  if dtype and dtype not in ("float32", "bfloat16"):
    fail("dtype", f"{dtype!r}; choose float32 | bfloat16")
  cfg = lora_of(meta)
  out = out or os.path.join(workdir, "export", f"step_{step}" + ("_adapter" if cfg and lora == "adapter" else ""))
  if cfg is None:
    if lora == "adapter":
      fail("lora", f"the run in {directory!r} trained every weight (no model.lora); export it without --lora")
    params = restore_policy(directory, mc, step)
    os.makedirs(out, exist_ok=True)
    hf.save_hf_checkpoint(params, mc, out, max_shard_bytes=max_shard_bytes, dtype=dtype or None)
  else:
    os.makedirs(out, exist_ok=True)
    export_lora(directory, meta, mc, cfg, step, out, mode=lora, max_shard_bytes=max_shard_bytes, dtype=dtype or None)
  gen = write_tokenizer(source, out)
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  config_path = os.path.join(out, "config.json")
  if not os.path.isfile(config_path):   # a PEFT adapter folder: no model config of its own
    return out
  with open(config_path) as f:
    config = json.load(f)
  config.update({k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen})
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2)
  return out


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: ``launch.train`` owns ``--workdir``)."""
  flags.DEFINE_string("workdir", None, "the run folder (launch.train's --workdir)")
  flags.DEFINE_integer("step", None, "the checkpoint's step; default: the newest")
  flags.DEFINE_string("out", None, "output folder; default: <workdir>/export/step_<N>")
  flags.DEFINE_float("max_shard_gb", 5.0, "start a new safetensors shard past this many GB")
  flags.DEFINE_string("dtype", "", "storage dtype (float32 | bfloat16); default: the run's param dtype")
  flags.DEFINE_string("lora", "merged", "a LoRA run: merged (adapters folded into the base, a full checkpoint) | "
                      "adapter (PEFT's adapter_config.json + adapter_model.safetensors)")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if not f.workdir:
    fail("workdir", "required: the run folder of a launch.train job")
  out = export(f.workdir, step=f.step, out=f.out, max_shard_bytes=int(f.max_shard_gb * 10**9),
               dtype=f.dtype or None, lora=f.lora)
  print(f"exported {out}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
