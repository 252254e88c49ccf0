"""An agent job's tools reach a chat template as its ``tools`` variable (their JSON schemas), so templates with a
tool-calling convention describe them to the model; plain prompts and jobs without tools pass none."""
from configs import agent_tpu
from launch import data_setup
from rlj.data.chat import ChatTemplate

TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }}:{{ t['function']['parameters']"
            "['required'] | join(',') }};{% endfor %}</tools>{% endif %}{% for m in messages %}<{{ m['role'] }}>"
            "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


class ChatTokenizer:
  chat_template = ChatTemplate(TEMPLATE)
  add_bos_default = False


def _config(**agent):
  c = agent_tpu.get_config("runlocal")
  c.data.format = "chat"
  for k, v in agent.items():
    c.agent[k] = v
  return c


def test_tools_are_rendered_by_the_chat_template():
  fmt = data_setup.prompt_format(_config(), ChatTokenizer())
  text = fmt.render({"prompt": "What is 2 * 3?"})
  assert text == "<tools>calculator:expression;</tools><user>What is 2 * 3?\n<assistant>"


def test_no_tools_without_an_agent_or_tools():
  assert data_setup.prompt_format(_config(tools=()), ChatTokenizer()).render({"prompt": "q"}) == "<user>q\n<assistant>"
  c = _config()
  c.agent.enabled = False
  assert data_setup.prompt_format(c, ChatTokenizer()).render({"prompt": "q"}) == "<user>q\n<assistant>"
