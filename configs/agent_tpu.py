r"""Multi-turn, tool-using RL: GRPO on trajectories in which the model calls a calculator (rlj/agents/).

The pod variant: an instruct checkpoint (``hf=`` or ``--config.init.path``) on GSM8K in its chat template, with a
system prompt that offers the calculator; tool results come back as the template's ``tool`` turns; up to 4 model
turns of 512 tokens each and 2,048 tokens per trajectory.
  python -m launch.train --config configs/agent_tpu.py --config.init.path=$CKPT/qwen2.5-7b-instruct \
    --config.data.source_dir=$DATA/gsm8k --workdir $RUNS/agent-qwen

Local (CPU, a few minutes): the ~0.5M-parameter model learns from demonstrations of multi-digit multiplication
(half call the calculator, half guess the answer), then GRPO on the exact-match reward teaches it to call the tool:
  python -m launch.train --config configs/agent_tpu.py:runlocal --workdir runs/agent-local
The same model without the tool (every call is answered "unknown tool"):
  python -m launch.train --config configs/agent_tpu.py:runlocal,tools=false --workdir runs/agent-local-notool
A small Hugging Face chat checkpoint on GSM8K, tool results in its chat template's tool turns:
  python -m launch.train --config configs/agent_tpu.py:runlocal,hf=runs/tiny-llama \
    --config.data.source_dir=../shared/data/gsm8k --workdir runs/agent-tiny-llama

``agent`` keys: ``env`` (tools | single_turn | 'package.module:EnvironmentClass', built with ``env_kwargs``),
``tools`` (built-in names, e.g. calculator, or 'package.module:function'), ``call_open`` / ``call_close`` (how the
model writes a call around its JSON), ``observation_template`` (plain prompts: the text around a tool's result;
chat prompts use the chat template's ``observation_role`` turn), ``max_turns``, ``max_total_tokens`` (every token
after the prompt: model turns and observations; ``sampler.max_new_tokens`` is one turn's), ``timeout_s`` (per tool
call), ``max_calls_per_turn`` and ``kv_cache`` (reuse: later turns continue from the KV cache the previous turn left
and prefill only the observation; reprefill: they prefill the whole conversation again).
"""
from configs import common

VARIANTS = dict(runlocal=False, model="qwen2.5-7b", slice="v5p-32", hf="", tools=True)

SYSTEM = ("You can use a calculator. To call it, write <tool_call>{\"name\": \"calculator\", \"arguments\": "
          "{\"expression\": \"<arithmetic>\"}}</tool_call> and stop; its result comes back in the next turn. End "
          "with the final answer after ####.")


def agent_section(*, tools: bool) -> dict:
  return dict(enabled=True, env="tools", env_kwargs={}, tools=("calculator",) if tools else (),
              call_open="<tool_call>", call_close="</tool_call>",
              observation_template="<tool_response>{observation}</tool_response>", observation_role="tool",
              max_turns=4, max_total_tokens=2048, timeout_s=2.0, max_calls_per_turn=4, kv_cache="reuse")


def get_config(arg=None):
  arg = common.parse_arg(arg, **VARIANTS)
  c = common.rl_base(arg)
  c.agent = agent_section(tools=arg.tools)
  c.init.policy = "hf"
  c.data.format = "chat"
  c.data.system_prompt = SYSTEM
  c.data.user_template = "{prompt}"
  c.data.buckets = (256,)
  c.sampler.max_new_tokens = 512
  c.train.batch_prompts = 16
  if arg.runlocal:
    common.apply_runlocal(c)
    c.data.source = "calculator"
    c.data.format = "plain"
    c.data.system_prompt = ""
    c.data.user_template = "{prompt}\n"
    c.data.digits = (2, 2)
    c.data.tool_fraction = 0.5
    c.data.buckets = (16,)
    c.tokenizer.vocab_size = 128
    c.sampler.max_new_tokens = 32
    c.sampler.stop_tokens = ("</tool_call>",)   # a plain-prompt model ends its calling turn at the call's end
    c.agent.max_turns = 3
    c.agent.max_total_tokens = 64
    # Contexts under 100 tokens: continuing from the KV cache was slower here (sampling per RL step 240-319 ms
    # against 199-236 ms, README "Agents"); from 256 context tokens a continuing turn takes 0.37-0.56x the time
    # (launch.bench --case agent_turns), so the pod variant reuses.
    c.agent.kv_cache = "reprefill"
    c.sft.steps = 150
    c.train.total_steps = 100
    c.train.eval_every = 25
    c.train.ckpt_every = 25
    if arg.hf:   # a small chat checkpoint on GSM8K (data.source_dir), tool turns in its chat template
      common.apply_local_hf(c, arg.hf)
      c.data.system_prompt = SYSTEM
      c.data.user_template = "{prompt}"
      c.sampler.stop_tokens = ()
      c.agent.max_total_tokens = 192
      c.agent.kv_cache = "reuse"      # chat prompts of a few hundred tokens: continuing pays
  elif arg.hf:
    raise ValueError("variant hf=<folder> is a local run: write runlocal,hf=<folder>")
  return c
