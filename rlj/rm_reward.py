"""A trained reward model served as an RL reward function, rebuilt from its run folder alone.

A reward-model run (``launch/rm.py``) leaves ``<workdir>/checkpoints`` (orbax; the meta of every step holds a
``reward_model`` record: backbone ``ModelConfig``, head kind and options, number of taus, tokenizer file)
and ``<workdir>/tokenizer.model``. ``load_reward_model`` rebuilds the ``RewardModel`` from that record and
restores the newest params; ``reward_model_fn`` wraps it as a reward function with the signature of
``rewards.combine`` (``fn(prompts, completions, **kwargs) -> [N]``) that scores the sampler's token rows

  r = RM(tokens, attn_mask)                                   Bradley-Terry: one scalar per row
  r = scalarize(q(tokens, attn_mask; tau_1..tau_Q))           IQN: quantiles on the midpoint grid, then
                                                              mean | cvar | lower_quantile at level alpha

with the jitted scorer of ``rlj.reward_scoring`` (compiled once per row shape). With ``pairwise=True`` the reward
is each completion's Pref-GRPO win rate against the other completions of its prompt (arXiv:2508.20751):

  P(j > j') = sigmoid(r_j - r_j')                             Bradley-Terry
  P(j > j') = P(Z_j > Z_j') on the quantiles, or QD verdicts  IQN (``method`` "preference" | "qd")
  r_j       = (1 / (G - 1)) sum_{j' != j} P(j > j')           ``algorithms.winrate.win_rates``

(``rlj.reward_scoring.win_rate_rewards``); the loop passes the group size G as ``group_size``. The rows must be token ids
of the reward model's own tokenizer: the policy and the reward model share it (compare
``meta["tokenizer_path"]`` with the policy's), and ids outside the reward model's vocabulary raise.

Usage:
  fn = rm_reward.reward_model_fn(rm_workdir, scalarize="cvar", alpha=0.25)
  r = fn(prompts, completions, tokens=rollout_tokens, attn_mask=rollout_attn_mask)      # np.ndarray [N]
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from models.config import ModelConfig
from models.reward_model import RewardModel
from algorithms import winrate
from rewards import quantile
from rlj import checkpoint, reward_scoring, sharding

# Reward-function scalarisations of IQN quantiles -> rewards.quantile.scalarize kinds.
SCALARIZE = {"mean": "mean", "cvar": "cvar", "lower_quantile": "quantile"}


def checkpoint_dir(ckpt_workdir: str) -> str:
  """``<run>/checkpoints`` for a run folder, or the folder itself when it is the checkpoints folder."""
  sub = os.path.join(ckpt_workdir, "checkpoints")
  return sub if os.path.isdir(sub) else ckpt_workdir


def read_meta(directory: str) -> dict:
  """The JSON meta of the newest checkpoint in ``directory`` (no arrays are read).

  Raises:
    FileNotFoundError: when ``directory`` holds no checkpoint.
  """
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise FileNotFoundError(f"no rlj checkpoint found in {directory!r}")
  out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  mngr.close()
  return dict(out["meta"] or {})


def model_from_meta(record: dict) -> RewardModel:
  """The ``RewardModel`` described by a checkpoint's ``reward_model`` meta record."""
  mc = dict(record["model_config"])
  if mc.get("rope_scaling") is not None:
    mc["rope_scaling"] = tuple(mc["rope_scaling"])  # JSON turned the tuple into a list
  return RewardModel(ModelConfig(**mc), kind=record["kind"], num_cosines=record["num_cosines"],
                     head_hidden_dim=record["head_hidden_dim"], monotone=record["monotone"])


