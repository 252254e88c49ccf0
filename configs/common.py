"""Shared config pieces: ``parse_arg`` for ``--config file.py:key=value,flag`` and the default mesh rules."""
from __future__ import annotations

import ml_collections as mlc

# Logical axis -> mesh axes; configs may override ``c.sharding_rules``. The same rules as
# ``rlj.sharding.DEFAULT_RULES`` (a test keeps the two equal): written out here so that loading a config imports
# ml_collections alone, not jax and flax.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("quantiles", None),
)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def describe(defaults: dict) -> str:
  """``runlocal, model=<str>, ...``: the variant keys of a config, as ``--config file.py:<variants>`` takes them."""
  return ", ".join(k if isinstance(v, bool) else f"{k}=<{type(v).__name__}>" for k, v in defaults.items())


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed by ``defaults``.

  A bare word sets a boolean default to True (``runlocal``). An unknown key or a value that does not parse as its
  default's type raises ValueError with a one-line message that lists the choices (the launcher,
  ``launch.cli_help.check_config_arg``, adds the config file and a suggestion, and checks ``model=`` against the
  presets: configs import ml_collections alone, not the models).
  """
  out = mlc.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = (part.strip() for part in item.partition("="))
    if key not in defaults:
      raise ValueError(f"unknown variant {key!r}; this config's variants are {describe(defaults)}")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"variant {key!r} needs a value: {key}=<{type(default).__name__}>")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"variant {key}={value!r} is not a boolean; write {key} (or {key}=true / {key}=false)")
      out[key] = value.lower() in _TRUE
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"variant {key}={value!r} is not a {type(default).__name__}") from None
  return out


def optim(*, learning_rate: float, warmup_steps: int = 0, decay_steps: int = 0, weight_decay: float = 0.0,
          clip_norm: float = 1.0) -> dict:
  """A config ``optim`` section (the fields of ``rlj.train_state.OptimConfig``)."""
  return dict(learning_rate=learning_rate, warmup_steps=warmup_steps, decay_steps=decay_steps, end_lr_factor=0.1,
              weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-8, clip_norm=clip_norm)


def rules_list(rules=DEFAULT_RULES) -> list:
  return [(name, axes) for name, axes in rules]


# Model used by every runlocal variant: small enough for 2 CPU cores, big enough to learn the synthetic task.
LOCAL_MODEL = dict(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)

MATH_REWARDS = ({"name": "correct", "fn": "math_exact_match", "weight": 1.0},)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_section() -> dict:
  """A config ``model.lora`` section: off (rank 0) by default."""
  return dict(rank=0, alpha=32.0, targets=LORA_TARGETS, dropout=0.0, base_dtype="")


def tokenizer_section() -> dict:
  """A config ``tokenizer`` section. ``kind``: auto (``path``'s tokenizer.json, else its tokenizer.model) | hf |
  sentencepiece | train_synthetic (trained on the synthetic task at start-up); ``path`` "" means ``init.path``;
  ``pad_id`` -1: the checkpoint's own (or its fallback); ``chat_template``: the name of one of several named
  templates ("" for the default)."""
  return dict(kind="auto", path="", pad_id=-1, chat_template="", vocab_size=0, train_records=0)


def prompt_section(user_template: str) -> dict:
  """The prompt keys of a config ``data`` section. ``format``: plain (``user_template`` alone) | chat (the
  checkpoint's chat template around it); ``system_prompt``: chat only; ``user_template``: a str.format template
  with a {prompt} slot (``\\n`` typed on a command line is a newline)."""
  return dict(format="plain", user_template=user_template, system_prompt="")


def rl_base(arg: mlc.ConfigDict) -> mlc.ConfigDict:
  """Every key of an RL job with the pod defaults; ``apply_runlocal`` shrinks it to one CPU."""
  c = mlc.ConfigDict()
  c.job = "rl"
  c.seed = 0
  c.hardware = "tpu"
  c.hardware_note = f"{arg.model} on a {arg.slice} slice"
  c.slice = arg.slice                                       # TPU slice the job is sized for (launch.aot)
  c.mesh = [("data", 1), ("fsdp", -1), ("tensor", 1)]
  c.sharding_rules = rules_list()
  # model.lora: LoRA adapters (Hu et al., arXiv:2106.09685; rlj/lora_policy.py). rank 0: full fine-tuning; rank > 0
  # trains only adapters W0 + (alpha / rank) B A on the targeted projections (q k v o gate up down) of the frozen
  # base, which is also the reference; base_dtype "" keeps the model's param dtype, "bfloat16" halves the base.
  c.model = dict(preset=arg.model, vocab_from_tokenizer=False,
                 overrides=dict(param_dtype="float32", dtype="bfloat16", remat=True, attention="auto"),
                 lora=lora_section())
  c.init = dict(policy="hf", path="")                       # scratch | hf | rlj | sft
  c.tokenizer = tokenizer_section()
  c.data = dict(source="gsm8k", source_dir="", data_dir="", train_split="train", eval_split="test",
                buckets=(256,), add_bos=True, overflow="truncate", num_workers=0, seed=0, levels=(1,),
                train_records=0, eval_records=0, **prompt_section("Question: {prompt}\nAnswer:"))
  c.sampler = dict(num_generations=8, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, batch_buckets=(),
                   dtype="bfloat16", keep_cache=True, cache_phases=None, stop_tokens=(), rounds=1, chunks=1)
  # sampler.rounds: decode the rollout in this many rounds; rows that stopped leave the batch between rounds
  # (rlj/sampler_rounds.py; one process; 1: one decode loop until the longest row stops).
  # sampler.chunks: sample a step's prompts in this many sequential calls of batch_prompts / chunks prompts (one
  # compiled program; the KV cache and sampler temporaries are one call's; rlj/sampler_chunks.py). launch.aot sizes it.
  c.rewards = MATH_REWARDS + ({"name": "format", "fn": "format", "weight": 0.1},)
  # kl_control: the adaptive KL coefficient of Ziegler et al. (arXiv:1909.08593, Sec. 2.2; rlj/kl_controller.py):
  # with target > 0 (KL in nats per token, the objective's `kl` metric) beta starts at kwargs.kl_coef (> 0) and
  # after every step becomes beta * (1 + clip(kl / target - 1, -0.2, 0.2) * completions per step / horizon);
  # target 0: off, kl_coef stays fixed. p3o.reward_norm: none | diff_std (divide the rewards by the running std
  # of the pairs' reward differences) | score_std (by the running std of the rewards, the P3O authors' code).
  # advantage.estimator: grpo | rloo | process (GRPO only: process supervision, DeepSeekMath arXiv:2402.03300
  # Sec. 4.1.3; rewards/steps.py): each completion is split into steps after every run of process.separator, the
  # process.rewards (specs as in c.rewards; each function returns one reward per step) score the steps, the step
  # rewards are normalised over all steps of the group and a token's advantage is the sum of those of the steps
  # that end at or after it (algorithms/process.py). c.rewards are then logged, not trained on.
  c.algo = dict(name="grpo", kwargs=dict(clip_eps=0.2, kl_coef=0.04, agg="token_mean", kl_estimator="k3_ratio"),
                advantage=dict(scale="group", eps=1e-4, ddof=1, estimator="grpo", win_rate=False),
                dno=dict(iteration_steps=1, replay=(), min_chosen_score=1.0, min_margin=1.0, max_pairs=4,
                         win_rate=False),
                kl_control=dict(target=0.0, horizon=10000.0),
                p3o=dict(reward_norm="none"),
                process=dict(separator="\n", rewards=()))
  # old_logp: auto (one epoch of one minibatch: on-policy, the current log-probs under stop-gradient, no extra
  # pass; otherwise recompute) | recompute (the trainer's pass over the rollout) | sampler (the sampler's own).
  # mismatch_*: the sampler-trainer log-prob gap (algorithms/mismatch.py). Its mismatch/* metrics come with every
  # trainer pass, and every mismatch_check_every steps (0: never) otherwise; mismatch_correction: none |
  # token_truncate | token_mask | sequence_truncate | sequence_mask weighs the policy gradient by
  # pi_trainer / pi_sampler (truncated at mismatch_high, or 0 outside [mismatch_low, mismatch_high]).
  # dynamic_sampling: DAPO's dynamic sampling (arXiv:2503.14476, Sec. 3.2; rlj/dynamic_sampling.py; group-normalised
  # algorithms only): groups whose rewards are all equal are dropped and the next prompt batches are rolled out
  # until batch_prompts groups have distinct rewards, at most max_extra_rollouts more rollouts per step; short of
  # that, the step trains on the groups it has and masks the rest (metric dynamic_sampling/bound_hit, a warning).
  # logp_microbatches: row chunks of the rollout log-prob pass (0: one per optimizer micro-batch); logits_chunk:
  # completion tokens projected to logits at a time in the log-prob passes and the loss (0: all; rlj/logprobs.py).
  # packing: the log-prob passes and the updates run on the rows' real tokens packed into fewer rows (segment ids,
  # per-segment positions; rlj/packing.py), not on their padding; same log-probs, loss and gradients.
  # sample_ahead: the next step's rollout is sampled, by the policy before this step's update, while the host scores
  # this one (rlj/sample_ahead.py): rewards overlap the device's work, each rollout is one update old (old_logp auto
  # then takes the sampler's log-probs).
  # mask_truncated: DAPO's overlong filtering (arXiv:2503.14476, Sec. 3.4): completions cut at max_new_tokens
  # without a stop token keep their rewards in the group's advantages but none of their tokens in the loss.
  c.train = dict(total_steps=1000, batch_prompts=64, num_epochs=1, num_minibatches=4, num_microbatches=1,
                 logp_microbatches=0, logits_chunk=0, packing=False, sample_ahead=False, mask_truncated=False,
                 old_logp="auto",
                 mismatch_check_every=0,
                 mismatch_correction="none", mismatch_low=0.5, mismatch_high=2.0, eval_every=100, ckpt_every=50, ckpt_every_minutes=30.0,
                 keep_checkpoints=3, max_consecutive_skips=10,
                 dynamic_sampling=dict(enabled=False, max_extra_rollouts=4))
  c.optim = optim(learning_rate=1e-6, warmup_steps=20)
  c.sft = dict(steps=0, batch_prompts=64, eval_every=0, optim=optim(learning_rate=1e-5, warmup_steps=20))
  c.eval = dict(num_prompts=256, batch_prompts=64, sampled=False, rewards=MATH_REWARDS)
  return c


def local_machine(c: mlc.ConfigDict) -> None:
  """Any device count on one host, data parallel only, the LOCAL_MODEL in float32 sized to the tokenizer."""
  c.hardware = "any"
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.model.preset = "tiny"
  c.model.vocab_from_tokenizer = True
  c.model.overrides = dict(LOCAL_MODEL, param_dtype="float32", dtype="float32", remat=False, attention="auto")


def apply_local_hf(c: mlc.ConfigDict, path: str) -> mlc.ConfigDict:
  """A runlocal RL job on a small Hugging Face checkpoint folder ``path`` (config.json, safetensors, tokenizer
  files): GSM8K prompts (``data.source_dir``) in the checkpoint's chat template, an SFT stage on the reference
  answers, then RL; the model keeps the checkpoint's shape, in float32."""
  c.init.policy = "hf"
  c.init.path = path
  c.tokenizer.kind = "auto"
  c.model.overrides = dict(param_dtype="float32", dtype="float32", remat=False, attention="auto")
  c.data.source = "gsm8k"
  c.data.format = "chat"
  c.data.user_template = "{prompt}\nEnd with the final answer after ####."
  c.data.buckets = (256,)
  c.sampler.max_new_tokens = 64
  c.sft.steps = 20
  c.sft.batch_prompts = 8
  c.sft.eval_every = 0
  c.train.total_steps = 20
  c.train.batch_prompts = 4
  c.train.eval_every = 10
  c.train.ckpt_every = 10
  c.eval.num_prompts = 16
  c.eval.batch_prompts = 16
  return c


def apply_runlocal(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """One CPU, a ~0.5M-parameter model, the synthetic arithmetic task, SFT cold start then RL."""
  local_machine(c)
  c.init.policy = "sft"
  c.tokenizer.kind = "train_synthetic"
  c.tokenizer.vocab_size = 96
  c.tokenizer.train_records = 2000
  c.data.source = "synthetic"
  c.data.user_template = "{prompt}\n"
  c.data.buckets = (32,)
  c.data.levels = (1,)
  c.data.train_records = 20000
  c.data.eval_records = 256
  c.data.add_bos = True
  c.sampler.max_new_tokens = 16
  c.sampler.dtype = "float32"
  c.sampler.num_generations = 8
  c.sampler.keep_cache = True
  c.rewards = MATH_REWARDS
  if "kl_coef" in c.algo.kwargs and c.algo.name in ("grpo", "gdpo"):
    c.algo.kwargs.kl_coef = 0.0  # no reference pass on one CPU; P3O keeps its KL-regularised difference
  c.train.total_steps = 100
  c.train.batch_prompts = 16
  c.train.num_minibatches = 2
  c.train.old_logp = "sampler"
  c.train.eval_every = 20
  c.train.ckpt_every = 20
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 5
  c.sft.steps = 100
  c.sft.batch_prompts = 32
  c.sft.eval_every = 50
  c.sft.optim.learning_rate = 3e-3
  c.eval.num_prompts = 256
  c.eval.batch_prompts = 64
  return c
