"""README's agent example runs as printed: its ``my_agent.py`` block defines a tool and an environment that
answer calls and reward the final turn as the README says."""
import os
import re
import types

from rlj.agents.env import Turn

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def _module():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## Agents: multi-turn tool use"):]
  block = re.search(r"saved as `my_agent.py`.*?```python\n(.*?)^```", section, flags=re.S | re.M).group(1)
  module = types.ModuleType("my_agent")
  exec(compile(block, "README.md my_agent.py", "exec"), module.__dict__)  # noqa: S102
  return module


def _turn(text, index=0):
  return Turn(text=text, tokens=(), stopped=True, index=index)


def test_the_readme_environment_answers_both_tools_and_rewards_the_final_turn():
  env = _module().Checked()
  call = '<tool_call>{"name": "digit_sum", "arguments": {"number": 1776}}</tool_call>'
  first = env.step(_turn(call))
  assert first.observation == "21" and not first.done and first.counts["tool_calls"] == 1
  calc = env.step(_turn('<tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48"}}</tool_call>', 1))
  assert calc.observation == "1776"
  assert env.step(_turn("#### 1776", 2)).reward == 1.0
  assert env.step(_turn("1776", 2)).reward == 0.0
