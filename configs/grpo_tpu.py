r"""GRPO (DeepSeekMath, arXiv:2402.03300) on GSM8K with a Gemma-2B policy on a TPU v5p-32 slice.

The default variant is a pod job: Gemma-2B (float32 params, bfloat16 compute, remat), fully sharded over 16
chips (mesh fsdp=-1), 512 new tokens, k3_ratio KL at 0.04, token-mean loss. Per-model pod settings (``POD``:
the slice, prompts per host and step, minibatches, micro-batches) are the ones ``launch.aot`` shows to fit:
  python -m launch.aot --config configs/grpo_tpu.py                              # gemma-2b on v5p-32
  python -m launch.aot --config configs/grpo_tpu.py:model=llama-3.1-8b           # on v5p-64

Local debug (CPU, 0.4M-parameter model, synthetic arithmetic, 100 SFT steps then 100 GRPO steps, about a minute):
  python -m launch.train --config configs/grpo_tpu.py:runlocal --workdir runs/grpo-local

Pod, every worker (see README "TPU pods"):
  python -m launch.train --config configs/grpo_tpu.py \
    --config.init.path=$CKPT/gemma-2b --config.tokenizer.path=$CKPT/gemma-2b/tokenizer.model \
    --config.data.source_dir=$DATA/gsm8k --config.data.data_dir=$DATA/tfds --workdir $RUNS/grpo-gemma2b

Local run from a small Hugging Face checkpoint folder (CPU, its chat template, GSM8K; README "Bring your own
checkpoint"):
  python -m launch.train --config configs/grpo_tpu.py:runlocal,hf=runs/tiny-llama \
    --config.data.source_dir=../shared/data/gsm8k --workdir runs/grpo-tiny-llama

Variants (``VARIANTS``; ``python -m launch.train --help`` lists them and the model presets): ``model=<preset>``
(a name of ``models.presets``), ``slice=<name>`` (the TPU slice the job is sized for; default: the model's in
``POD``, else v5p-32), ``runlocal``, ``runlocal,hf=<dir>``. Overrides: ``--config.algo.kwargs.clip_eps_high=0.28``
(DAPO clip-higher), ``--config.algo.advantage.scale=none --config.algo.kwargs.agg=dr_grpo`` (Dr. GRPO),
``--config.train.dynamic_sampling.enabled=True`` (DAPO dynamic sampling; ``max_extra_rollouts`` bounds the extra
rollouts per step), ``--config.algo.kwargs.kl_coef=0.04 --config.algo.kl_control.target=0.06`` (adaptive KL
coefficient; ``algo.kl_control.horizon``); see ``configs/common.py:rl_base``. Long rollouts (README "Long
rollouts"): ``--config.train.logits_chunk=512``, ``--config.train.num_microbatches``, ``--config.sampler.chunks``;
``python -m launch.aot ... --suggest`` finds the settings that fit a slice.
``--show`` prints every key of the resolved config.
"""
from configs import common


# Model -> slice and batch settings that fit its chips' HBM (checked with launch.aot; batch_prompts is per host).
# The rollout's log-prob passes run on the whole rollout at once, so prompts per host bound the peak.
POD = {
    "gemma-2b": dict(slice="v5p-32", batch_prompts=8, num_minibatches=4, num_microbatches=1),
    "llama-3.1-8b": dict(slice="v5p-64", batch_prompts=8, num_minibatches=4, num_microbatches=1),
}


# ``--config grpo_tpu.py:<variants>``: runlocal, model=<preset>, slice=<TPU slice>, hf=<checkpoint folder>.
VARIANTS = dict(runlocal=False, model="gemma-2b", slice="", hf="")


def get_config(arg=None):
  arg = common.parse_arg(arg, **VARIANTS)
  pod = POD.get(arg.model, {})
  arg.slice = arg.slice or pod.get("slice", "v5p-32")
  c = common.rl_base(arg)
  c.algo.kwargs.clip_eps_high = c.algo.kwargs.clip_eps   # a key of its own, so that DAPO's 0.28 is one override
  for key in ("batch_prompts", "num_minibatches", "num_microbatches"):
    if key in pod:
      c.train[key] = pod[key]
  if arg.runlocal:
    common.apply_runlocal(c)
    if arg.hf:
      common.apply_local_hf(c, arg.hf)
  return c
