"""Judge rewards in the launcher: ``fn: "pairwise_judge"`` and ``fn: "rubric_judge"`` specs checked before anything
is built (``check``) and built on the job's mesh (``build``), one loaded judge per checkpoint folder.

  rewards=({"name": "judge", "fn": "pairwise_judge", "kwargs": {"path": "<hf folder>", "opponents": 0}},)
  rewards=({"name": "shows_work", "fn": "rubric_judge",
            "kwargs": {"path": "<hf folder>", "items": ["Does the response show its steps?"]}},)

Keys (``kwargs``): ``path`` (required), ``template`` (``rlj.judge.PAIRWISE_TEMPLATE`` / ``RUBRIC_TEMPLATE``),
``verdicts`` (("A", "B") / ("Yes", "No"), single tokens of the judge's tokenizer), ``max_len`` (1024 tokens; longer
judge prompts are missing rewards), ``chunk_rows`` (16: judge prompts per forward), ``chat`` (True: the judge's chat
template when it has one), ``add_bos`` (None: the tokenizer's default; True for a judge an rlj SFT job trained with
``data.add_bos``); ``\n`` in a template typed on a command line is a newline; pairwise: ``opponents`` (0: all others; k: the circular schedule), ``hard`` (False);
rubric: ``items`` (required: questions answered Yes/No, or ``"data"``, each example's own weighted items from a
``data.source=rubric`` dataset), ``weights`` (1 each; none with ``"data"``).
"""
from __future__ import annotations

import json
import os

FNS = ("pairwise_judge", "rubric_judge")
COMMON = {"path", "template", "verdicts", "max_len", "chunk_rows", "chat", "add_bos"}
KEYS = {"pairwise_judge": COMMON | {"opponents", "hard"}, "rubric_judge": COMMON | {"items", "weights"}}

_JUDGES: dict = {}   # (path, max_len, chunk_rows, chat) -> a loaded rlj.judge.Judge, shared by every spec


def fail(key: str, msg: str):
  raise SystemExit(f"config key '{key}': {msg}")


def _options(spec: dict) -> dict:
  from rlj import judge as judge_lib
  kw = dict(spec.get("kwargs", {}))
  pairwise = spec["fn"] == "pairwise_judge"
  from rlj.data import prompts
  template = kw.get("template", judge_lib.PAIRWISE_TEMPLATE if pairwise else judge_lib.RUBRIC_TEMPLATE)
  return {"path": kw.get("path", ""), "template": prompts.decode_escapes(str(template)),
          "add_bos": None if kw.get("add_bos") is None else bool(kw["add_bos"]),
          "verdicts": tuple(kw.get("verdicts", ("A", "B") if pairwise else ("Yes", "No"))),
          "max_len": int(kw.get("max_len", 1024)), "chunk_rows": int(kw.get("chunk_rows", 16)),
          "chat": bool(kw.get("chat", True)), "opponents": int(kw.get("opponents", 0)),
          "hard": bool(kw.get("hard", False)), "weights": kw.get("weights"),
          "items": kw["items"] if isinstance(kw.get("items"), str) else list(kw.get("items", []))}


