r"""GRPO (DeepSeekMath, arXiv:2402.03300) on GSM8K with a Gemma-2B policy on a TPU v5p-32 slice.

The default variant is a pod job: Gemma-2B (float32 params, bfloat16 compute, remat), fully sharded over 16
chips (mesh fsdp=-1), 64 prompts x 8 completions per step, 512 new tokens, k3_ratio KL at 0.04, token-mean loss.

Local debug (CPU, ~0.5M-param model, synthetic arithmetic, SFT cold start then 40 GRPO steps, ~5 min):
  python -m launch.train --config configs/grpo_tpu.py:runlocal --workdir runs/grpo-local

Pod, every worker (see README "TPU pods"):
  python -m launch.train --config configs/grpo_tpu.py \
    --config.init.path=$CKPT/gemma-2b --config.tokenizer.path=$CKPT/gemma-2b/tokenizer.model \
    --config.data.source_dir=$DATA/gsm8k --config.data.data_dir=$DATA/tfds --workdir $RUNS/grpo-gemma2b

Variants: ``model=<preset>`` (gemma-2b, llama-3.1-8b, qwen2.5-0.5b, qwen2.5-7b), ``slice=<name>`` (label only),
``runlocal``. Overrides: ``--config.algo.kwargs.clip_eps_high=0.28`` (DAPO clip-higher),
``--config.algo.advantage.scale=none --config.algo.kwargs.agg=dr_grpo`` (Dr. GRPO).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = common.rl_base(arg)
  if arg.runlocal:
    common.apply_runlocal(c)
  return c
