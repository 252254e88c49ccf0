r"""Distributional (IQN) reward model on HH-RLHF harmless-base pairs, Gemma-2B backbone, TPU v5p-32.

  q(x, tau) = IQNHead(psi(x), tau)      quantiles of the reward at fractions tau (cosine embedding
                                        cos(pi i tau), i = 1..num_cosines, Hadamard with psi, MLP)
  loss = -log P(chosen > rejected),  P = mean_{i,j} sigmoid((q_w(tau_i) - q_l(tau_j)) / temperature)
                                        (rewards.quantile.pairwise_loss; one quantile reduces to BT)

Same job, data, run folder and checkpoint format as ``configs/rm_bt.py`` (see its runbook); only the head and
the loss differ. Training draws sorted uniform taus per pair (``loss.tau_sampling=uniform``); evaluation and
RL serving use the midpoint grid of ``loss.num_taus``. Held-out accuracy counts P > 1/2 (hard preference
from the quantiles); ``eval/mean_accuracy`` counts wins of the quantile means. The RL trainer scores with
``rlj.rm_reward.reward_model_fn(<workdir>, scalarize="mean" | "cvar" | "lower_quantile", alpha=...)``.

Local run (CPU, synthetic pairs with a known scorer, 400 steps, about 3 minutes; held-out accuracy on 512 pairs
0.906 on an earlier version, chance 0.5; README):
  python -m launch.train --config configs/rm_iqn.py:runlocal --workdir runs/rm-iqn-local

Pod, every worker:
  python -m launch.train --config configs/rm_iqn.py \
    --config.init.path=$CKPT/gemma-2b --config.tokenizer.path=$CKPT/gemma-2b/tokenizer.model \
    --config.data.source_dir=$DATA/hh-rlhf-harmless-base --config.data.data_dir=$DATA/tfds \
    --workdir $RUNS/rm-iqn-gemma2b

Variants: ``model=<preset>`` (``python -m launch.train --help`` lists the presets), ``slice=<name>`` (label only),
``runlocal``. IQN keys: ``head.num_cosines``,
``head.monotone`` (none | sort | cumsoftplus), ``loss.num_taus``, ``loss.temperature``,
``loss.mean_anchor_coef`` (ties the quantile mean to a BT reward), ``loss.crossing_coef``.
"""
from configs import common, rm_bt


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = rm_bt.rm_base(arg, kind="iqn")
  c.head.monotone = "cumsoftplus"
  c.loss.tau_sampling = "uniform"
  c.loss.mean_anchor_coef = 0.1
  if arg.runlocal:
    rm_bt.apply_runlocal(c)
    c.head.num_cosines = 16
    c.loss.num_taus = 8
  return c
