r"""P3O, Pairwise Proximal Policy Optimization (arXiv:2310.00212), joint clip, on GSM8K.

Completions (2j, 2j+1) of each prompt form disjoint pairs; the loss uses the KL-regularised reward
difference (kl_coef 0.05), the joint trajectory ratio clipped to [1/10, 10] and the log-space clip 0.2
(defaults of the first author's code).

Local debug (CPU): python -m launch.train --config configs/p3o_tpu.py:runlocal --workdir runs/p3o-local
Pod: as configs/grpo_tpu.py, with this file.
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
