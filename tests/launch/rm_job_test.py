"""The reward-model job end to end: runlocal BT / IQN configs, shrunk, train on the synthetic preference set,
checkpoint, and serve through ``rlj.rm_reward`` (the checkpointed model reproduces the job's held-out
accuracy and prefers what the known scorer prefers)."""
import gzip
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from configs import rm_bt, rm_iqn
from launch import rm, train
from rewards import quantile
from rlj import rm_reward
from rlj.data import synthetic, tokenizer as tok_lib

STEPS = 40


def _shrink(c):
  c.train.total_steps = STEPS
  c.train.eval_every = STEPS
  c.train.ckpt_every = STEPS
  c.train.log_every = 20
  c.data.train_records = 4000
  c.data.eval_records = 256
  c.data.max_target = 20                                       # numbers in [-9, 29]: learnt in tens of steps
  c.tokenizer.train_records = 500
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 10
  c.optim.decay_steps = STEPS - 10
  return c


def _rows(tokenizer, task, *, right_pad_every=3):
  """Chosen then rejected rows of every pair, as the sampler would hand them over: tokens [2n, S] (row 2i
  chosen, 2i + 1 rejected) with every ``right_pad_every``-th row right-padded and the rest left-padded."""
  seqs = []
  for i in range(len(task)):
    r = task[i]
    for c in ("chosen", "rejected"):
      seqs.append(tokenizer.encode(r["prompt"], add_bos=True) + tokenizer.encode(r[c], add_eos=True))
  s = max(map(len, seqs)) + 2
  tokens = np.full((len(seqs), s), tokenizer.pad_id, np.int32)
  mask = np.zeros_like(tokens)
  for i, q in enumerate(seqs):
    sl = slice(0, len(q)) if i % right_pad_every == 0 else slice(s - len(q), s)
    tokens[i, sl], mask[i, sl] = q, 1
  return tokens, mask


def _check_run_folder(workdir):
  assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert any("eval/accuracy" in r for r in records) and any("loss" in r for r in records)
  assert os.path.isfile(os.path.join(workdir, "curves.png"))


def _held_out_task(c):
  return synthetic.PreferenceTask(c.data.eval_records, seed=c.data.seed + 1000003, max_target=c.data.max_target)


