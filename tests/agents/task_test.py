"""The calculator task's records (deterministic, right answers, calls that the tool environment answers with the
demonstration's own observation) and ``sft_batch``'s ``skip_spans`` (observations attended to, not trained on)."""
import re

import numpy as np
import pytest

from rewards.verifiable import extract_answer, math_exact_match
from rlj.agents import env as env_lib
from rlj.agents.calculator import calculator
from rlj.agents.task import CalculatorTask, call_text
from rlj.agents.tools import CallFormat, Tool, ToolEnvironment
from rlj.data import tokenizer as tok_lib
from rlj.sft import sft_batch

PROMPT = re.compile(r"^What is (\d+) \* (\d+)\?$")
OPEN, CLOSE = "<tool_response>", "</tool_response>"


def operands(record):
  a, b = PROMPT.match(record["prompt"]).groups()
  return int(a), int(b)


def test_records_are_deterministic_per_seed_and_index():
  task = CalculatorTask(20, seed=3)
  backwards = [task[i] for i in reversed(range(20))][::-1]
  assert [CalculatorTask(20, seed=3)[i] for i in range(20)] == backwards   # record i depends only on (seed, i)
  assert [r["index"] for r in backwards] == list(range(20))
  assert CalculatorTask(50, seed=3)[7] == task[7]                          # nor on the task's size
  assert [task[i]["prompt"] for i in range(20)] != [CalculatorTask(20, seed=4)[i]["prompt"] for i in range(20)]
  assert len(task) == 20 and len({r["prompt"] for r in backwards}) > 15


@pytest.mark.parametrize("digits", [(2, 2), (3, 1)])
def test_answers_are_the_products(digits):
  task = CalculatorTask(30, seed=1, digits=digits)
  records = [task[i] for i in range(len(task))]
  for r in records:
    a, b = operands(r)
    assert len(str(a)) == digits[0] and len(str(b)) == digits[1]
    assert extract_answer(r["answer"]) == str(a * b)
    assert r["answer"].endswith(f"#### {a * b}")
  scores = math_exact_match([r["prompt"] for r in records], [f"#### {np.prod(operands(r))}" for r in records],
                            answers=[r["answer"] for r in records])
  np.testing.assert_array_equal(scores, np.ones(len(records)))


def test_tool_fraction():
  fmt = CallFormat()
  assert all(fmt.parse(CalculatorTask(40, tool_fraction=0.0)[i]["answer"]) == [] for i in range(40))
  assert all(len(fmt.parse(CalculatorTask(40, tool_fraction=1.0)[i]["answer"])) == 1 for i in range(40))
  some = [bool(fmt.parse(CalculatorTask(200, tool_fraction=0.5)[i]["answer"])) for i in range(200)]
  assert 60 < sum(some) < 140


def test_demonstrated_call_gets_the_demonstrated_observation():
  task = CalculatorTask(20, seed=5, tool_fraction=1.0)
  env = ToolEnvironment([Tool.from_function(calculator)])
  for i in range(len(task)):
    answer = task[i]["answer"]
    a, b = operands(task[i])
    call, = CallFormat().parse(answer)
    assert call.name == "calculator" and dict(call.arguments) == {"expression": f"{a} * {b}"}
    assert answer.startswith(call_text(f"{a} * {b}"))
    turn_text = answer[:answer.index("</tool_call>") + len("</tool_call>")]
    result = env.step(env_lib.Turn(text=turn_text, tokens=(), stopped=True, index=0))
    assert result.counts["tool_calls"] == 1 and result.counts["malformed_calls"] == 0
    assert answer[len(turn_text):] == f"{OPEN}{result.observation}{CLOSE}#### {a * b}"
    assert result.observation == calculator(call.arguments["expression"]) == str(a * b)
    final = env.step(env_lib.Turn(text=f"#### {a * b}", tokens=(), stopped=True, index=1))
    assert final.ends


def test_custom_observation_template():
  r = CalculatorTask(3, tool_fraction=1.0, observation_template="\nobs: {observation}\n")[2]
  a, b = operands(r)
  assert r["answer"] == call_text(f"{a} * {b}") + f"\nobs: {a * b}\n#### {a * b}"