def check(spec: dict, key: str, *, group_size: int, num_devices: int = 1, data_source: str | None = None) -> None:
  """One judge spec: known keys, a checkpoint folder, template slots, single-token verdicts, a schedule the group
  size allows, rubric items and weights, and a judge that fits the devices; SystemExit naming the key otherwise."""
  from models import hf_config
  from rewards import pairwise_judge
  from rlj import judge as judge_lib
  from rlj.data import tokenizer as tok_lib
  kw = dict(spec.get("kwargs", {}))
  unknown = sorted(set(kw) - KEYS[spec["fn"]])
  if unknown:
    fail(f"{key}.kwargs", f"unknown keys {unknown}; a {spec['fn']} reward takes {sorted(KEYS[spec['fn']])}")
  o = _options(spec)
  path = o["path"]
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    fail(f"{key}.kwargs.path", f"{path!r} is not a Hugging Face checkpoint folder (no config.json); pass the judge "
         f"model's folder (launch.export writes one from an rlj run)")
  try:
    with open(os.path.join(path, "config.json")) as f:
      mc = hf_config.config_from_hf(json.load(f))
  except (ValueError, KeyError) as e:
    fail(f"{key}.kwargs.path", f"{path!r}: {e}")
  slots = judge_lib.PAIRWISE_SLOTS if spec["fn"] == "pairwise_judge" else judge_lib.RUBRIC_SLOTS
  try:
    judge_lib.check_template(o["template"], slots)
  except judge_lib.JudgeError as e:
    fail(f"{key}.kwargs.template", str(e))
  try:
    tok = tok_lib.load(path)
  except tok_lib.TokenizerError as e:
    fail(f"{key}.kwargs.path", f"the judge's tokenizer: {e}")
  try:
    judge_lib.Judge.verdict_ids_of(tok, o["verdicts"], path)
  except judge_lib.JudgeError as e:
    fail(f"{key}.kwargs.verdicts", str(e))
  if o["max_len"] < 8 or o["chunk_rows"] < 1:
    fail(f"{key}.kwargs", f"max_len {o['max_len']} (>= 8 tokens) and chunk_rows {o['chunk_rows']} (>= 1)")
  if spec["fn"] == "pairwise_judge":
    try:
      pairwise_judge.circular_pairs(group_size, o["opponents"])
    except ValueError as e:
      fail(f"{key}.kwargs.opponents", f"{e} (sampler.num_generations = {group_size})")
  elif o["items"] == "data":
    if o["weights"] is not None:
      fail(f"{key}.kwargs.weights", "with items='data' each example's rubric items carry their own weights; drop "
           "weights")
    if data_source is not None and data_source != "rubric":
      fail(f"{key}.kwargs.items", f"'data' reads each example's rubric, which data.source={data_source!r} does not "
           f"have; use data.source=rubric (JSONL rows with a 'rubric' list) or list the items here")
  else:
    weights = o["weights"]
    if (not o["items"] or isinstance(o["items"], str)
        or (weights is not None and (len(weights) != len(o["items"]) or min(weights) < 0 or sum(weights) <= 0))):
      fail(f"{key}.kwargs.items", "a rubric judge needs a list of items (questions answered by the verdicts), or "
           "'data' for each example's own rubric, and, optionally, one non-negative weight per item (not all 0)")
  _check_fits(mc, key, num_devices)


def _check_fits(mc, key: str, num_devices: int) -> None:
  """Stops when the judge's weights alone exceed the devices' memory (where JAX reports a limit)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return
  need = mc.num_params() * 2 / max(num_devices, 1)    # bfloat16 at best, spread over every device
  if need > 0.9 * limit:
    fail(f"{key}.kwargs.path", f"the judge has {mc.num_params():,} params, at least {need / 2**30:.1f} GiB per "
         f"device even in bfloat16 over {num_devices} devices, against {limit / 2**30:.1f} GiB; use a smaller judge")


def build(spec: dict, *, mesh=None, rules=None):
  """The reward function of one judge spec (the judge loaded once per folder and option set)."""
  from rlj import judge as judge_lib
  o = _options(spec)
  cache_key = (os.path.abspath(o["path"]), o["max_len"], o["chunk_rows"], o["chat"], o["add_bos"])
  if cache_key not in _JUDGES:
    _JUDGES[cache_key] = judge_lib.Judge.load(o["path"], mesh=mesh, rules=rules, max_len=o["max_len"],
                                              chunk_rows=o["chunk_rows"], chat=o["chat"], add_bos=o["add_bos"])
  judge = _JUDGES[cache_key]
  if spec["fn"] == "pairwise_judge":
    return judge_lib.pairwise_reward_fn(judge, template=o["template"], verdicts=o["verdicts"],
                                        opponents=o["opponents"], hard=o["hard"])
  return judge_lib.rubric_reward_fn(judge, items=o["items"], weights=o["weights"], template=o["template"],
                                    verdicts=o["verdicts"])
