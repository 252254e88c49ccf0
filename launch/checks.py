"""Config checks that run before anything is built or compiled: each failure names the key and the fix.

``validate(config)`` is the launcher's first step for the RL and SFT jobs (``launch/train.py``); only files
are read (the tokenizer, an HF ``config.json``, a reward model's checkpoint meta), nothing touches a device
beyond counting them, so a bad config costs seconds, not a compilation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

from algorithms import mismatch
from launch import agent_setup, builders, lora_setup, reward_setup
from models import presets
from models.config import ATTENTION_IMPLS, ModelConfig
from rlj import rl_algos, sharding


TOKENIZER_KINDS = ("auto", "hf", "sentencepiece", "train_synthetic")


def fail(key: str, msg: str):
  """Stops the launch with a message that names the config key (and says how to fix it)."""
  raise SystemExit(f"config key '{key}': {msg}")


def validate(config) -> list[str]:
  """Checks an RL / SFT config before anything is built or compiled; raises SystemExit naming the key and fix.

  Covers the algorithm table, group sizes, the mesh against the device count, the sharding rules against the
  mesh, batch sizes against the data-parallel size, init / tokenizer / data choices and files, the
  tokenizer's vocabulary against the model's, and every reward spec (function names, fault policy, reward-model
  checkpoints). Only files are read (the tokenizer, an HF config.json, a reward model's checkpoint meta).

  Returns:
    One line per group of checks that passed (``launch.train --show`` prints them); empty for other jobs.
  """
  if config.job not in ("rl", "sft"):
    return []
  passed = []
  if config.job == "rl":
    _check_algo(config)
    passed.append(f"algorithm {config.algo.name!r}: its settings, old log-probs, mismatch correction, sampler")
  names, sizes, dp = check_layout(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  passed.append(f"mesh {dict(zip(names, sizes))} on {jax.device_count()} device(s) and {jax.process_count()} "
                f"process(es), sharding rules, batch sizes against the data-parallel size {dp}")
  _check_sources(config)
  passed.append(f"init.policy={config.init.policy!r}, tokenizer.kind={config.tokenizer.kind!r}, "
                f"data.source={config.data.source!r}: their files and folders, prompt keys")
  _check_model(config)
  passed.append("model preset and overrides")
  for line in (lora_setup.check(config), agent_setup.check(config)):
    if line:
      passed.append(line)
  tokenizer_vocab = _check_vocab(config)
  passed.append("the tokenizer against the model's vocabulary" + (
      "; the prompt format and stop tokens on the first training example" if tokenizer_vocab else ""))
  if config.job == "rl":
    reward_setup.check_specs(config.rewards, "rewards", tokenizer_vocab=tokenizer_vocab,
                             group_size=config.sampler.num_generations, data_source=config.data.source)
    passed.append(f"rewards: {', '.join(repr(dict(r)['name']) for r in config.rewards)}")
    par_line = reward_setup.check_par(config)
    if par_line:
      passed.append(par_line)
    if config.algo.advantage.get("estimator") == "process":
      passed.append(reward_setup.check_process(config, tokenizer_vocab))
  if config.eval.num_prompts:
    reward_setup.check_specs(config.eval.rewards, "eval.rewards", tokenizer_vocab=tokenizer_vocab, text_only=True)
    passed.append(f"eval.rewards: {', '.join(repr(dict(r)['name']) for r in config.eval.rewards)}")
  return passed


def check_workdir(workdir: str) -> None:
  """Creates the run folder and writes (then removes) a file in it, so that a folder the job cannot write stops the
  launch now, in one line, rather than after the model was built. A ``gs://`` workdir is checked by orbax
  when it saves; its local twin (logs, ``config.json``) is this path taken as a local one, as ``run`` does."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SystemExit(f"--workdir {workdir}: is a file, not a folder; pass --workdir a folder the job may write "
                     f"(it is created when missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise SystemExit(f"--workdir {workdir}: cannot create or write it ({e.strerror or e}); pass --workdir a "
                     f"folder this user may write") from None


