r"""GSPO (arXiv:2507.18071) and CISPO (MiniMax-M1, arXiv:2506.13585): GRPO's job with another policy loss.

Everything but ``algo`` is ``configs/grpo_tpu.py`` (the same variants: ``model=``, ``slice=``, ``runlocal``); the
advantages are GRPO's group-normalised ones. ``algo=`` picks the loss:
  gspo        sequence-level ratio and clip, the paper's clip range (3e-4, 4e-4), no KL term
  gspo_token  GSPO-token: the same ratio value per token (for per-token advantages; equal to gspo otherwise)
  cispo       clipped, stop-gradient token weights (no lower bound, eps_high 0.28), token-mean loss, no KL term

Local (CPU):
  python -m launch.train --config configs/gspo_tpu.py:runlocal --workdir runs/gspo-local
  python -m launch.train --config configs/gspo_tpu.py:runlocal,algo=cispo --workdir runs/cispo-local
Fit on a slice:
  python -m launch.aot --config configs/gspo_tpu.py:model=llama-3.1-8b
"""
from configs import grpo_tpu

LOSSES = {
    "gspo": ("gspo", dict(clip_eps=3e-4, clip_eps_high=4e-4, variant="sequence", kl_coef=0.0, kl_estimator="k3")),
    "gspo_token": ("gspo", dict(clip_eps=3e-4, clip_eps_high=4e-4, variant="token", kl_coef=0.0,
                                kl_estimator="k3")),
    "cispo": ("cispo", dict(clip_eps=1.0, clip_eps_high=0.28, kl_coef=0.0, kl_estimator="k3", agg="token_mean")),
}


def get_config(arg=None):
  rest, algo = [], "gspo"
  for item in (arg or "").split(","):
    key, _, value = item.strip().partition("=")
    if key == "algo":
      algo = value
    elif item.strip():
      rest.append(item.strip())
  if algo not in LOSSES:
    raise ValueError(f"config argument algo={algo!r} is not one of {sorted(LOSSES)}")
  c = grpo_tpu.get_config(",".join(rest) or None)
  name, kwargs = LOSSES[algo]
  c.algo.name = name
  c.algo.kwargs = dict(kwargs)
  return c

