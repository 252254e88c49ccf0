"""Chat template rendering: the jinja environment against transformers' apply_chat_template, and one-line errors."""
import os
import pickle

import pytest

from rlj.data import chat, tokenizer

transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Größe? <b>&'\"</b>"},
            {"role": "assistant", "content": "  42  ", "reasoning": "six times seven"},
            {"role": "user", "content": "And 6 * 9?", "name": None}]

ENVIRONMENT_TEMPLATES = {
    "tojson": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}|"
              "{{ {'b': \"é<>&'\", 'a': [1, 2.5, none, true]} | tojson(separators=(',', ':')) }}",
    "namespace_loopcontrols": "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% if m.role == 'system' %}"
                              "{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}"
                              "{% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}{% endfor %}{{ ns.n }} {{ ns.last }}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]"
                  "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
    "dict": "{% set d = dict(a=1, b='x') %}{{ d | tojson }} {{ dict.fromkeys(['k'], 2) | tojson }}",
    "variables": "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools is none }}|{{ documents is none }}|"
                 "{{ add_generation_prompt }}|{{ messages[3].name is defined }}|{{ messages[2].reasoning_content }}|"
                 "{{ messages[2].thinking }}|{{ date_string is defined }}",
    "whitespace": "{% for m in messages %}\n    {% if m.role == 'user' %}\n        U: {{ m.content | trim }}\n"
                  "    {% endif %}\n{% endfor %}\n{%- if add_generation_prompt %}\nA:{% endif %}",
    "strftime": "{{ strftime_now('%Y') }}",
}


@pytest.fixture(scope="module")
def llama(checkpoint_dirs):
  return tokenizer.load(checkpoint_dirs["llama3"]), transformers.AutoTokenizer.from_pretrained(
      checkpoint_dirs["llama3"])


@pytest.mark.parametrize("name", sorted(ENVIRONMENT_TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_environment_matches_transformers(llama, name, add_generation_prompt):
  ours, ref = llama
  source = ENVIRONMENT_TEMPLATES[name]
  template = chat.ChatTemplate(source, special_tokens=ours.special_tokens)
  want = ref.apply_chat_template(MESSAGES, chat_template=source, tokenize=False,
                                 add_generation_prompt=add_generation_prompt)
  assert template.render(MESSAGES, add_generation_prompt=add_generation_prompt) == want


def test_extra_variables_override(llama):
  ours, ref = llama
  kwargs = {"date_string": "01 Jan 2025", "eos_token": "<END>"}
  source = "{{ date_string }} {{ eos_token }}"
  assert chat.ChatTemplate(source, special_tokens=ours.special_tokens).render(MESSAGES, **kwargs) == (
      ref.apply_chat_template(MESSAGES, chat_template=source, tokenize=False, **kwargs))
  assert ours.chat_template.render(MESSAGES[:2], date_string="01 Jan 2025") == ref.apply_chat_template(
      MESSAGES[:2], tokenize=False, add_generation_prompt=True, date_string="01 Jan 2025")


def _error(template, messages, match):
  with pytest.raises(chat.ChatTemplateError, match=match) as e:
    template.render(messages)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_gemma_template_errors_are_one_line(checkpoint_dirs):
  gemma = tokenizer.load(checkpoint_dirs["gemma"])
  template = gemma.chat_template
  msg = _error(template, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
               r"System role not supported \(message 0\)$")
  assert msg.startswith(os.path.join(checkpoint_dirs["gemma"], "tokenizer_config.json"))
  _error(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
         r"Conversation roles must alternate user/assistant/user/assistant/\.\.\. \(message 1\)$")
  _error(template, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}], r"\(message 2\)$")
  transformers_tok = transformers.AutoTokenizer.from_pretrained(checkpoint_dirs["gemma"])
  with pytest.raises(Exception, match="System role not supported"):  # the reference refuses it too
    transformers_tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_error_index_follows_sliced_messages(llama):
  """The Llama template drops the system turn with messages[1:]; the index still counts the caller's list."""
  ours, _ = llama
  _error(ours.chat_template, [MESSAGES[0], MESSAGES[1], {"role": "robot", "content": "x"}],
         r"Unknown role: robot \(message 2\)$")


def test_other_failures_are_one_line(llama):
  ours, _ = llama
  _error(ours.chat_template, [], "no messages to render")
  _error(chat.ChatTemplate("{{ messages[0].content + '!' }}"), [{"role": "user", "content": ["a", "list"]}],
         r"chat template error: can only concatenate list .* \(message 0\)$")
  _error(chat.ChatTemplate("{{ messages.append(1) }}"), MESSAGES, "chat template error: .*append")
  _error(chat.ChatTemplate("{% set ns = namespace(_x=1) %}"), MESSAGES, "may not set the namespace attribute '_x'")
  with pytest.raises(chat.ChatTemplateError, match=r"does not compile: .* \(template line 2\)$"):
    chat.ChatTemplate("ok\n{% for m in messages %}", where="t.jinja")
  with pytest.raises(chat.ChatTemplateError, match="message 0 must be a dict"):
    ours.chat_template.render(["hello"])


def test_template_is_picklable_and_adds_bos(llama, checkpoint_dirs):
  ours, _ = llama
  again = pickle.loads(pickle.dumps(ours.chat_template))
  assert again.render(MESSAGES) == ours.chat_template.render(MESSAGES) and again.adds_bos
  qwen = tokenizer.load(checkpoint_dirs["qwen"])
  assert not qwen.chat_template.adds_bos


def test_find_templates_priority(tmp_path):
  config = {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]}
  assert chat.find_templates(str(tmp_path), config) == {"default": "A", "tool_use": "B"}
  assert chat.find_templates(str(tmp_path), {}) == {}
  (tmp_path / "chat_template.jinja").write_text("C")
  (tmp_path / "additional_chat_templates").mkdir()
  (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("D")
  assert chat.find_templates(str(tmp_path), config) == {"default": "C", "rag": "D"}  # files win, as transformers
  with pytest.raises(chat.ChatTemplateError, match="no chat template named 'x'; it has"):
    chat.pick_template({"default": "A"}, {}, name="x", where=str(tmp_path))
  with pytest.raises(chat.ChatTemplateError, match="chat_template must be a string or a list"):
    chat.find_templates(str(tmp_path / "none"), {"chat_template": 3})