@pytest.mark.slow   # ~23 s on 2 cores: outside the CI budget; tests/rlj/rm_step_test.py and
# tests/rlj/reward_scoring_test.py cover the RM step and its serving
def test_bt_job_trains_checkpoints_and_serves(tmp_path, capsys):
  c = _shrink(rm_bt.get_config("runlocal"))
  workdir = str(tmp_path / "bt")
  train.run(c, workdir)                                       # the launcher's path: checks, then rm.run
  out = capsys.readouterr().out
  acc = float(re.search(r"^held-out accuracy: ([0-9.]+)$", out, re.M).group(1))
  print(out[-400:])
  assert acc >= 0.65                                           # chance is 0.5
  _check_run_folder(workdir)

  fn = rm_reward.reward_model_fn(workdir)
  assert fn.meta["kind"] == "bt" and fn.meta["step"] == STEPS
  tok = tok_lib.Tokenizer.from_file(fn.meta["tokenizer_path"])
  task = _held_out_task(c)
  tokens, mask = _rows(tok, task)
  r = fn([""] * len(tokens), [""] * len(tokens), tokens=tokens, attn_mask=mask, answers=None)
  assert r.shape == (len(tokens),) and r.dtype == np.float32
  served_acc = float(np.mean(r[0::2] > r[1::2]))
  # The served checkpoint is the model the job evaluated: same held-out pairs, same accuracy (padding side
  # and batch shape differ, so allow one near-tie pair to flip).
  assert abs(served_acc - fn.meta["eval"]["accuracy"]) <= 1.0 / len(task) + 1e-9
  assert abs(fn.meta["eval"]["accuracy"] - acc) < 1e-4
  # Higher reward goes with higher ground-truth score, on average over fresh pairs.
  truth = np.array([synthetic.number_score(task[i // 2]["prompt"], task[i // 2][("chosen", "rejected")[i % 2]])
                    for i in range(len(tokens))])
  assert np.corrcoef(r, truth)[0, 1] > 0.3
  with pytest.raises(ValueError, match="vocabulary"):
    bad = tokens.copy()
    bad[0, np.argmax(mask[0])] = fn.model.config.vocab_size
    fn([""] * len(bad), [""] * len(bad), tokens=bad, attn_mask=mask)


@pytest.mark.slow   # the BT job test covers the same lifecycle by default; this one takes ~35 s
def test_iqn_job_trains_resumes_and_serves_risk_measures(tmp_path):
  c = _shrink(rm_iqn.get_config("runlocal"))
  workdir = str(tmp_path / "iqn")
  held_out = rm.run(c, workdir)
  print("IQN held-out", held_out)
  assert held_out["count"] == c.data.eval_records
  assert held_out["accuracy"] >= 0.65 and held_out["mean_accuracy"] >= 0.65
  _check_run_folder(workdir)
  again = rm.run(c, workdir)                                   # finished run: restores, evaluates, no training
  assert again["accuracy"] == held_out["accuracy"] and again["loss"] == pytest.approx(held_out["loss"], rel=1e-6)

  fns = {"mean": rm_reward.reward_model_fn(workdir, scalarize="mean")}
  model, params, meta = fns["mean"].model, fns["mean"].params, fns["mean"].meta
  for k in ("cvar", "lower_quantile"):
    fns[k] = rm_reward.make_reward_fn(model, params, meta, scalarize=k, alpha=0.25)
  assert meta["kind"] == "iqn" and meta["num_taus"] == c.loss.num_taus and meta["step"] == STEPS
  tok = tok_lib.Tokenizer.from_file(meta["tokenizer_path"])
  tokens, mask = _rows(tok, synthetic.PreferenceTask(64, seed=4242, max_target=c.data.max_target))
  r = {k: fn([""] * len(tokens), [""] * len(tokens), tokens=tokens, attn_mask=mask) for k, fn in fns.items()}
  assert float(np.mean(r["mean"][0::2] > r["mean"][1::2])) >= 0.6
  # Risk measures of one quantile vector: CVaR_0.25 <= mean and q(0.25) <= mean.
  assert np.all(r["cvar"] <= r["mean"] + 1e-5) and np.all(r["lower_quantile"] <= r["mean"] + 1e-5)
  q = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                             quantile.midpoint_taus(meta["num_taus"])))
  np.testing.assert_allclose(r["mean"], q.mean(-1), rtol=1e-5, atol=1e-5)
  q = np.sort(q, -1)
  np.testing.assert_allclose(r["cvar"], q[:, :2].mean(-1), rtol=1e-5, atol=1e-5)           # ceil(0.25 * 8) = 2
  np.testing.assert_allclose(r["lower_quantile"], 0.5 * (q[:, 1] + q[:, 2]), rtol=1e-5, atol=1e-5)  # tau 0.25


def test_hh_file_is_split_into_train_and_held_out_by_index(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  with gzip.open(src / "test.jsonl.gz", "wt") as f:
    for i in range(10):
      f.write(json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}",
                          "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {i}"}) + "\n")
  c = rm_bt.get_config("runlocal")
  c.data.source, c.data.source_dir, c.data.eval_records = "hh_rlhf", str(src), 3
  train_src, held_out = rm.preference_sources(c, str(tmp_path / "run"))
  assert (len(train_src), len(held_out)) == (7, 3)
  assert [int(train_src[i]["index"]) for i in range(7)] == list(range(7))
  assert [int(held_out[i]["index"]) for i in range(3)] == [7, 8, 9]
  assert held_out[0]["prompt"] == b"\n\nHuman: q7?\n\nAssistant:" and held_out[0]["chosen"] == b" yes 7"
  c.data.train_records = 4
  assert len(rm.preference_sources(c, str(tmp_path / "run"))[0]) == 4
  with pytest.raises(IndexError):
    held_out[3]
  # The source edited in place: the next build reads the new rows (a new cache entry), not the stale ones.
  c.data.train_records = 0
  with gzip.open(src / "test.jsonl.gz", "wt") as f:
    for i in range(6):
      f.write(json.dumps({"chosen": f"\n\nHuman: r{i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: r{i}?\n\n"
                          f"Assistant: no"}) + "\n")
  train_src, held_out = rm.preference_sources(c, str(tmp_path / "run"))
  assert (len(train_src), len(held_out)) == (3, 3) and train_src[0]["prompt"] == b"\n\nHuman: r0?\n\nAssistant:"
