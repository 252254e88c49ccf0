"""Relaunching a workdir: what it was started with, what may change, and what stops the job.

A workdir remembers the config it was started with (``<workdir>/config.json``) and fingerprints of the files it
reads (``<workdir>/inputs.json``: the data source's split files and the tokenizer files, ``rlj.data.fingerprint``).
When a job starts in a workdir that already holds checkpoints, ``check`` compares, before anything is built or
compiled:

- keys that only change the schedule, the logging or the layout (``ACCEPTED``: total steps, eval and checkpoint
  intervals, eval set size, mesh, data workers) are accepted and reported;
- any other changed key stops the job with one message listing each key (old -> new) and the two ways forward:
  the same config to resume, or a new workdir that starts from this one's weights (``init.policy=rlj``);
- changed input files stop the job too: the saved data-iterator position would point into other data, and a
  changed tokenizer gives the saved weights other token ids.

Nothing in the workdir is written, moved or deleted when the job stops. A workdir without checkpoints holds no
work: its records are rewritten for the new config.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"
CHECKPOINT_DIRS = ("checkpoints", os.path.join("sft", "checkpoints"))

# Keys (dotted, or a prefix ending in ".") whose change leaves the trained weights' meaning intact.
ACCEPTED = (
    "train.total_steps", "train.eval_every", "train.ckpt_every", "train.ckpt_every_minutes",
    "train.keep_checkpoints", "train.max_consecutive_skips", "train.mismatch_check_every",
    "sft.steps", "sft.eval_every", "eval.", "data.num_workers", "data.data_dir",
    "mesh", "sharding_rules", "hardware", "hardware_note", "slice",
)

# Files of a tokenizer folder that change what the tokenizer does.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a.b.c": leaf}`` of nested dicts (lists and tuples are leaves, compared whole)."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_record(config) -> dict:
  """The config as the JSON a workdir keeps (tuples as lists, so a record read back compares equal)."""
  return json.loads(config.to_json_best_effort())


def accepted(key: str) -> bool:
  return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ACCEPTED)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """``(key, old, new)`` for every dotted key whose value differs (``"(unset)"`` for a missing side)."""
  a, b = flatten(old), flatten(new)
  missing = "(unset)"
  return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) !=
          b.get(k, missing)]


def has_work(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint of any stage."""
  for sub in CHECKPOINT_DIRS:
    d = os.path.join(workdir, sub)
    if os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d)):
      return True
  return False


def input_files(config) -> dict[str, dict]:
  """Fingerprints of the files the job reads besides its checkpoints: ``{"data": ..., "tokenizer": ...}``."""
  from rlj.data import fingerprint
  out = {}
  d = config.data
  if d.get("source_dir") and os.path.isdir(d.source_dir):
    from rlj.data import tfds_builders
    kind = "preference" if config.job == "rm" else "prompt_answer"
    try:
      out["data"] = tfds_builders.source_fingerprint(kind, d.source, d.source_dir)
    except ValueError:
      pass  # no split files or an unknown source: the data build reports it with its key
  t = config.get("tokenizer")
  if t is not None and t.get("kind") != "train_synthetic":
    path = t.get("path") or config.get("init", {}).get("path", "")
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in TOKENIZER_FILES
                                                  if os.path.isfile(os.path.join(path, n))] if path else []
    if files:
      out["tokenizer"] = fingerprint.fingerprint(files)
  return out


def _show(v: Any) -> str:
  if v == "(unset)":
    return v
  return repr(v) if isinstance(v, str) else json.dumps(v)


def check(config, workdir: str, *, write: bool = True, print_fn=print) -> list[tuple[str, Any, Any]]:
  """Compares a relaunch with what ``workdir`` was started with; records the config and inputs when it may go on.

  Returns the accepted changes ``(key, old, new)`` (reported with ``print_fn``).

  Raises:
    SystemExit: one line listing the refused changes (config keys or input files) and the ways forward; the
      workdir is left exactly as it was.
  """
  from rlj.data import fingerprint
  record, inputs = config_record(config), input_files(config)
  config_path, inputs_path = os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, INPUTS_FILE)
  changes: list[tuple[str, Any, Any]] = []
  if has_work(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    forward = (f"Nothing in {workdir} was changed. To resume it, relaunch with the config it was started with "
               f"({config_path}); to train the new setting, pass a new --workdir (add --config.init.policy=rlj "
               f"--config.init.path={ckpts} to start from this run's weights when the model is unchanged)")
    if os.path.exists(config_path):
      with open(config_path) as f:
        changes = changed_keys(json.load(f), record)
      # A key only one side has came or went with an rlj version (new keys default to the old behaviour).
      refused = [c for c in changes if not accepted(c[0]) and "(unset)" not in (c[1], c[2])]
      if refused:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in refused)
        raise SystemExit(f"workdir {workdir} was started with another config ({listed}). {forward}")
    if os.path.exists(inputs_path):
      with open(inputs_path) as f:
        old_inputs = json.load(f)
      keys = {"data": "data.source_dir", "tokenizer": "tokenizer.path" if config.get("tokenizer", {}).get("path")
              else "init.path"}
      for name, old in old_inputs.items():
        new = inputs.get(name)
        if new is not None and new["digest"] != old["digest"]:
          raise SystemExit(f"config key '{keys[name]}': the {name} files changed since workdir {workdir} started "
                           f"({fingerprint.describe_change(old, new)}); a resume would continue from a saved "
                           f"position in other {name}. {forward}")
      inputs = {**old_inputs, **inputs}
    for k, a, b in changes:
      why = "a key of another rlj version" if "(unset)" in (a, b) else "schedule, logging or layout"
      print_fn(f"relaunch of {workdir}: {k} {_show(a)} -> {_show(b)} (accepted: {why})")
  if write and (os.path.exists(config_path) or not has_work(workdir)):
    record_start(config, workdir, inputs)
  # else: checkpoints without a record (removed by hand): the resume checks their shapes, and the launcher
  # records the config once the job ran (``record_start``), so a mismatch never writes a record that lies.
  return changes


def record_start(config, workdir: str, inputs: dict | None = None) -> None:
  """Writes ``config.json`` and ``inputs.json`` for ``config`` (process 0 only)."""
  _write_json(os.path.join(workdir, CONFIG_FILE), config_record(config))
  _write_json(os.path.join(workdir, INPUTS_FILE), input_files(config) if inputs is None else inputs)


def recorded(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)
