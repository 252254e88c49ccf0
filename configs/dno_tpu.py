r"""DNO-Prct, Direct Nash Optimization (arXiv:2404.03715, Algorithm 2), with a verifier as the preference oracle.

Each iteration (``algo.dno.iteration_steps`` RL steps) samples G completions per prompt from pi_t, scores
them, keeps large-margin pairs (chosen score >= min_chosen_score, margin >= min_margin), trains the
DPO-style loss against pi_t and then makes the policy the next reference. Pairs of the previous two
iterations are replayed at 30% / 15% (paper §3), their reference log-probs recomputed under pi_t.

Local debug (CPU, 0.4M-parameter model, synthetic arithmetic, 100 SFT steps then 100 DNO steps in four
iterations of 25):
  python -m launch.train --config configs/dno_tpu.py:runlocal --workdir runs/dno-local
Pod: as configs/grpo_tpu.py, with this file (iterations of 50 steps). Variants: ``runlocal``, ``model=<preset>``,
``slice=<name>``.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = common.rl_base(arg)
  c.algo.name = "dno"
  c.algo.kwargs = dict(beta=0.1, soft_labels=False)
  c.algo.dno = dict(iteration_steps=50, replay=(0.3, 0.15), min_chosen_score=1.0, min_margin=1.0, max_pairs=4,
                    win_rate=False)
  if arg.runlocal:
    common.apply_runlocal(c)
    c.algo.dno.iteration_steps = 25
    c.optim.learning_rate = 1e-4
  return c