@pytest.mark.parametrize("index", [-1, 5, 6])
def test_index_out_of_range(index):
  with pytest.raises(IndexError, match=r"out of range \[0, 5\)"):
    CalculatorTask(5)[index]


@pytest.fixture(scope="module")
def tokenizer():
  demos = [CalculatorTask(20, seed=s, tool_fraction=0.7)[i]["answer"] for s in range(3) for i in range(20)]
  return tok_lib.train(demos + [f"What is {a} * 12?" for a in range(10, 40)], vocab_size=80, byte_fallback=False,
                       extra_options={"user_defined_symbols": ["\n", OPEN, CLOSE]})


def _reference_mask(tokenizer, answer, completion_len):
  """The loss mask from the text: 1 outside <tool_response>...</tool_response>, 0 inside it and on its markers
  (user-defined symbols are split off before the text around them is tokenized)."""
  mask = []
  for k, part in enumerate(re.split(f"({re.escape(OPEN)}.*?(?:{re.escape(CLOSE)}|$))", answer)):
    mask += [k % 2 == 0] * len(tokenizer.encode(part))
  mask += [1]   # EOS
  mask = np.array(mask[:completion_len], np.float32)
  return np.pad(mask, (0, completion_len - len(mask)))


def test_sft_batch_skip_spans(tokenizer):
  open_id, close_id = tokenizer.token_to_id(OPEN), tokenizer.token_to_id(CLOSE)
  assert open_id is not None and close_id is not None
  answers = [CalculatorTask(4, seed=9, tool_fraction=1.0)[0]["answer"],
             CalculatorTask(4, seed=9, tool_fraction=0.0)[1]["answer"],
             call_text("2 * 3") + f"{OPEN}6{CLOSE}{OPEN}6{CLOSE}#### 6",
             CalculatorTask(4, seed=9, tool_fraction=1.0)[3]["answer"]]
  completion_len = 64   # longer than every answer: the padding is neither attended nor trained
  prompts = {"prompt_tokens": np.full((4, 3), 5, np.int32), "prompt_mask": np.array([[0, 1, 1]] * 4, np.int32),
             "answer": answers, "valid": np.array([True, True, True, False])}
  batch = sft_batch(prompts, tokenizer, completion_len, skip_spans=((open_id, close_id),))
  plain = sft_batch(prompts, tokenizer, completion_len)
  for i, answer in enumerate(answers):
    ids = tokenizer.encode(answer, add_eos=True)
    n = len(ids)
    assert n < completion_len
    attn = np.array(batch["attn_mask"][i, 3:])
    if i == 3:   # not valid: nothing attended or trained
      assert not batch["attn_mask"][i].any() and not batch["mask"][i].any()
      continue
    np.testing.assert_array_equal(batch["tokens"][i, 3:3 + n], ids[:n])
    np.testing.assert_array_equal(attn, np.arange(completion_len) < n)     # observations are attended to
    np.testing.assert_array_equal(batch["mask"][i], _reference_mask(tokenizer, answer, completion_len))
    np.testing.assert_array_equal(plain["mask"][i], attn)                  # no skip_spans: every answer token
  assert batch["mask"][0].sum() < plain["mask"][0].sum() and (batch["mask"][1] == plain["mask"][1]).all()
  assert batch["mask"][2].sum() == plain["mask"][2].sum() - 6              # two spans of <open> 6 <close>


def test_sft_batch_span_cut_by_completion_len(tokenizer):
  open_id, close_id = tokenizer.token_to_id(OPEN), tokenizer.token_to_id(CLOSE)
  answer = CalculatorTask(1, seed=2, tool_fraction=1.0)[0]["answer"]
  ids = tokenizer.encode(answer, add_eos=True)
  cut = ids.index(open_id) + 2   # the span's close marker is past the end
  prompts = {"prompt_tokens": np.zeros((1, 2), np.int32), "prompt_mask": np.ones((1, 2), np.int32),
             "answer": [answer]}
  batch = sft_batch(prompts, tokenizer, cut, skip_spans=((open_id, close_id),))
  np.testing.assert_array_equal(batch["mask"][0], np.arange(cut) < ids.index(open_id))
  np.testing.assert_array_equal(batch["attn_mask"][0], np.ones(2 + cut))