def load_reward_model(ckpt_workdir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                      rules=sharding.DEFAULT_RULES) -> tuple[RewardModel, Any, dict]:
  """Rebuilds a trained reward model and restores its newest params.

  Args:
    ckpt_workdir: the reward-model run folder (or its ``checkpoints`` folder).
    mesh: shard the params by their logical names over this mesh (``rules``); None: the default device.
    rules: logical-axis rules for ``mesh``.

  Returns:
    (model, params, meta): the ``RewardModel``, its unboxed params and the checkpoint's ``reward_model``
    record plus ``step``, ``eval`` (held-out metrics at save time, may be None) and ``tokenizer_path`` (the
    absolute path of the run's tokenizer file).

  Raises:
    FileNotFoundError: no checkpoint; ValueError: a checkpoint that is not a reward-model run's.
  """
  directory = checkpoint_dir(ckpt_workdir)
  full_meta = read_meta(directory)
  if "reward_model" not in full_meta:
    raise ValueError(f"{directory!r} holds a {full_meta.get('job', 'non-reward-model')!r} checkpoint without a "
                     f"'reward_model' record; train one with a job='rm' config (configs/rm_bt.py)")
  record = full_meta["reward_model"]
  model = model_from_meta(record)
  dummy = jnp.zeros((1, 8), jnp.int32)
  args = (dummy, jnp.ones_like(dummy))
  if model.kind == "iqn":
    args += (quantile.midpoint_taus(record["num_taus"]),)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])
  shapes = nn.unbox(boxed)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = sharding.tree_shardings(sharding.logical_specs(boxed), shapes, mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  params, _ = checkpoint.restore_params(directory, abstract)
  run_dir = os.path.dirname(os.path.abspath(directory))
  meta = dict(record, step=full_meta.get("step"), eval=full_meta.get("eval"),
              tokenizer_path=os.path.join(run_dir, record["tokenizer"]))
  return model, params, meta


def _scalarized(params, tokens, attn_mask, *, scorer, kind: str, alpha: float):
  return quantile.scalarize(scorer(params, tokens, attn_mask), kind=kind, alpha=alpha)


def reward_model_fn(ckpt_workdir: str, *, scalarize: str = "mean", alpha: float = 0.25, pairwise: bool = False,
                    method: str = "preference", temperature: Optional[float] = None,
                    mesh: Optional[jax.sharding.Mesh] = None, rules=sharding.DEFAULT_RULES):
  """A reward function that scores sampled rows with a trained reward model (loaded once, here).

  Args:
    ckpt_workdir: the reward-model run folder (or its ``checkpoints`` folder).
    scalarize: IQN only: "mean" (risk-neutral), "cvar" (mean of the lowest ceil(alpha Q) quantiles) or
      "lower_quantile" (q(alpha)); see ``rewards.quantile.scalarize``. A BT model's reward is its scalar.
    alpha: risk level in (0, 1] of "cvar" / "lower_quantile".
    pairwise: reward = win rate within the prompt's group from pairwise preferences (see the module doc).
    method: IQN pairwise preferences: "preference" (P(Z_a > Z_b)) or "qd" (quantile-dominance verdicts).
    temperature: IQN "preference": soft preference temperature (None: hard, ties 1/2).
    mesh, rules: as in ``load_reward_model``.

  Returns:
    ``fn(prompts, completions, *, tokens, attn_mask, **_) -> np.ndarray [N] float32``, where ``tokens`` [N, S]
    int are the sampler's prompt + completion rows and ``attn_mask`` [N, S] is 1 on real tokens (prompt and
    completion up to its EOS), any padding side. ``fn.model``, ``fn.params`` and ``fn.meta`` expose what
    was loaded.
  """
  if scalarize not in SCALARIZE:
    raise ValueError(f"unknown scalarize {scalarize!r}; choose one of {sorted(SCALARIZE)}")
  if method not in PAIRWISE_METHODS:
    raise ValueError(f"unknown pairwise method {method!r}; choose one of {list(PAIRWISE_METHODS)}")
  return make_reward_fn(*load_reward_model(ckpt_workdir, mesh=mesh, rules=rules), scalarize=scalarize,
                        alpha=alpha, pairwise=pairwise, method=method, temperature=temperature)


PAIRWISE_METHODS = ("preference", "qd")


def _group_win_rates(scores, *, kind: str, group_size: int, method: str, temperature: Optional[float]):
  """[N] BT rewards or [N, Q] IQN quantiles -> [N] win rates within groups of ``group_size`` rows."""
  if kind == "bt":
    r = scores.reshape(-1, group_size)
    prefs = jax.nn.sigmoid(r[:, :, None] - r[:, None, :])
    return winrate.win_rates(prefs, symmetrize=False).reshape(-1)
  return reward_scoring.win_rate_rewards(scores, group_size, method=method, temperature=temperature).reshape(-1)


def make_reward_fn(model: RewardModel, params: Any, meta: dict, *, scalarize: str = "mean", alpha: float = 0.25,
                   pairwise: bool = False, method: str = "preference", temperature: Optional[float] = None):
  """``reward_model_fn`` for an already loaded ``(model, params, meta)`` (e.g. one model, several risk levels)."""
  if scalarize not in SCALARIZE:
    raise ValueError(f"unknown scalarize {scalarize!r}; choose one of {sorted(SCALARIZE)}")
  scorer = reward_scoring.make_scorer(model, num_taus=meta["num_taus"])
  if model.kind == "iqn" and not pairwise:
    scorer = jax.jit(functools.partial(_scalarized, scorer=scorer, kind=SCALARIZE[scalarize], alpha=alpha))
  win_rates = jax.jit(functools.partial(_group_win_rates, kind=model.kind, method=method, temperature=temperature),
                      static_argnames=("group_size",))
  vocab = model.config.vocab_size

  def fn(prompts, completions, *, tokens, attn_mask, group_size: int | None = None, **_) -> np.ndarray:
    tokens, attn_mask = np.asarray(tokens), np.asarray(attn_mask)
    if tokens.ndim != 2 or tokens.shape != attn_mask.shape:
      raise ValueError(f"tokens {tokens.shape} and attn_mask {attn_mask.shape} must both be [N, S]")
    if len(completions) != tokens.shape[0]:
      raise ValueError(f"{len(completions)} completions but {tokens.shape[0]} token rows")
    real = tokens[attn_mask > 0]
    if real.size and (real.min() < 0 or real.max() >= vocab):
      raise ValueError(f"token ids in [{real.min()}, {real.max()}] fall outside the reward model's vocabulary "
                       f"of {vocab}: policy and reward model must share the tokenizer ({meta['tokenizer_path']})")
    r = scorer(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(attn_mask, jnp.int32))
    if pairwise:
      if not group_size or tokens.shape[0] % group_size or group_size < 2:
        raise ValueError(f"a pairwise reward compares the completions of a prompt: {tokens.shape[0]} rows do not "
                         f"split into groups of group_size={group_size} >= 2")
      r = win_rates(r, group_size=int(group_size))
    return np.asarray(jax.device_get(r), np.float32)

  fn.model, fn.params, fn.meta = model, params, meta
  return fn


def step_reward_model_fn(ckpt_workdir: str, *, scalarize: str = "mean", alpha: float = 0.25,
                         mesh: Optional[jax.sharding.Mesh] = None, rules=sharding.DEFAULT_RULES):
  """``make_step_reward_fn`` of the reward model in ``ckpt_workdir`` (loaded once, here)."""
  return make_step_reward_fn(*load_reward_model(ckpt_workdir, mesh=mesh, rules=rules), scalarize=scalarize,
                             alpha=alpha)


def make_step_reward_fn(model: RewardModel, params: Any, meta: dict, *, scalarize: str = "mean",
                        alpha: float = 0.25):
  """A trained reward model as a process reward model: a step reward function of ``rewards.steps``.

  Step j of a completion scores r_j = RM(prompt, o_<=index(j)): the model's reward (a BT scalar, or the IQN
  quantiles scalarised as in ``reward_model_fn``) of the prompt and the completion's prefix up to and including
  the token where the step ends (``step_ends``, DeepSeekMath's index(j), arXiv:2402.03300 Sec. 4.1.3). The prefix
  is the sampled row itself with its attention mask cut after that token: the decoder is causal and the model
  pools its last real token (``models.reward_model.pool_last``), so nothing is re-tokenised. A model trained on
  whole responses scores partial ones here, the usual outcome-model-as-PRM proxy; a model trained on prefixes
  is the better PRM. Prefix rows are scored N at a time (the rollout's own row shape: one compilation).

  Returns:
    ``fn(prompts, completions, *, steps, step_ends, tokens, attn_mask, completion_mask, **_)`` -> per row a
    float32 array of its step rewards; ``tokens`` / ``attn_mask`` [N, P + T] are the sampler's rows and
    ``completion_mask`` [N, T] their completion part (the last T columns).
  """
  score_rows = make_reward_fn(model, params, meta, scalarize=scalarize, alpha=alpha)

  def fn(prompts, completions, *, steps, step_ends, tokens, attn_mask, completion_mask, **_) -> list[np.ndarray]:
    del steps
    tokens, attn_mask = np.asarray(tokens), np.asarray(attn_mask)
    n, width = tokens.shape
    prompt_width = width - np.asarray(completion_mask).shape[1]
    pairs = [(i, prompt_width + int(e)) for i, ends in enumerate(step_ends) for e in ends]
    scores = np.zeros(len(pairs), np.float32)
    for start in range(0, len(pairs), n):
      chunk = pairs[start:start + n]
      rows = np.array([i for i, _ in chunk] + [chunk[0][0]] * (n - len(chunk)))
      last = np.array([c for _, c in chunk] + [width - 1] * (n - len(chunk)))
      mask = attn_mask[rows] * (np.arange(width)[None] <= last[:, None])
      got = score_rows([prompts[i] for i in rows], [completions[i] for i in rows], tokens=tokens[rows],
                       attn_mask=mask)
      scores[start:start + len(chunk)] = got[:len(chunk)]
    bounds = np.cumsum([0] + [len(ends) for ends in step_ends])
    return [scores[bounds[i]:bounds[i + 1]] for i in range(len(step_ends))]

  fn.model, fn.params, fn.meta = model, params, meta
  return fn
