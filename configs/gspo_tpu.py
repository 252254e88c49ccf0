r"""GSPO (arXiv:2507.18071) and CISPO (MiniMax-M1, arXiv:2506.13585): GRPO's job with another policy loss.

Everything but ``algo`` is ``configs/grpo_tpu.py`` (the same variants: ``model=``, ``slice=``, ``runlocal``,
``hf=``); the advantages are GRPO's group-normalised ones. ``algo=`` picks the loss (default gspo):
  gspo        sequence-level ratio and clip, the paper's clip range (3e-4, 4e-4), no KL term
  gspo_token  GSPO-token: the same ratio value per token (for per-token advantages; equal to gspo otherwise)
  cispo       clipped, stop-gradient token weights (no lower bound, eps_high 0.28), token-mean loss, no KL term

Local (CPU, as grpo_tpu.py's runlocal: 100 SFT steps, then 100 RL steps with this loss):
  python -m launch.train --config configs/gspo_tpu.py:runlocal --workdir runs/gspo-local
  python -m launch.train --config configs/gspo_tpu.py:runlocal,algo=cispo --workdir runs/cispo-local
Fit on a slice:
  python -m launch.aot --config configs/gspo_tpu.py:model=llama-3.1-8b
"""
from configs import common, grpo_tpu

LOSSES = {
    "gspo": ("gspo", dict(clip_eps=3e-4, clip_eps_high=4e-4, variant="sequence", kl_coef=0.0, kl_estimator="k3")),
    "gspo_token": ("gspo", dict(clip_eps=3e-4, clip_eps_high=4e-4, variant="token", kl_coef=0.0,
                                kl_estimator="k3")),
    "cispo": ("cispo", dict(clip_eps=1.0, clip_eps_high=0.28, kl_coef=0.0, kl_estimator="k3", agg="token_mean")),
}


def get_config(arg=None):
  algo = common.parse_arg(arg, algo="gspo", **grpo_tpu.VARIANTS).algo   # every variant checked here
  if algo not in LOSSES:
    raise ValueError(f"variant algo={algo!r} is not one of {', '.join(sorted(LOSSES))}")
  rest = [item for item in (arg or "").split(",") if item.partition("=")[0].strip() not in ("", "algo")]
  c = grpo_tpu.get_config(",".join(rest) or None)
  name, kwargs = LOSSES[algo]
  c.algo.name = name
  c.algo.kwargs = dict(kwargs)
  return c