def _check_algo(config) -> None:
  try:
    rl_algos.get(config.algo.name).check(builders.algo_settings(config))
  except rl_algos.SettingError as e:
    fail(e.key, e.message)
  _check_old_logp(config)
  _check_step_controls(config, num_processes=jax.process_count())
  s = config.sampler
  if s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or s.max_new_tokens < 1:
    fail("sampler", f"needs temperature > 0 (got {s.temperature}), 0 < top_p <= 1 (got {s.top_p}), top_k >= 0 "
         f"(got {s.top_k}) and max_new_tokens >= 1 (got {s.max_new_tokens})")
  phases = s.get("cache_phases")
  if phases is not None and (not isinstance(phases, int) or phases < 1):
    fail("sampler.cache_phases", f"{phases!r}; a positive int, or None for the platform default")
  rounds = s.get("rounds", 1)
  if not isinstance(rounds, int) or not 1 <= rounds <= s.max_new_tokens:
    fail("sampler.rounds", f"{rounds!r}; an int from 1 (one decode loop) to sampler.max_new_tokens")
  if rounds > 1 and jax.process_count() > 1:
    fail("sampler.rounds", "sampling in rounds runs in one process; use sampler.rounds=1 on several hosts")


def _check_old_logp(config) -> None:
  t = config.train
  if t.old_logp not in ("auto", "recompute", "sampler"):
    fail("train.old_logp", f"{t.old_logp!r}; choose auto | recompute | sampler")
  if t.mismatch_correction not in mismatch.MODES:
    fail("train.mismatch_correction", f"{t.mismatch_correction!r}; choose {' | '.join(mismatch.MODES)}")
  if not isinstance(t.mismatch_check_every, int) or t.mismatch_check_every < 0:
    fail("train.mismatch_check_every", f"{t.mismatch_check_every!r}; every N steps (N >= 1), or 0 for never")
  if not 0 <= t.mismatch_low <= 1 <= t.mismatch_high:
    fail("train.mismatch_low", f"the band [{t.mismatch_low}, {t.mismatch_high}] (train.mismatch_low, "
         f"train.mismatch_high) must hold 1 (no mismatch): 0 <= low <= 1 <= high")
  if t.mismatch_correction == "none":
    return
  if not rl_algos.get(config.algo.name).token_weights:
    fail("train.mismatch_correction", f"the objective of algo.name={config.algo.name!r} applies no token "
         f"weights; use 'none'")
  if t.old_logp == "sampler":
    fail("train.old_logp", "a mismatch correction weighs the trainer's log-probs at the rollout against the "
         "sampler's, so the trainer's pass must run: use auto or recompute")


def _check_step_controls(config, *, num_processes: int) -> None:
  """``train.dynamic_sampling`` and ``algo.kl_control`` against the algorithm's row (``rlj.dynamic_sampling``,
  ``rlj.kl_controller``)."""
  name, row = config.algo.name, rl_algos.get(config.algo.name)
  rows_with = lambda flag: sorted(k for k, r in rl_algos.ALGORITHMS.items() if getattr(r, flag))  # noqa: E731
  ds = config.train.dynamic_sampling
  extra = ds.max_extra_rollouts
  if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
    fail("train.dynamic_sampling.max_extra_rollouts", f"{extra!r}; the extra rollouts one RL step may run to "
         f"refill its batch, an int >= 0")
  if ds.enabled and not row.dynamic_sampling:
    fail("train.dynamic_sampling.enabled", f"algo.name={name!r} has no group-normalised advantages (a group of "
         f"equal rewards still trains it), so its groups may not be dropped; set it False, or use one of "
         f"{rows_with('dynamic_sampling')}")
  kc = config.algo.kl_control
  if not kc.target >= 0:
    fail("algo.kl_control.target", f"{kc.target!r}; the KL target in nats per token (> 0), or 0 for a fixed "
         f"algo.kwargs.kl_coef")
  if kc.target == 0:
    return
  if not row.adaptive_kl:
    fail("algo.kl_control.target", f"the objective of algo.name={name!r} has no KL term to weigh; set it 0, or use "
         f"one of {rows_with('adaptive_kl')}")
  if not float(config.algo.kwargs.get("kl_coef", 0.0)) > 0:
    fail("algo.kwargs.kl_coef", "the adaptive KL controller starts from it (beta_0) and needs the reference's "
         "log-probs: set it > 0, or algo.kl_control.target=0")
  per_step = config.train.batch_prompts * config.sampler.num_generations * num_processes
  if not kc.horizon > per_step / 5:
    fail("algo.kl_control.horizon", f"{kc.horizon!r}; beta changes by up to 20% x completions per step "
         f"({per_step}) / horizon each step and would reach 0 or below: set it > {per_step / 5:g} (in completions; "
         f"the paper's: 10000)")


