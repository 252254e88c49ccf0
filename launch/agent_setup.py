"""Config -> multi-turn agent rollouts: the ``agent`` section's checks, tools, environments and samplers.

An RL config with an ``agent`` section whose ``enabled`` is True rolls out multi-turn trajectories
(``rlj.agents.rollout``); see ``configs/agent_tpu.py`` for every key. Tools and environments are named like reward
functions: a built-in name (``TOOLS``; environment "tools") or an import string ``"package.module:name"``.
"""
from __future__ import annotations

from absl import logging

from rewards import combine

from rlj.agents import calculator

TOOLS = {"calculator": calculator.calculator}
ENVS = ("tools", "single_turn")
KV_CACHE = ("reuse", "reprefill")   # how turns after the first get their context (rlj/turn_sampler.py)


def fail(key: str, msg: str):
  raise SystemExit(f"config key '{key}': {msg}")


def enabled(config) -> bool:
  return "agent" in config and bool(config.agent.enabled)


def completion_len(config) -> int:
  """The trained width after the prompt: the agent's token budget, else ``sampler.max_new_tokens``."""
  return int(config.agent.max_total_tokens) if enabled(config) else int(config.sampler.max_new_tokens)


def _resolve(name: str, key: str, builtins: dict, what: str):
  """A built-in by name, or the function or class an import string names (``rewards.combine.import_callable``)."""
  if name in builtins:
    return builtins[name]
  if ":" not in name:
    fail(key, f"{name!r} is neither a built-in ({sorted(builtins) or 'none'}) nor 'package.module:name'")
  try:
    return combine.import_callable(name, what)
  except ImportError as e:
    fail(key, f"{e}; put the module on PYTHONPATH or fix the name")
  except (ValueError, AttributeError) as e:
    fail(key, str(e))


def tools(config) -> list:
  """The ``agent.tools`` as ``rlj.agents.tools.Tool``s."""
  from rlj.agents.tools import Tool
  out = []
  for i, name in enumerate(config.agent.tools):
    key = f"agent.tools[{i}]"
    fn = _resolve(str(name), key, TOOLS, "tool")
    try:
      out.append(Tool.from_function(fn, name=str(name).split(":")[-1]))
    except ValueError as e:
      fail(key, str(e))
  names = [t.name for t in out]
  if len(set(names)) != len(names):
    fail("agent.tools", f"two tools have one name: {names}")
  return out


def env_factory(config):
  """``() -> Environment`` of ``agent.env``: "tools" (``ToolEnvironment`` with ``agent.tools``), "single_turn", or
  an import string of an ``Environment`` class (built with ``agent.env_kwargs``)."""
  from rlj.agents import env as env_lib, tools as tools_lib
  a = config.agent
  if a.env == "tools":
    fmt = tools_lib.CallFormat(open=a.call_open, close=a.call_close)
    ts = tools(config)
    return lambda: tools_lib.ToolEnvironment(ts, call_format=fmt, timeout_s=float(a.timeout_s),
                                             max_calls_per_turn=int(a.max_calls_per_turn))
  if a.env == "single_turn":
    return env_lib.SingleTurn
  cls = _resolve(str(a.env), "agent.env", {}, "environment")
  kwargs = dict(a.get("env_kwargs", {}))
  try:
    probe = cls(**kwargs)
  except TypeError as e:
    fail("agent.env_kwargs", f"{a.env}({', '.join(kwargs)}) fails: {e}")
  if not isinstance(probe, env_lib.Environment):
    fail("agent.env", f"{a.env!r} builds a {type(probe).__name__}, not an rlj.agents.env.Environment")
  return lambda: cls(**kwargs)


def check(config) -> str | None:
  """Checks the ``agent`` section before anything is built; returns the line ``--show`` prints (None: no agent)."""
  if not enabled(config):
    return None
  a = config.agent
  import jax
  if jax.process_count() > 1:
    fail("agent.enabled", "multi-turn rollouts run in one process; launch the agent job on one host")
  if a.env not in ENVS and ":" not in str(a.env):
    fail("agent.env", f"{a.env!r}; choose {' | '.join(ENVS)} or 'package.module:EnvironmentClass'")
  if int(a.max_turns) < 1:
    fail("agent.max_turns", f"{a.max_turns}; a trajectory has at least one model turn")
  if int(a.max_total_tokens) < int(config.sampler.max_new_tokens):
    fail("agent.max_total_tokens", f"{a.max_total_tokens} is below sampler.max_new_tokens "
         f"({config.sampler.max_new_tokens}), the length of one turn; raise it (it bounds all turns and observations)")
  if a.kv_cache not in KV_CACHE:
    fail("agent.kv_cache", f"{a.kv_cache!r}; choose {' | '.join(KV_CACHE)}")
  if float(a.timeout_s) < 0:
    fail("agent.timeout_s", f"{a.timeout_s}; give seconds per tool call (0: no limit)")
  if config.data.format == "plain" and "{observation}" not in a.observation_template:
    fail("agent.observation_template", f"{a.observation_template!r} has no {{observation}} slot")
  if config.algo.name == "dno":
    fail("algo.name", "DNO's replay pairs are single-turn; use an agent job with grpo, gdpo, gspo or p3o")
  if config.algo.advantage.get("estimator") == "process":
    fail("algo.advantage.estimator", "process rewards split a single completion into steps; an agent job's "
         "trajectories take the grpo or rloo estimator (per-turn rewards: the 'turn_rewards' reward)")
  for i, spec in enumerate(config.rewards):
    if dict(spec).get("par"):
      fail(f"rewards[{i}].par", "PAR's reference responses are single-turn completions; drop 'par' in an agent job")
  if config.eval.num_prompts and config.eval.get("sampled"):
    fail("eval.sampled", "an agent job evaluates greedy trajectories only; set eval.sampled=False")
  env_factory(config)
  return (f"agent: env {a.env!r}, tools {list(a.tools)}, at most {a.max_turns} turns and {a.max_total_tokens} "
          f"tokens after the prompt")


