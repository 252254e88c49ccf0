r"""P3O, Pairwise Proximal Policy Optimization (arXiv:2310.00212), joint clip, on GSM8K.

Completions (2j, 2j+1) of each prompt form disjoint pairs; the loss uses the KL-regularised reward
difference (kl_coef 0.05), the joint trajectory ratio clipped to [1/10, 10] and the log-space clip 0.2
(defaults of the first author's code).

Reward normalisation (off by default): ``--config.algo.p3o.reward_norm=diff_std`` divides the pair rewards by the
running std of the reward differences, ``score_std`` by that of the rewards (the authors' code); an adaptive
KL coefficient starting at kl_coef: ``--config.algo.kl_control.target=<nats per token>`` (``configs/common.py``).

Local debug (CPU, 0.4M-parameter model, synthetic arithmetic, 100 SFT steps then 100 P3O steps, KL coefficient
kept at 0.05):
  python -m launch.train --config configs/p3o_tpu.py:runlocal --workdir runs/p3o-local
Pod: as configs/grpo_tpu.py, with this file. Variants: ``runlocal``, ``model=<preset>``, ``slice=<name>``.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = common.rl_base(arg)
  c.algo.name = "p3o"
  c.algo.kwargs = dict(clip_eps=0.2, kl_coef=0.05, ratio_clip=10.0, variant="joint")
  if arg.runlocal:
    common.apply_runlocal(c)
    c.algo.kwargs.kl_coef = 0.05
  return c