def check_layout(config, *, num_devices: int, num_processes: int) -> tuple[tuple[str, ...], tuple[int, ...], int]:
  """The mesh, sharding rules and batch sizes against a device and process count (this machine's in
  ``validate``, a TPU slice's in ``launch.aot``); returns the mesh axis names, their sizes and the
  data-parallel size."""
  names, sizes, dp = _check_mesh_and_rules(config, num_devices, num_processes)
  _check_batches(config, dp, num_processes)
  return names, sizes, dp


def _check_mesh_and_rules(config, num_devices: int, num_processes: int):
  """Resolves the mesh on ``num_devices``, checks the rules' axes; returns (names, sizes, data-parallel size)."""
  try:
    mesh_names, mesh_sizes = sharding.resolve_mesh_shape([tuple(x) for x in config.mesh], num_devices)
  except ValueError as e:
    fail("mesh", str(e))
  logical = {name for name, _ in sharding.DEFAULT_RULES}
  batch_axes = ()
  for i, (name, axes) in enumerate(config.sharding_rules):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if name not in logical:
      fail(f"sharding_rules[{i}]", f"unknown logical axis {name!r}; the models name {sorted(logical)}")
    unknown = [a for a in axes if a not in mesh_names]
    if unknown:
      fail(f"sharding_rules[{i}]", f"{name!r} maps to mesh axes {unknown} that config key 'mesh' does not have "
           f"({list(mesh_names)}); use those names or None")
    if name == "batch":
      batch_axes = axes
  dp = int(np.prod([size for name, size in zip(mesh_names, mesh_sizes) if name in batch_axes]))
  if dp % num_processes:
    fail("mesh", f"the batch axes ({dp} ways) must split evenly over {num_processes} processes")
  return mesh_names, mesh_sizes, dp


def _check_batches(config, dp: int, num_processes: int) -> None:
  t = config.train
  if config.job == "rl":
    for key in ("logp_microbatches", "logits_chunk"):
      if int(t.get(key, 0)) < 0:
        fail(f"train.{key}", f"{key} ({t.get(key)}) must be >= 0 (0: the default)")
    for key in ("packing", "sample_ahead", "mask_truncated"):
      if not isinstance(t.get(key, False), bool):
        fail(f"train.{key}", f"{t.get(key)!r}; True or False")
    if t.get("sample_ahead", False):
      if t.dynamic_sampling.enabled:
        fail("train.sample_ahead", "dynamic sampling draws more rollouts after scoring one, which a rollout "
             "sampled ahead cannot wait for; turn one of them off")
      if agent_setup.enabled(config):
        fail("train.sample_ahead", "multi-turn agent rollouts run tools on the host between turns, so they cannot "
             "be sampled ahead; turn it off for agent jobs")
      if not rl_algos.get(config.algo.name).sample_ahead:
        fail("train.sample_ahead", f"algo.name={config.algo.name!r} changes its reference or replay pools at step "
             f"boundaries, which a rollout sampled ahead would cross; turn sample_ahead off for it")
    if t.get("mask_truncated", False) and rl_algos.get(config.algo.name).unit != 1:
      fail("train.mask_truncated", f"algo.name={config.algo.name!r} trains on pairs of completions, and a pair "
           "whose completion has no tokens left compares nothing; turn mask_truncated off for it")
    chunks = config.sampler.get("chunks", 1)
    if not isinstance(chunks, int) or chunks < 1 or t.batch_prompts % chunks:
      fail("sampler.chunks", f"{chunks!r}; a positive int that divides train.batch_prompts ({t.batch_prompts})")
    if t.num_minibatches < 1 or t.num_microbatches < 1:
      fail("train.num_minibatches", f"num_minibatches ({t.num_minibatches}) and num_microbatches "
           f"({t.num_microbatches}) must be >= 1")
    rows = t.batch_prompts * config.sampler.num_generations * num_processes
    row = rl_algos.get(config.algo.name)
    unit = row.unit
    per_mb = rows // t.num_minibatches
    if row.fixed_rows and (rows % t.num_minibatches or per_mb % dp):
      fail("train.batch_prompts", f"{rows} rows (batch_prompts x num_generations) must split into "
           f"train.num_minibatches={t.num_minibatches} minibatches of a multiple of the data-parallel size {dp}")
    if per_mb % (t.num_microbatches * unit):
      fail("train.num_microbatches", f"a minibatch of {per_mb} rows does not split into "
           f"{t.num_microbatches} micro-batches of whole {'pairs' if unit == 2 else 'rows'}")
  runs_sft = config.job == "sft" or builders.runs_sft_stage(config)
  if runs_sft and config.sft.steps and (config.sft.batch_prompts * num_processes) % dp:
    fail("sft.batch_prompts", f"{config.sft.batch_prompts} prompts per step must be a multiple of the "
         f"data-parallel size {dp}")


