r"""GDPO (arXiv:2601.05242): GRPO with per-reward group normalisation, on GSM8K with two rewards.

Rewards: exact-match correctness (weight 1) and the GSM8K answer format (weight 0.5). GDPO normalises each
within its group, sums with the weights, then whitens over the global batch; the metrics ``adv/distinct``
and ``adv/distinct_grpo_sum`` count distinct advantage values of GDPO and of GRPO on the summed reward for
the same rollout (GDPO's advantage resolution).

Local debug (CPU, 0.4M-parameter model, synthetic arithmetic, 100 SFT steps then 100 GDPO steps):
  python -m launch.train --config configs/gdpo_tpu.py:runlocal --workdir runs/gdpo-local
Pod: as configs/grpo_tpu.py, with this file. Variants: ``runlocal``, ``model=<preset>``, ``slice=<name>``.
"""
from configs import common

REWARDS = common.MATH_REWARDS + ({"name": "format", "fn": "format", "weight": 0.5},)


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = common.rl_base(arg)
  c.algo.name = "gdpo"
  c.rewards = REWARDS
  if arg.runlocal:
    common.apply_runlocal(c)
    c.rewards = REWARDS
  return c