def observation_format(config, tokenizer, end_ids):
  """How observations are tokenized: ``agent.observation_template`` for plain prompts, the chat template's turn
  markers (role ``agent.observation_role``) for chat prompts."""
  from rlj.agents.observations import ObservationError, ObservationFormat
  a = config.agent
  try:
    if config.data.format == "chat":
      return ObservationFormat(tokenizer, chat_template=tokenizer.chat_template, role=a.observation_role,
                               end_ids=end_ids)
    return ObservationFormat(tokenizer, template=a.observation_template)
  except ObservationError as e:
    fail("agent.observation_role" if config.data.format == "chat" else "agent.observation_template", str(e))


def skip_spans(config, tokenizer) -> tuple:
  """Token spans the SFT stage does not train on: a plain observation template's markers when each is one token
  (``<tool_response>`` ... ``</tool_response>``), else none."""
  if not enabled(config) or config.data.format != "plain":
    return ()
  before, _, after = config.agent.observation_template.partition("{observation}")
  ids = [tokenizer.single_token(s)[0] for s in (before, after)]
  return (tuple(ids),) if None not in ids else ()


def marker_symbols(config) -> list[str]:
  """Strings a tokenizer trained for the job keeps as single tokens: the call and observation markers."""
  if not enabled(config):
    return []
  a = config.agent
  before, _, after = a.observation_template.partition("{observation}")
  return [s for s in dict.fromkeys((a.call_open, a.call_close, before, after)) if s and s.strip()]


def multi_turn_sampler(config, env, *, greedy: bool = False, num_samples: int | None = None):
  """The job's ``MultiTurnSampler``: the first turn on the config's sampler, later turns on one with one sample per
  row whose prompt buckets reach the longest prompt plus ``agent.max_total_tokens``."""
  import dataclasses
  from launch import builders
  from rlj import programs
  from rlj.agents.rollout import MultiTurnSampler
  from rlj.buckets import round_up, shrinking_buckets
  from rlj.turn_sampler import TurnSampler
  a = config.agent
  first = builders.make_sampler(config, env, greedy=greedy, num_samples=num_samples)
  g = first.config.num_samples
  rows = (config.eval.batch_prompts if greedy else config.train.batch_prompts) * g
  longest = max(config.data.buckets) + int(a.max_total_tokens)
  ctx = sorted({min(longest, round_up(longest * k // 4, 16)) for k in (2, 3, 4)})
  cont = programs.sampler(env.model, dataclasses.replace(first.config, num_samples=1, prompt_buckets=tuple(ctx),
                                                         batch_buckets=shrinking_buckets(rows)),
                          mesh=env.mesh, param_shardings=env.param_shardings, rules=env.rules)
  obs = observation_format(config, env.tokenizer, first.config.stop_set)
  turns = None
  if a.kv_cache == "reuse" and TurnSampler.supported(env.model):
    t = first.config.max_new_tokens
    slots = round_up(max(config.data.buckets) + int(a.max_total_tokens) + int(a.max_turns) * t, 64)
    chunks = tuple(sorted({min(w, int(a.max_total_tokens)) for w in (16, 32, 64, 128, 256, 512, 1024)}
                          | {int(a.max_total_tokens)}))
    turns = TurnSampler(cont, max_slots=slots, chunk_buckets=chunks)
  elif a.kv_cache == "reuse":
    logging.warning("agent.kv_cache='reuse': the model has sliding-window layers, whose windows count cache slots; "
                    "later turns prefill the conversation again")
  return MultiTurnSampler(first=first, cont=cont, tokenizer=env.tokenizer, make_env=env_factory(config),
                          observations=obs, max_turns=int(a.max_turns), max_total_tokens=int(a.max_total_tokens),
                          turns=turns)