def _check_sources(config) -> None:
  if config.init.policy not in ("scratch", "hf", "rlj", "sft"):
    fail("init.policy", f"{config.init.policy!r}; choose scratch | hf | rlj | sft")
  if config.init.policy in ("hf", "rlj") and not os.path.isdir(config.init.path):
    fail("init.path", f"{config.init.path!r} is not a directory (needed by init.policy={config.init.policy!r})")
  if config.init.policy == "hf" and not os.path.isfile(os.path.join(config.init.path, "config.json")):
    fail("init.path", f"{config.init.path!r} has no config.json: init.policy='hf' needs a Hugging Face model folder")
  if config.init.policy == "hf":
    from models import hf_config
    try:
      with open(os.path.join(config.init.path, "config.json")) as f:
        hf_config.config_from_hf(json.load(f))
    except (ValueError, KeyError) as e:   # json.JSONDecodeError is a ValueError
      fail("init.path", f"{config.init.path!r}: {e}")
  t = config.tokenizer
  if t.kind not in TOKENIZER_KINDS:
    fail("tokenizer.kind", f"{t.kind!r}; choose {' | '.join(TOKENIZER_KINDS)}")
  if t.kind != "train_synthetic":
    path, key = builders.tokenizer_path(config), "tokenizer.path" if t.path else "init.path"
    if not path:
      fail("tokenizer.path", "empty, and so is init.path; pass the checkpoint directory or its tokenizer file")
    if not os.path.exists(path):
      fail(key, f"no such file or folder {path!r}; pass the checkpoint folder or its tokenizer.json / "
           f"tokenizer.model")
  elif t.path:
    fail("tokenizer.path", f"{t.path!r} is ignored: tokenizer.kind='train_synthetic' trains its own tokenizer; to "
         f"load this one add --config.tokenizer.kind=auto (or hf / sentencepiece), else drop tokenizer.path")
  if t.kind == "train_synthetic" and t.vocab_size < 8:
    fail("tokenizer.vocab_size", f"train_synthetic needs the vocabulary size to train, got {t.vocab_size}")
  d = config.data
  if d.source not in builders.GENERATED + builders.JSONL_SOURCES:
    fail("data.source", f"{d.source!r}; choose {' | '.join(builders.GENERATED + builders.JSONL_SOURCES)}")
  if d.source not in builders.GENERATED and not (d.source_dir or d.data_dir):
    fail("data.source_dir", f"data.source={d.source!r} needs the folder with its train.jsonl / test.jsonl files "
         f"(or data.data_dir holding the built dataset)")
  if d.source_dir and not os.path.isdir(d.source_dir):
    fail("data.source_dir", f"{d.source_dir!r} is not a directory; pass the folder with <split>.jsonl files")
  _check_prompt_keys(config)
  if d.source not in builders.GENERATED:
    first_record(config)   # a malformed first line stops here whatever the tokenizer (later lines: launch.train)
  if config.init.policy != "hf":
    try:
      presets.get(config.model.preset)
    except ValueError as e:
      fail("model.preset", str(e))


def _check_prompt_keys(config) -> None:
  """``data.format`` / ``user_template`` / ``system_prompt`` on their own (the template against the tokenizer:
  ``_check_prompts``)."""
  from rlj.data import prompts
  d = config.data
  if d.format not in prompts.FORMATS:
    fail("data.format", f"{d.format!r}; choose {' | '.join(prompts.FORMATS)}")
  try:
    prompts.check_user_template(prompts.decode_escapes(d.user_template))
  except prompts.PromptError as e:
    fail("data.user_template", str(e))
  if d.system_prompt and d.format != "chat":
    fail("data.system_prompt", "a system prompt needs data.format='chat'; with 'plain' put the text into "
         "data.user_template")
  if d.format == "chat" and config.tokenizer.kind == "train_synthetic":
    fail("data.format", "'chat' renders the checkpoint's chat template and a train_synthetic tokenizer has none; "
         "use data.format='plain' or a checkpoint tokenizer")


