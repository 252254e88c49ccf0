"""Tools from Python functions, calls parsed from the model's text, and the tool-calling environment: results,
error observations, counters and time limits (SIGALRM in the main thread, a worker thread elsewhere)."""
import json
import signal
import threading
import time

import pytest

from rlj.agents import env as env_lib
from rlj.agents.calculator import calculator
from rlj.agents.tools import Call, CallFormat, Tool, ToolEnvironment


def turn(text):
  return env_lib.Turn(text=text, tokens=(), stopped=True, index=0)


def call(name, **arguments):
  return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def lookup(city: str, year: int, scale: float = 1.0, exact: bool = False, note="-"):
  """Looks up a city's population.

  More text that is not the description.
  """
  return f"{city} {year} {scale} {exact} {note}"


def test_from_function_reads_signature_and_docstring():
  tool = Tool.from_function(lookup)
  assert tool.name == "lookup" and tool.fn is lookup
  assert tool.description == "Looks up a city's population."
  assert dict(tool.params) == {"city": (str, True), "year": (int, True), "scale": (float, False),
                               "exact": (bool, False), "note": (str, False)}   # no annotation: a string
  assert tool.schema == {"type": "function", "function": {
      "name": "lookup", "description": "Looks up a city's population.",
      "parameters": {"type": "object",
                     "properties": {"city": {"type": "string"}, "year": {"type": "integer"},
                                    "scale": {"type": "number"}, "exact": {"type": "boolean"},
                                    "note": {"type": "string"}},
                     "required": ["city", "year"]}}}
  json.dumps(tool.schema)   # chat templates serialise it


def test_from_function_string_annotations_name_and_no_docstring():
  def f(n: "int", *, x: "float" = 0.5):
    return n
  tool = Tool.from_function(f, name="renamed")
  assert tool.name == "renamed" and tool.description == ""
  assert dict(tool.params) == {"n": (int, True), "x": (float, False)}
  calc = Tool.from_function(calculator)   # its module uses postponed annotations
  assert dict(calc.params) == {"expression": (str, True)} and calc.description.startswith("Evaluates")


def test_from_function_refuses_untyped_signatures():
  def listy(xs: list):
    return xs

  def star(*args: int):
    return args

  def kw(**kwargs: int):
    return kwargs

  def positional(a: int, /):
    return a
  with pytest.raises(ValueError, match="'xs' is annotated .*list.*; use str, int, float or bool"):
    Tool.from_function(listy)
  with pytest.raises(ValueError, match="'listy'.*'xs'"):
    Tool.from_function(listy)
  for fn, param in ((star, "args"), (kw, "kwargs"), (positional, "a")):
    with pytest.raises(ValueError, match=f"parameter {param!r} must be callable by keyword"):
      Tool.from_function(fn)


def test_check_arguments():
  tool = Tool.from_function(lookup)
  assert tool.check_arguments({"city": "Oslo", "year": 2020}) is None
  assert tool.check_arguments({"city": "Oslo", "year": 2020, "scale": 2, "exact": True, "note": "n"}) is None
  assert tool.check_arguments({"city": "Oslo", "year": 2020, "scale": 2.5}) is None
  assert "no argument 'town'" in tool.check_arguments({"city": "Oslo", "year": 1, "town": "x"})
  assert "needs the argument 'year'" in tool.check_arguments({"city": "Oslo"})
  wrong = tool.check_arguments({"city": "Oslo", "year": True})
  assert "'year' of 'lookup' must be a" in wrong and "integer, got true" in wrong   # bool is not an int
  assert "'year'" in tool.check_arguments({"city": "Oslo", "year": 2020.0})
  assert "'year'" in tool.check_arguments({"city": "Oslo", "year": "2020"})
  assert "'city'" in tool.check_arguments({"city": 3, "year": 2020})
  assert "'scale'" in tool.check_arguments({"city": "Oslo", "year": 1, "scale": False})
  assert "'exact'" in tool.check_arguments({"city": "Oslo", "year": 1, "exact": 1})
  assert "must be a JSON object" in tool.check_arguments(["Oslo", 2020])


def test_call_format_parse():
  fmt = CallFormat()
  assert fmt.parse("just an answer #### 4") == []
  text = f"first {call('a', x=1)} middle\n{call('b')} end <tool_call> {{\"name\": \"c\"}} </tool_call>."
  assert fmt.parse(text) == [Call("a", {"x": 1}), Call("b", {}), Call("c", {})]
  bad, = fmt.parse("<tool_call>{'name': 'a'}</tool_call>")
  assert bad.error.startswith("the call is not JSON") and not bad.name
  for body in ('{"arguments": {}}', '{"name": 3}', '["a"]', '"a"'):
    nameless, = fmt.parse(f"<tool_call>{body}</tool_call>")
    assert nameless.error == 'a call must be {"name": <tool>, "arguments": {...}}', body
  good, unclosed = fmt.parse(call("a") + ' then <tool_call>{"name": "b"')
  assert good == Call("a", {}) and unclosed.error == "a <tool_call> without </tool_call>"
  custom = CallFormat(open="[[CALL ", close=" ]]")
  assert custom.parse('x [[CALL {"name": "a", "arguments": {"y": "]"}} ]] ' + call("ignored")) == [
      Call("a", {"y": "]"})]


def test_step_without_call_ends_the_episode():
  result = ToolEnvironment([Tool.from_function(calculator)]).step(turn("#### 1776"))
  assert result.done and result.ends and result.observation is None


