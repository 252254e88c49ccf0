"""Process supervision in the GRPO row: the batcher's per-token advantages, minibatches of them, and the settings
it refuses (``algo.advantage.estimator="process"``), each in one line naming the key."""
import numpy as np
import pytest

from algorithms import process
from configs import gspo_tpu, grpo_tpu
from launch import checks, reward_setup
from rlj import batches, rl_algos

B, G, T, P = 2, 3, 6, 2
ADV = dict(scale="group", eps=1e-4, ddof=1, estimator="process", win_rate=False)
PROCESS = dict(separator="\n", rewards=({"name": "s", "fn": "my_rewards:steps"},))


def settings(adv=ADV, proc=PROCESS, g=G):
  return batches.Settings(loss_kwargs={}, options={"advantage": dict(adv), "process": dict(proc)},
                          num_generations=g, max_new_tokens=T, num_minibatches=2)


def rollout(seed=0):
  rng = np.random.default_rng(seed)
  n = B * G
  step_rewards = np.full((n, T), np.nan, np.float32)
  step_ends = np.full((n, T), -1, np.int32)
  lengths = rng.integers(1, T + 1, n)
  for i in range(n):
    k = int(rng.integers(1, lengths[i] + 1))      # the last step ends at the last token (rewards.steps)
    step_ends[i, :k] = np.append(np.sort(rng.choice(lengths[i] - 1, size=k - 1, replace=False)), lengths[i] - 1)
    step_rewards[i, :k] = rng.normal(size=k)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return {"tokens": rng.integers(1, 50, (n, P + T)).astype(np.int32), "attn_mask": np.ones((n, P + T), np.int32),
          "mask": mask, "old_logp": rng.normal(size=(n, T)).astype(np.float32), "step_rewards": step_rewards,
          "step_ends": step_ends}


def test_batcher_puts_per_token_process_advantages_in_the_batch():
  ro = rollout()
  batcher = rl_algos.get("grpo").batcher(settings())
  values = np.zeros((B, G, 1), np.float32)         # the outcome rewards do not enter
  batch, metrics = batcher.build(ro, values, np.ones(1, np.float32), 0)
  shape = (B, G, T)
  want = process.advantages(ro["step_rewards"].reshape(shape), (ro["step_ends"] >= 0).reshape(shape),
                            ro["step_ends"].reshape(shape), T)
  np.testing.assert_allclose(batch["adv"], np.asarray(want), rtol=1e-6, atol=1e-6)
  assert batch["adv"].shape == (B * G, T) and batch["adv"].dtype == np.float32
  assert "step_rewards" not in batch and set(batch) == {"tokens", "attn_mask", "mask", "old_logp", "adv"}
  assert metrics["process/steps_mean"] == float((ro["step_ends"] >= 0).sum(-1).mean())
  for mb in batches.minibatches(batch, num_minibatches=2, unit=1, rng=np.random.default_rng(0)):
    assert mb["adv"].shape == (B * G // 2, T)
  with pytest.raises(ValueError, match="step_rewards"):
    batcher.build({k: v for k, v in ro.items() if not k.startswith("step_")}, values, np.ones(1, np.float32), 0)


ROW_CASES = {
    "other row": ("gspo", settings(), r"'algo\.advantage\.estimator': 'process' gives per-token .*only "
                  r"algo\.name='grpo'"),
    "unknown estimator": ("grpo", settings(adv={**ADV, "estimator": "steps"}),
                          r"'algo\.advantage\.estimator': 'steps'; choose grpo \| rloo \| process$"),
    "win rates": ("grpo", settings(adv={**ADV, "win_rate": True}), r"'algo\.advantage\.win_rate'"),
    "empty separator": ("grpo", settings(proc={**PROCESS, "separator": ""}), r"'algo\.process\.separator': ''"),
    "no step rewards": ("grpo", settings(proc={**PROCESS, "rewards": ()}), r"'algo\.process\.rewards'"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_row_refuses(case):
  name, s, match = ROW_CASES[case]
  with pytest.raises(rl_algos.SettingError, match=match):
    rl_algos.get(name).check(s)
  rl_algos.get("grpo").check(settings())          # the supported setting passes


def _config(module=grpo_tpu, **changes):
  c = module.get_config("runlocal")
  c.algo.advantage.estimator = "process"
  c.algo.process.rewards = ({"name": "steps", "fn": "rewards.steps:arithmetic_steps"},)
  for key, value in changes.items():
    node, parts = c, key.split(".")
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = value
  return c


CONFIG_CASES = {
    "builtin": ({"algo.process.rewards": ({"name": "c", "fn": "math_exact_match"},)},
                r"^config key 'algo\.process\.rewards\[0\]\.fn': 'math_exact_match' is a reward of whole completions"),
    "unresolvable": ({"algo.process.rewards": ({"name": "c", "fn": "rewards.steps:nope"},)},
                     r"^config key 'algo\.process\.rewards\[0\]\.fn': .*has no attribute 'nope'"),
    "dynamic sampling": ({"train.dynamic_sampling.enabled": True}, r"^config key 'train\.dynamic_sampling\.enabled'"),
    "pairwise prm": ({"algo.process.rewards": ({"name": "rm", "fn": "reward_model",
                                                "kwargs": {"path": "rm", "pairwise": True}},)},
                     r"^config key 'algo\.process\.rewards\[0\]\.kwargs\.pairwise': .*set it False$"),
    "prm without a run": ({"algo.process.rewards": ({"name": "rm", "fn": "reward_model",
                                                     "kwargs": {"path": "no/such/run"}},)},
                          r"^config key 'algo\.process\.rewards\[0\]\.kwargs\.path': .*does not exist"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes_stop_with_one_line(case):
  changes, match = CONFIG_CASES[case]
  with pytest.raises(SystemExit, match=match) as info:
    reward_setup.check_process(_config(**changes), None)
  assert "\n" not in str(info.value)
  with pytest.raises(SystemExit, match=r"^config key 'algo\.advantage\.estimator': 'process' .*algo\.name='grpo'"):
    checks._check_algo(_config(gspo_tpu))
  checks._check_algo(_config())
  assert reward_setup.check_process(_config(), None).startswith("step rewards: 'steps'")


def test_builder_makes_the_step_rewards_only_for_the_process_estimator():
  built = reward_setup.step_rewards(_config())
  assert built.separator == "\n" and [name for name, _ in built.reward_fns] == ["steps"]
  assert reward_setup.step_rewards(grpo_tpu.get_config("runlocal")) is None


def test_builder_serves_a_reward_model_as_step_reward(monkeypatch):
  from rlj import rm_reward
  seen = []
  monkeypatch.setattr(rm_reward, "step_reward_model_fn", lambda path, **kw: seen.append((path, kw)) or (lambda: 0))
  c = _config(**{"algo.process.rewards": ({"name": "prm", "fn": "reward_model", "weight": 2.0,
                                           "kwargs": {"path": "runs/rm", "scalarize": "cvar"}},)})
  built = reward_setup.step_rewards(c)
  assert seen == [("runs/rm", {"scalarize": "cvar"})] and list(built.weights) == [2.0]
