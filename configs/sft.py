r"""Supervised cold start: teacher-forced NLL of reference answers (GSM8K on a pod, synthetic arithmetic locally).

The checkpoint it writes (``<workdir>/checkpoints``) is loaded by the RL jobs with
``--config.init.policy=rlj --config.init.path=<workdir>/checkpoints`` (and, after a local run, its tokenizer:
``--config.tokenizer.kind=sentencepiece --config.tokenizer.path=<workdir>/tokenizer.model``). The runlocal RL
configs run this stage themselves (``init.policy=sft``) in ``<workdir>/sft``.

Pod: 2000 steps from ``init.path`` (a Hugging Face checkpoint) on GSM8K (``data.source_dir``).
Local (CPU, a 0.4M-parameter model from scratch, synthetic arithmetic, 300 steps):
  python -m launch.train --config configs/sft.py:runlocal --workdir runs/sft-local
Variants: ``runlocal``, ``model=<preset>``, ``slice=<name>``.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = common.rl_base(arg)
  c.job = "sft"
  c.sft.steps = 2000
  c.sft.eval_every = 500
  if arg.runlocal:
    common.apply_runlocal(c)
    c.init.policy = "scratch"
    c.sft.steps = 300
  return c
