"""``train.dynamic_sampling`` and ``algo.kl_control`` (and ``algo.p3o.reward_norm``) are checked before anything is
built: each mistake stops the launch with one line naming the key and the fix."""
import pytest

from configs import dno_tpu, grpo_tpu, p3o_tpu
from launch import builders, checks

from bad_config_test import _config  # noqa: E402  (tests/launch: runlocal with small data, the changes, locked)


CASES = {
    "dynamic_on_pairs": (p3o_tpu, {"train.dynamic_sampling.enabled": True},
                         r"^config key 'train\.dynamic_sampling\.enabled': algo\.name='p3o' has no group-normalised "
                         r".*set it False, or use one of \['cispo', 'gdpo', 'grpo', 'gspo'\]$"),
    "negative_extra": (grpo_tpu, {"train.dynamic_sampling.max_extra_rollouts": -1},
                       r"^config key 'train\.dynamic_sampling\.max_extra_rollouts': -1; .*int >= 0$"),
    "kl_control_without_kl_term": (dno_tpu, {"algo.kl_control.target": 0.1},
                                   r"^config key 'algo\.kl_control\.target': .*'dno' has no KL term.*set it 0"),
    "kl_control_from_zero": (grpo_tpu, {"algo.kl_control.target": 0.1},   # runlocal GRPO: kl_coef 0
                             r"^config key 'algo\.kwargs\.kl_coef': .*set it > 0, or algo\.kl_control\.target=0$"),
    "kl_target_negative": (grpo_tpu, {"algo.kl_control.target": -0.1}, r"^config key 'algo\.kl_control\.target'"),
    "horizon_too_short": (p3o_tpu, {"algo.kl_control.target": 0.1, "algo.kl_control.horizon": 10.0},
                          r"^config key 'algo\.kl_control\.horizon': 10\.0; .*\(128\).*set it > 25\.6"),
    "p3o_reward_norm": (p3o_tpu, {"algo.p3o.reward_norm": "running"},
                        r"^config key 'algo\.p3o\.reward_norm': 'running'; choose none \| diff_std \| score_std$"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_stops_with_one_line_naming_the_key(case):
  module, changes, match = CASES[case]
  with pytest.raises(SystemExit, match=match) as info:
    checks.validate(_config(module, **changes))
  assert "\n" not in str(info.value)


def test_supported_settings_pass_and_reach_the_loop_config():
  c = _config(grpo_tpu, **{"train.dynamic_sampling.enabled": True, "train.dynamic_sampling.max_extra_rollouts": 2,
                           "algo.kwargs.kl_coef": 0.05, "algo.kl_control.target": 0.02,
                           "algo.kl_control.horizon": 500.0})
  checks.validate(c)
  lc = builders.loop_config(c)
  assert (lc.dynamic_sampling.enabled, lc.dynamic_sampling.max_extra_rollouts) == (True, 2)
  assert (lc.kl_control.enabled, lc.kl_control.target, lc.kl_control.horizon) == (True, 0.02, 500.0)
  c = _config(p3o_tpu, **{"algo.p3o.reward_norm": "diff_std", "algo.kl_control.target": 0.02})
  checks.validate(c)
  assert builders.loop_config(c).algo_settings.options["p3o"] == {"reward_norm": "diff_std"}
  defaults = builders.loop_config(_config(grpo_tpu))
  assert not defaults.dynamic_sampling.enabled and not defaults.kl_control.enabled
