"""Observation turns: a plain template, and the chat template's own markers worked out from sentinel messages
(checked against rendering whole conversations with the template)."""
import pytest

from rlj.agents.observations import ObservationError, ObservationFormat
from rlj.data import chat
from rlj.data import tokenizer as tok_lib

IM_END = 7

# ChatML with Qwen's tool turns: a "tool" message is a user turn holding a <tool_response> block.
QWEN_LIKE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m.role in ('user', 'assistant', 'system') %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('unknown role ' + m.role) }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# The same without a tool role (Gemma-like templates refuse roles they do not know).
NO_TOOL_ROLE = QWEN_LIKE.replace("m.role == 'tool'", "m.role == 'never'")


class FakeTokenizer:
  """id_to_piece for the end-of-turn id; encode as one id per character (enough to see what is encoded)."""

  def __init__(self, end_piece="<|im_end|>"):
    self.end_piece = end_piece

  def id_to_piece(self, i):
    return {IM_END: self.end_piece, 3: "</s>"}.get(i, f"<piece {i}>")

  def encode(self, text):
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def sp_tokenizer():
  return tok_lib.train(["<tool_response>1776</tool_response>#### 1776\nobs: ok"] * 10, vocab_size=60,
                       byte_fallback=False)


def test_plain_template(sp_tokenizer):
  fmt = ObservationFormat(sp_tokenizer, template="<tool_response>{observation}</tool_response>")
  assert fmt.kind == "plain"
  assert fmt.text("1776") == "<tool_response>1776</tool_response>"
  assert fmt.encode("1776") == sp_tokenizer.encode("<tool_response>1776</tool_response>")
  assert fmt.encode("1776") and sp_tokenizer.bos_id not in fmt.encode("1776")
  braces = ObservationFormat(sp_tokenizer, template="\nobs: {observation} {not a slot}\n")
  assert braces.text("ok") == "\nobs: ok {not a slot}\n"


def test_plain_template_without_slot():
  with pytest.raises(ObservationError, match=r"has no \{observation\} slot") as e:
    ObservationFormat(FakeTokenizer(), template="<tool_response></tool_response>")
  assert "\n" not in str(e.value)
  with pytest.raises(ObservationError, match="plain observation template or the checkpoint's chat template"):
    ObservationFormat(FakeTokenizer())


CONVERSATIONS = [
    [{"role": "user", "content": "What is 37 * 48?"},
     {"role": "assistant", "content": '<tool_call>{"name": "calculator"}</tool_call>'}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "a"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("observation", ["1776", "error: division by zero\n0.25", ""])
@pytest.mark.parametrize("convo", CONVERSATIONS, ids=["first", "later"])
def test_chat_observation_turn_continues_the_rendered_conversation(convo, observation):
  template = chat.ChatTemplate(QWEN_LIKE)
  tokenizer = FakeTokenizer()
  fmt = ObservationFormat(tokenizer, chat_template=template, end_ids=[3, IM_END])
  assert fmt.kind == "chat"
  before = template.render(convo, add_generation_prompt=False)
  sampled = before[:before.rindex("<|im_end|>") + len("<|im_end|>")]   # the model stops at its <|im_end|>
  after = template.render(convo + [{"role": "tool", "content": observation}], add_generation_prompt=True)
  assert sampled + fmt.text(observation) == after
  assert fmt.text(observation) == ("\n<|im_start|>user\n<tool_response>\n" + observation +
                                   "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  assert fmt.encode(observation) == tokenizer.encode(fmt.text(observation))


def test_chat_user_role():
  fmt = ObservationFormat(FakeTokenizer(), chat_template=chat.ChatTemplate(NO_TOOL_ROLE), role="user",
                          end_ids=[IM_END])
  assert fmt.text("5") == "\n<|im_start|>user\n5<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_that_refuses_the_role():
  with pytest.raises(ObservationError, match="cannot render a 'tool' turn.*unknown role tool.*'user'") as e:
    ObservationFormat(FakeTokenizer(), chat_template=chat.ChatTemplate(NO_TOOL_ROLE), end_ids=[IM_END])
  assert "\n" not in str(e.value)


def test_chat_end_ids_that_do_not_match():
  template = chat.ChatTemplate(QWEN_LIKE)
  for tokenizer, end_ids in ((FakeTokenizer(end_piece="<|endoftext|>"), [IM_END]), (FakeTokenizer(), [])):
    with pytest.raises(ObservationError, match="none of the model's stop tokens.*sampler.stop_tokens") as e:
      ObservationFormat(tokenizer, chat_template=template, end_ids=end_ids)
    assert "\n" not in str(e.value)


def test_chat_template_that_drops_the_assistant_turn():
  drops = chat.ChatTemplate("{%- for m in messages %}{%- if m.role != 'assistant' %}{{- m.content }}{%- endif %}"
                            "{%- endfor %}")
  with pytest.raises(ObservationError, match="does not keep the assistant's content"):
    ObservationFormat(FakeTokenizer(), chat_template=drops, end_ids=[IM_END])
