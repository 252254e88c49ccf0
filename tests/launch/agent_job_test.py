"""The agent job end to end (configs/agent_tpu.py:runlocal, shrunk): SFT on calculator demonstrations, then GRPO on
multi-turn trajectories with the agent metrics in metrics.jsonl; and the agent section's bad inputs, each stopped
in one line naming the key before anything compiles."""
import json
import os

import jax
import numpy as np
import pytest

from configs import agent_tpu
from launch import train

import bad_config_test  # noqa: E402  (tests/launch)

compiles = bad_config_test.compiles   # the compile-event fixture

pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(**changes):
  c = agent_tpu.get_config("runlocal")
  c.tokenizer.train_records = 200
  c.sft.steps, c.sft.batch_prompts, c.sft.eval_every = 4, 8, 0
  c.train.total_steps, c.train.batch_prompts, c.train.eval_every, c.train.ckpt_every = 2, 8, 2, 2
  c.sampler.num_generations = 2
  c.eval.num_prompts, c.eval.batch_prompts = 8, 8
  c.agent.max_turns = 2
  c.agent.kv_cache = "reuse"   # the launcher's TurnSampler wiring (re-prefilling: tests/agents/rollout_test.py)
  return bad_config_test.apply_changes(c, changes)


@pytest.mark.slow   # ~25 s on 2 cores: outside the CI budget; tests/agents/ cover the sampler and rewards, the bad
# configs below the launcher
def test_agent_job_trains_on_multi_turn_trajectories_and_logs_agent_metrics(tmp_path):
  workdir = str(tmp_path / "run")
  history = train.run(_config(), workdir)
  assert [h["step"] for h in history] == [0, 1, 2]
  for h in history[1:]:
    assert np.isfinite(h["loss"])
    assert 1.0 <= h["agent/turns"] <= 2.0
    for key in ("agent/tool_call_rate", "agent/tool_errors", "agent/malformed_calls", "agent/hit_budget",
                "agent/hit_max_turns", "agent/reward_per_turn", "time/agent_env"):
      assert key in h
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert any("agent/turns" in r for r in records)
  assert {"eval/accuracy", "eval/tool_call_rate", "eval/turns"} <= set(records[-1])
  assert jax.device_count() == 8


CASES = {
    "unknown_tool": ({"agent.tools": ("calculater",)}, r"'agent\.tools\[0\]'.*'calculater'.*calculator"),
    "tool_import": ({"agent.tools": ("no_such_module:fn",)}, r"'agent\.tools\[0\]'.*cannot import 'no_such_module'"),
    "tool_signature": ({"agent.tools": ("json:dumps",)}, r"'agent\.tools\[0\]'.*parameter 'obj'|'agent\.tools\[0\]'"),
    "env": ({"agent.env": "tool"}, r"'agent\.env'.*tools \| single_turn"),
    "env_class": ({"agent.env": "json:JSONDecoder"}, r"'agent\.env'.*not an rlj\.agents\.env\.Environment"),
    "budget": ({"agent.max_total_tokens": 8}, r"'agent\.max_total_tokens'.*below sampler\.max_new_tokens"),
    "turns": ({"agent.max_turns": 0}, r"'agent\.max_turns'"),
    "template": ({"agent.observation_template": "<r>{obs}</r>"}, r"'agent\.observation_template'.*\{observation\}"),
    "dno": ({"algo.name": "dno"}, r"'algo\.name'.*single-turn"),
    "process": ({"algo.advantage.estimator": "process",
                 "algo.process.rewards": ({"name": "steps", "fn": "rewards.steps:arithmetic_steps"},)},
                r"'algo\.advantage\.estimator'.*turn_rewards"),
    "timeout": ({"agent.timeout_s": -1.0}, r"'agent\.timeout_s'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_agent_config_stops_in_one_line_before_compiling(case, tmp_path, compiles):
  changes, match = CASES[case]
  with pytest.raises(SystemExit, match=match) as info:
    train.run(_config(**changes), str(tmp_path / "run"))
  assert "\n" not in str(info.value)
  assert not compiles
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
