"""Tools as plain Python functions, calls parsed from the model's turn, and the tool-calling environment.

A ``Tool`` wraps a function with a declared signature: its parameters (with annotations ``str``, ``int``,
``float`` or ``bool``) are the call's arguments, its docstring's first line the description (``Tool.schema`` is the
JSON schema chat templates take as ``tools``). A call is written in the model's turn in ``CallFormat``:
``<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>`` by default (the Qwen /
Hermes convention that their chat templates describe). Model output is parsed with ``json.loads``, never
evaluated.

``ToolEnvironment``: a turn with calls gets one observation holding each call's result (in order, one per line);
a turn without a call is the final answer and ends the episode. A call that does not parse, names an unknown tool
or passes arguments the signature does not take gets an observation that says so (``malformed_calls``); a tool
that raises or runs past ``timeout_s`` gets an error observation (``tool_errors``); neither ends the episode
or the run. Timeouts: in the main thread on POSIX a SIGALRM interrupts the tool's Python code; elsewhere the tool
runs in a daemon thread that is abandoned (it cannot be killed) when its time is up.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

from rlj.agents.env import Environment, StepResult, Turn

_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolTimeout(BaseException):
  """A tool ran past its time limit (a BaseException, so that a tool's own ``except Exception`` cannot hide it)."""


@dataclasses.dataclass(frozen=True)
class Tool:
  """A named function the model may call; ``params``: ``{name: (python type, required)}`` from its signature."""
  name: str
  fn: Callable[..., Any]
  description: str
  params: Mapping[str, tuple[type, bool]]

  @classmethod
  def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> "Tool":
    """A tool from ``fn``'s signature (keyword-callable parameters, annotated str / int / float / bool)."""
    params = {}
    for p in inspect.signature(fn).parameters.values():
      if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
        raise ValueError(f"tool {fn.__name__!r}: parameter {p.name!r} must be callable by keyword")
      ann = p.annotation if p.annotation is not p.empty else str
      if isinstance(ann, str):
        ann = {"str": str, "int": int, "float": float, "bool": bool}.get(ann, ann)
      if ann not in _TYPES:
        raise ValueError(f"tool {fn.__name__!r}: parameter {p.name!r} is annotated {ann!r}; use str, int, float "
                         f"or bool")
      params[p.name] = (ann, p.default is p.empty)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return cls(name=name or fn.__name__, fn=fn, description=doc[0] if doc else "", params=params)

  @property
  def schema(self) -> dict:
    """The tool as chat templates take it (``{"type": "function", "function": {...}}``)."""
    props = {k: {"type": _TYPES[t]} for k, (t, _) in self.params.items()}
    return {"type": "function", "function": {
        "name": self.name, "description": self.description,
        "parameters": {"type": "object", "properties": props,
                       "required": [k for k, (_, req) in self.params.items() if req]}}}

  def check_arguments(self, arguments: Any) -> str | None:
    """Why ``arguments`` do not fit the signature, or None."""
    if not isinstance(arguments, Mapping):
      return f"the arguments of {self.name!r} must be a JSON object"
    unknown = sorted(set(arguments) - set(self.params))
    if unknown:
      return f"{self.name!r} takes no argument {unknown[0]!r}; its arguments are {sorted(self.params)}"
    missing = [k for k, (_, req) in self.params.items() if req and k not in arguments]
    if missing:
      return f"{self.name!r} needs the argument {missing[0]!r}"
    for k, v in arguments.items():
      want = self.params[k][0]
      ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
      if want is float and isinstance(v, int) and not isinstance(v, bool):
        ok = True
      if not ok:
        kind = _TYPES[want]
        article = "an" if kind[0] in "aeiou" else "a"
        return f"argument {k!r} of {self.name!r} must be {article} {kind}, got {json.dumps(v)}"
    return None


@dataclasses.dataclass(frozen=True)
class Call:
  """One parsed call: a tool name and arguments, or ``error`` (why the text is not a valid call)."""
  name: str = ""
  arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  error: str = ""


@dataclasses.dataclass(frozen=True)
class CallFormat:
  """Calls as ``<open>{"name": ..., "arguments": {...}}<close>`` in the model's text."""
  open: str = "<tool_call>"
  close: str = "</tool_call>"

  def parse(self, text: str) -> list[Call]:
    """Every call in ``text``, in order; an open marker without its close marker is a malformed call."""
    calls, at = [], 0
    while True:
      start = text.find(self.open, at)
      if start < 0:
        return calls
      end = text.find(self.close, start + len(self.open))
      if end < 0:
        return calls + [Call(error=f"a {self.open} without {self.close}")]
      calls.append(self._one(text[start + len(self.open):end].strip()))
      at = end + len(self.close)

  def _one(self, body: str) -> Call:
    try:
      obj = json.loads(body)
    except json.JSONDecodeError as e:
      return Call(error=f"the call is not JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
      return Call(error='a call must be {"name": <tool>, "arguments": {...}}')
    return Call(name=obj["name"], arguments=obj.get("arguments", {}))


def run_with_timeout(fn: Callable[..., Any], kwargs: Mapping[str, Any], timeout_s: float) -> Any:
  """``fn(**kwargs)``, raising ``ToolTimeout`` after ``timeout_s`` seconds (module docstring)."""
  if timeout_s <= 0:
    return fn(**kwargs)
  if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
    def alarm(signum, frame):
      raise ToolTimeout()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
      return fn(**kwargs)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, previous)
  out: dict = {}

  def target():
    try:
      out["value"] = fn(**kwargs)
    except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
      out["error"] = e
  worker = threading.Thread(target=target, daemon=True)   # daemon: a tool that never returns cannot block exit
  worker.start()
  worker.join(timeout_s)
  if worker.is_alive():
    raise ToolTimeout()
  if "error" in out:
    raise out["error"]
  return out["value"]


class ToolEnvironment(Environment):
  """Answers tool calls with the tools' results; a turn without calls ends the episode (module docstring).

  Args:
    tools: the tools the model may call (none: every call is answered "unknown tool").
    call_format: how calls are written.
    timeout_s: the time limit of one call (0: none).
    max_calls_per_turn: calls after this many in one turn are answered with an error and not run.
  """

  def __init__(self, tools: Sequence[Tool] = (), *, call_format: CallFormat = CallFormat(), timeout_s: float = 2.0,
               max_calls_per_turn: int = 4):
    self.tools = {t.name: t for t in tools}
    self.call_format, self.timeout_s, self.max_calls = call_format, timeout_s, max_calls_per_turn

  def step(self, turn: Turn) -> StepResult:
    calls = self.call_format.parse(turn.text)
    if not calls:
      return StepResult(done=True)
    counts = {"tool_calls": 0, "tool_errors": 0, "malformed_calls": 0}
    results = [self._answer(call, k, counts) for k, call in enumerate(calls)]
    return StepResult(observation="\n".join(results), counts=counts)

  def _answer(self, call: Call, k: int, counts: dict) -> str:
    if k >= self.max_calls:
      counts["malformed_calls"] += 1
      return f"error: at most {self.max_calls} calls per turn"
    tool = self.tools.get(call.name)
    problem = call.error or (None if tool is not None else
                             f"unknown tool {call.name!r}; the tools are {sorted(self.tools) or 'none'}")
    problem = problem or tool.check_arguments(call.arguments)
    if problem:
      counts["malformed_calls"] += 1
      return f"error: {problem}"
    counts["tool_calls"] += 1
    try:
      return str(run_with_timeout(tool.fn, call.arguments, self.timeout_s))
    except ToolTimeout:
      counts["tool_errors"] += 1
      return f"error: {tool.name} took longer than {self.timeout_s:g} s"
    except Exception as e:  # noqa: BLE001  a tool may fail in any way; the model reads why
      counts["tool_errors"] += 1
      return f"error: {tool.name} failed: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
  return re.sub(r"\s+", " ", str(e)).strip()[:200] or type(e).__name__