def first_record(config) -> dict | None:
  """The first training record, read cheaply (the synthetic task's, or the first line of
  ``data.source_dir``'s train split); None when only a built tfds dataset holds the data."""
  from rlj.data import jsonl
  d = config.data
  if d.source in builders.GENERATED:
    return builders.generated_source(config, "train", num_records=1)[0]
  split = d.get("train_split", d.get("split"))
  files = [os.path.join(d.source_dir, split + ext) for ext in (".jsonl", ".jsonl.gz")] if d.source_dir else []
  for path in (f for f in files if os.path.isfile(f)):
    try:
      for line_no, raw in jsonl.read_jsonl(path):
        where = f"{path}:{line_no}"
        record = (jsonl.rubric_record(raw, where=where) if d.source == "rubric" else
                  jsonl.prompt_answer_record(raw, where=where, layout="messages" if d.source == "messages" else None))
        return {**record, "index": 0}
    except jsonl.JsonlError as e:
      fail("data.source_dir", str(e))
  return None


def _check_prompts(config, tok) -> None:
  """The prompt format against the tokenizer (a chat template it has), rendered on the first training example,
  and ``sampler.stop_tokens`` resolved to ids."""
  from rlj.data import chat, prompts
  fmt = builders.prompt_format(config, tok)
  ids = builders.stop_ids(config, tok)
  if agent_setup.enabled(config):
    agent_setup.observation_format(config, tok, ids)   # the chat template can wrap an observation turn
  record = (first_record(config) if config.data.source in builders.GENERATED + builders.JSONL_SOURCES else None)
  if record is None:
    return
  try:
    fmt.render(record)
  except (chat.ChatTemplateError, prompts.PromptError) as e:
    fail("data.format", f"the prompt of the first training example does not render: {e}; change "
         f"data.system_prompt / data.user_template, pick another tokenizer.chat_template, or use data.format=plain")


def _check_model(config) -> None:
  overrides = dict(config.model.overrides)
  fields = sorted(f.name for f in dataclasses.fields(ModelConfig))
  for key in overrides:
    if key not in fields:
      fail(f"model.overrides.{key}", f"not a model config field; the fields are {', '.join(fields)}")
  attention = overrides.get("attention", "auto")
  if attention not in ATTENTION_IMPLS:
    fail("model.overrides.attention", f"{attention!r}; choose one of {', '.join(ATTENTION_IMPLS)} "
         f"(auto: splash on TPU, cudnn on GPU for bf16, else xla)")
  needs = {"splash": "tpu", "cudnn": "gpu"}.get(attention)
  if needs and jax.default_backend() != needs:
    fail("model.overrides.attention", f"{attention!r} runs on {needs.upper()}, this job runs on "
         f"{jax.default_backend()}; use attention=auto (the platform's kernel) or xla")
  unroll = overrides.get("scan_unroll", 0)
  if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll < 0:
    fail("model.overrides.scan_unroll", f"{unroll!r}; layers per iteration of the layer scan, an int >= 0 (0: "
         "every layer on CPU, 1 elsewhere)")
  if not overrides.get("scan_layers", True):
    fail("model.overrides.scan_layers", "the trained model keeps its layers scanned (checkpoints and Hugging Face "
         "import / export hold them stacked); the sampler decodes an unrolled copy by itself where that pays "
         "(rlj.sampler.SamplerConfig.unrolled_decode)")


def _check_vocab(config) -> int | None:
  """Checks that the model's embedding covers the tokenizer (larger is fine: padding up); returns the
  tokenizer's vocabulary size when a file gives it (None for ``train_synthetic``)."""
  t = config.tokenizer
  key = "tokenizer.path" if t.path else "init.path"
  if t.kind != "train_synthetic":
    tok = builders.load_tokenizer(config)
    _check_prompts(config, tok)
    vocab = tok.vocab_size
    pieces = f"the tokenizer has {vocab} pieces"
  else:  # train_synthetic trains at most tokenizer.vocab_size pieces
    vocab = int(t.vocab_size)
    pieces = f"tokenizer.vocab_size allows up to {vocab} pieces"
  if config.init.policy == "hf":
    with open(os.path.join(config.init.path, "config.json")) as f:
      model_vocab = int(json.load(f)["vocab_size"])
    if model_vocab < vocab:
      fail(key, f"{pieces} but the checkpoint in init.path embeds only {model_vocab}; use the tokenizer that came "
           f"with the checkpoint")
  elif not config.model.vocab_from_tokenizer:
    model_vocab = int(dict(config.model.overrides).get("vocab_size", presets.get(config.model.preset).vocab_size))
    if model_vocab < vocab:
      fail("model.vocab_from_tokenizer", f"model {config.model.preset!r} embeds {model_vocab} tokens but "
           f"{pieces}; set model.vocab_from_tokenizer=True (or a model.overrides.vocab_size >= {vocab}), or "
           f"use the tokenizer that matches the preset")
  return vocab if t.kind != "train_synthetic" else None
