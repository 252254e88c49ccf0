"""A reward spec's ``par`` section (Preference As Reward, rewards/par.py) is checked before anything is built: each
mistake stops the launch with one line naming the key and the fix; a good one reaches ``--show``'s lines."""
import pytest

from configs import grpo_tpu
from launch import checks, reward_setup
from rewards import combine, par

from bad_config_test import _config  # noqa: E402  (tests/launch: runlocal with small data, the changes, locked)


def _rewards(*pars):
  names = ("correct", "format")
  fns = ("math_exact_match", "format")
  return {"rewards": tuple({"name": names[i], "fn": fns[i], "par": p} for i, p in enumerate(pars))}


CASES = {   # runlocal GRPO: kl_coef 0, so no reference is kept
    "not_a_dict": (_rewards(5), r"^config key 'rewards\[0\]\.par': 5; give a dict with num_refs, decode, source"),
    "unknown_key": (_rewards({"refs": 2}), r"^config key 'rewards\[0\]\.par\.refs': unknown key; a par section takes "
                                           r"num_refs, decode, source$"),
    "bad_decode": (_rewards({"decode": "beam"}), r"^config key 'rewards\[0\]\.par\.decode': 'beam'; choose greedy"),
    "greedy_many": (_rewards({"num_refs": 3, "source": "policy"}),
                    r"^config key 'rewards\[0\]\.par\.num_refs': 3 greedy references would all be the same "),
    "bad_source": (_rewards({"source": "sft"}), r"^config key 'rewards\[0\]\.par\.source': 'sft'; choose reference"),
    "no_reference_kept": (_rewards({}), r"^config key 'rewards\[0\]\.par\.source': 'reference' draws the references "
                                        r"from the frozen initial policy, and this run keeps none .*"
                                        r"or par\.source='policy'"),
    "more_refs_than_samples": (_rewards({"num_refs": 9, "decode": "sample", "source": "policy"}),
                               r"^config key 'rewards\[0\]\.par\.num_refs': 9 sampled .*num_generations=8.*<= 8$"),
    "settings_differ": (_rewards({"source": "policy"}, {"num_refs": 2, "decode": "sample", "source": "policy"}),
                        r"^config key 'rewards\[1\]\.par': .* differs from rewards\[0\]\.par: .*same num_refs, "
                        r"decode and source$"),
    "eval_reward": ({"eval.rewards": ({"name": "c", "fn": "math_exact_match", "par": {}},)},
                    r"^config key 'eval\.rewards\[0\]\.par': PAR scores the RL rollout's rewards .*drop par here$"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_stops_with_one_line_naming_the_key(case):
  changes, match = CASES[case]
  with pytest.raises(SystemExit, match=match) as info:
    checks.validate(_config(grpo_tpu, **changes))
  assert "\n" not in str(info.value)


def test_good_settings_pass_and_build_wrapped_rewards():
  lines = checks.validate(_config(grpo_tpu, **_rewards({"source": "policy"})))
  assert "PAR references: the greedy completion of the policy when the prompt is first seen, once per prompt" in lines
  c = _config(grpo_tpu, **{"algo.kwargs.kl_coef": 0.04}, **_rewards({}, {}))   # a reference is kept
  assert "PAR references: the greedy completion of the frozen initial policy, once per prompt" in checks.validate(c)
  fns = combine.build(reward_setup.reward_specs(c))
  assert [type(fn) for _, fn in fns] == [par.ParReward, par.ParReward]
  assert fns[0][1].settings == par.ParSettings()