def test_step_answers_calls_in_order():
  env = ToolEnvironment([Tool.from_function(calculator), Tool.from_function(lookup)])
  result = env.step(turn("I will compute. " + call("calculator", expression="37 * 48")))
  assert result.observation == "1776" and not result.done and not result.ends
  assert dict(result.counts) == {"tool_calls": 1, "tool_errors": 0, "malformed_calls": 0}
  result = env.step(turn(call("lookup", city="Oslo", year=2020) + call("calculator", expression="1 / 4")))
  assert result.observation == "Oslo 2020 1.0 False -\n0.25"
  assert result.counts["tool_calls"] == 2


@pytest.mark.parametrize("text, message", [
    (call("search", query="x"), "error: unknown tool 'search'; the tools are ['calculator']"),
    ("<tool_call>{name: calculator}</tool_call>", "error: the call is not JSON"),
    ("<tool_call>{\"name\": \"calculator\"", "error: a <tool_call> without </tool_call>"),
    (call("calculator", expr="1 + 1"), "error: 'calculator' takes no argument 'expr'"),
    (call("calculator"), "error: 'calculator' needs the argument 'expression'"),
    (call("calculator", expression=12), "error: argument 'expression' of 'calculator' must be a string"),
])
def test_malformed_calls_are_observations(text, message):
  result = ToolEnvironment([Tool.from_function(calculator)]).step(turn(text))
  assert result.observation.startswith(message) and "\n" not in result.observation
  assert not result.ends
  assert dict(result.counts) == {"tool_calls": 0, "tool_errors": 0, "malformed_calls": 1}


def test_failing_tool_is_an_observation():
  def broken(x: int):
    raise RuntimeError(f"bad\n  input {x}")
  env = ToolEnvironment([Tool.from_function(broken), Tool.from_function(calculator)])
  result = env.step(turn(call("broken", x=3) + call("calculator", expression="1 / 0")))
  assert result.observation == "error: broken failed: bad input 3\nerror: calculator failed: division by zero"
  assert dict(result.counts) == {"tool_calls": 2, "tool_errors": 2, "malformed_calls": 0}
  assert not result.ends


def test_max_calls_per_turn():
  env = ToolEnvironment([Tool.from_function(calculator)], max_calls_per_turn=2)
  result = env.step(turn("".join(call("calculator", expression=f"{k} + 1") for k in range(4))))
  assert result.observation.split("\n") == ["1", "2", "error: at most 2 calls per turn",
                                            "error: at most 2 calls per turn"]
  assert dict(result.counts) == {"tool_calls": 2, "tool_errors": 0, "malformed_calls": 2}


def _slow_tools(stop: threading.Event):
  """A sleeping and a busy tool that run for 5 s unless ``stop`` is set."""
  def sleepy(x: int):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not stop.is_set():
      time.sleep(0.01)
    return "slept"

  def busy(x: int):
    deadline, n = time.monotonic() + 5, 0
    while time.monotonic() < deadline and not stop.is_set():
      n += 1
    return "done"
  return [Tool.from_function(sleepy), Tool.from_function(busy)]


def _step_timed(env, text, in_thread):
  out = {}

  def go():
    t0 = time.monotonic()
    out["result"] = env.step(turn(text))
    out["seconds"] = time.monotonic() - t0
  if in_thread:
    worker = threading.Thread(target=go)
    worker.start()
    worker.join(10)
  else:
    go()
  return out["result"], out["seconds"]


@pytest.mark.parametrize("in_thread", [False, True], ids=["sigalrm", "thread"])
@pytest.mark.parametrize("name", ["sleepy", "busy"])
def test_slow_tool_times_out(name, in_thread):
  stop = threading.Event()
  env = ToolEnvironment(_slow_tools(stop) + [Tool.from_function(calculator)], timeout_s=0.2)
  try:
    result, seconds = _step_timed(env, call(name, x=1) + call("calculator", expression="2 * 3"), in_thread)
  finally:
    stop.set()   # lets an abandoned worker thread finish
  assert seconds < 2
  assert result.observation == f"error: {name} took longer than 0.2 s\n6"
  assert dict(result.counts) == {"tool_calls": 2, "tool_errors": 1, "malformed_calls": 0}
  assert not result.ends


def test_timeout_restores_the_previous_alarm_handler():
  def previous(signum, frame):
    raise AssertionError("the tool's alarm should not reach this handler")
  original = signal.signal(signal.SIGALRM, previous)
  stop = threading.Event()
  try:
    env = ToolEnvironment(_slow_tools(stop) + [Tool.from_function(calculator)], timeout_s=0.2)
    assert env.step(turn(call("sleepy", x=1))).observation.startswith("error: sleepy took longer")
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert env.step(turn(call("calculator", expression="2 + 2"))).observation == "4"   # fast calls: no timer left
    assert signal.getsignal(signal.SIGALRM) is previous
  finally:
    stop.set()
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, original)


def test_no_timeout_and_no_tools():
  stop = threading.Event()
  stop.set()
  env = ToolEnvironment(_slow_tools(stop), timeout_s=0)   # 0: no limit; the tool returns at once (stop is set)
  assert env.step(turn(call("busy", x=1))).observation == "done"
  result = ToolEnvironment().step(turn(call("calculator", expression="1")))
  assert result.observation == "error: unknown tool 'calculator'; the tools are none"
