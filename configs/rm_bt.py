r"""Bradley-Terry reward model on HH-RLHF harmless-base preference pairs, Gemma-2B backbone, TPU v5p-32.

  loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))      (rewards.bradley_terry.loss)

The reward is a linear head on the backbone's final-normed hidden state at the last real token (the
response's EOS), see ``models.reward_model``. The default variant loads the backbone from a Hugging Face
checkpoint (float32 params, bfloat16 compute, remat), shards it over every chip (fsdp=-1) and trains on the
HH-RLHF ``test.jsonl.gz`` file, whose last ``data.eval_records`` records (by line number) are held out;
the rest is training data. Held-out strict accuracy (ties are wrong) is logged every ``train.eval_every``
steps and printed at the end as ``held-out accuracy: X``.

The run folder holds ``checkpoints/`` (orbax; the meta of every step records the reward model's
architecture, head, number of taus and tokenizer), ``tokenizer.model``, ``metrics.jsonl``, TensorBoard
events and ``curves.png``. The RL trainer loads it with ``rlj.rm_reward.reward_model_fn(<workdir>)``.

Local run (CPU, 0.41M-param model from scratch, synthetic "name a number close to T" pairs whose ground-truth
scorer is ``rlj.data.synthetic.number_score``, 64-piece tokenizer trained at start-up, 400 steps of 64 pairs;
about 3-4 minutes on 2 busy CPU cores; held-out accuracy on 512 pairs 0.898 on 2026-12-07, chance 0.5; README):
  python -m launch.train --config configs/rm_bt.py:runlocal --workdir runs/rm-bt-local

Local run on the HH-RLHF file instead (tiny model from scratch; accuracy stays near chance, a smoke test):
  python -m launch.train --config configs/rm_bt.py:runlocal --workdir runs/rm-bt-hh \
    --config.data.source=hh_rlhf --config.data.source_dir=$DATA/hh-rlhf-harmless-base \
    --config.tokenizer.kind=train_data --config.tokenizer.vocab_size=512 --config.data.buckets='(256,)'

Pod, every worker (see README "TPU pods"):
  python -m launch.train --config configs/rm_bt.py \
    --config.init.path=$CKPT/gemma-2b --config.tokenizer.path=$CKPT/gemma-2b/tokenizer.model \
    --config.data.source_dir=$DATA/hh-rlhf-harmless-base --config.data.data_dir=$DATA/tfds \
    --workdir $RUNS/rm-bt-gemma2b

Variants: ``model=<preset>`` (a name of ``models.presets``; ``python -m launch.train --help`` lists them),
``slice=<name>`` (label only), ``runlocal``. Keys: ``init.backbone`` = hf | rlj (a policy / SFT run's
``checkpoints`` dir) | scratch; ``data.source`` = synthetic | hh_rlhf | generic (JSONL with prompt / chosen /
rejected); ``data.eval_split`` names a separate held-out split (empty: hold out the tail of ``data.split``);
``loss.center_coef`` adds the reward-centring term.
"""
import ml_collections as mlc

from configs import common


def rm_base(arg: mlc.ConfigDict, *, kind: str) -> mlc.ConfigDict:
  """Every key of a reward-model job with the pod defaults; ``apply_runlocal`` shrinks it to one CPU."""
  c = mlc.ConfigDict()
  c.job = "rm"
  c.seed = 0
  c.hardware = "tpu"
  c.hardware_note = f"{arg.model} reward model on a {arg.slice} slice"
  c.mesh = [("data", 1), ("fsdp", -1), ("tensor", 1)]
  c.sharding_rules = common.rules_list()
  c.model = dict(preset=arg.model, vocab_from_tokenizer=False,
                 overrides=dict(param_dtype="float32", dtype="bfloat16", remat=True, attention="auto"))
  c.init = dict(backbone="hf", path="")                      # scratch | hf | rlj
  c.head = dict(kind=kind, num_cosines=64, hidden_dim=0, monotone="none")   # hidden_dim 0: the backbone's D
  c.tokenizer = common.tokenizer_section()    # kind: auto | hf | sentencepiece | train_synthetic | train_data
  c.data = dict(source="hh_rlhf", source_dir="", data_dir="", split="test", eval_split="", eval_records=256,
                train_records=0, buckets=(512,), add_bos=True, overflow="truncate", num_workers=0, seed=0,
                max_target=100, **common.prompt_section("{prompt}"))
  c.loss = dict(num_taus=32, tau_sampling="midpoint", center_coef=0.0, temperature=1.0, mean_anchor_coef=0.0,
                crossing_coef=0.0)
  c.train = dict(total_steps=2000, batch_size=64, eval_every=200, eval_batch_size=64, log_every=10,
                 ckpt_every=500, ckpt_every_minutes=30.0, keep_checkpoints=2, max_consecutive_skips=10)
  c.optim = common.optim(learning_rate=1e-5, warmup_steps=50, decay_steps=1950)
  return c


def apply_runlocal(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """One CPU, a small model from scratch, synthetic preference pairs and a tokenizer trained on them."""
  common.local_machine(c)
  c.init.backbone = "scratch"
  c.tokenizer.kind = "train_synthetic"
  c.tokenizer.vocab_size = 64
  c.tokenizer.train_records = 2000
  c.data.source = "synthetic"
  c.data.train_records = 20000
  c.data.eval_records = 512
  c.data.buckets = (24,)
  c.train.total_steps = 400
  c.train.batch_size = 64
  c.train.eval_every = 100
  c.train.eval_batch_size = 128
  c.train.log_every = 20
  c.train.ckpt_every = 100
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 380
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="gemma-2b", slice="v5p-32")
  c = rm_base(arg, kind="bt")
  if arg.runlocal:
    apply_runlocal(c)
  return c
