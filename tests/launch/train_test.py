"""Smoke tests of the main job: every runlocal config runs end to end for two steps; bad configs fail fast."""
import os

import numpy as np
import pytest

from configs import dno_tpu, gdpo_tpu, grpo_tpu, p3o_tpu, sft as sft_config
from launch import export, train
from rlj import metrics_writer

CONFIGS = {"grpo": grpo_tpu, "gdpo": gdpo_tpu, "p3o": p3o_tpu, "dno": dno_tpu}


pytestmark = pytest.mark.usefixtures("fast_compile")


def _shrink(c):
  """Two RL steps after two SFT steps, a small eval set: exercises every stage in seconds."""
  c.train.total_steps = 2
  c.train.eval_every = 2
  c.train.ckpt_every = 1
  c.sft.steps = 2
  c.sft.eval_every = 2
  c.train.batch_prompts = 8
  c.sft.batch_prompts = 8
  c.eval.num_prompts = 8
  c.eval.batch_prompts = 8
  c.tokenizer.train_records = 200
  c.data.train_records = 400
  c.data.eval_records = 16
  c.algo.dno.iteration_steps = 1
  return c


# GRPO end to end by default; the others are the same loop with another row, whose batches tests/rlj/batches_test.py
# builds (DNO's pairs and replay: tests/rlj/batches_test.py, tests/algorithms/dno_winrate_test.py): slow-marked to
# keep the suite in its budget.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("gdpo", "p3o", "dno") else n
                                  for n in sorted(CONFIGS)])
def test_runlocal_two_steps(name, tmp_path):
  c = _shrink(CONFIGS[name].get_config("runlocal"))
  workdir = str(tmp_path / name)
  history = train.run(c, workdir)
  assert [h["step"] for h in history] == [0, 1, 2]
  records = metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [0, 1, 2]
  last = records[-1]
  for key in ("reward/mean", "response_len/mean", "loss", "grad_norm", "tokens_per_s", "eval/accuracy",
              "time/sample", "time/update", "time/host_overhead", "entropy", "response_len/max",
              "response_len/truncated_frac"):
    assert key in last, key
  if name in ("grpo", "gdpo"):
    assert "clip_frac_low" in last
  if name == "gdpo":
    assert "adv/distinct_grpo_sum" in last
  if name == "p3o":
    assert "kl" in last  # P3O's KL-regularised reward difference runs the reference
  if name == "dno":
    assert "dno/valid_pairs" in last
    assert "kl" in last  # the diagnostic KL to its reference (the loss has no KL term)
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))

  if name == "grpo":
    # the step-0 eval is in the checkpoint's meta, for the summary of a resumed run
    _, meta = export.read_meta(os.path.join(workdir, "checkpoints"), None)
    assert meta["start_eval"]["eval/accuracy"] == records[0]["eval/accuracy"]
    # relaunching a finished run resumes from its last checkpoint and does nothing more
    again = train.run(_shrink(CONFIGS[name].get_config("runlocal")), workdir)
    assert again == []
    assert [r["step"] for r in metrics_writer.read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [0, 1, 2]
    _relaunch_with_changes_stops_and_keeps_every_file(workdir)


def _files(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def _relaunch_with_changes_stops_and_keeps_every_file(workdir):
  """A finished run relaunched with another layer count, tokenizer or dataset: one line naming the key, the
  workdir byte-identical (no checkpoint set aside as corrupt, nothing retrained)."""
  before = _files(workdir)
  for key, value in (("model.overrides", {"num_layers": 3}), ("tokenizer.vocab_size", 64),
                     ("data.train_records", 300)):
    c = _shrink(grpo_tpu.get_config("runlocal"))
    if key == "model.overrides":
      c.model.overrides = dict(c.model.overrides, **value)
      key = "model.overrides.num_layers"
    else:
      section, name = key.split(".")
      c[section][name] = value
    with pytest.raises(SystemExit, match=key.replace(".", r"\.") + ": ") as e:
      train.run(c, workdir)
    assert "\n" not in str(e.value) and "init.policy=rlj" in str(e.value)
    assert _files(workdir) == before
  assert not os.path.exists(workdir + "/checkpoints.corrupt")


@pytest.mark.slow   # ~19 s on 2 cores: outside the CI budget; runlocal above runs SFT then RL in one job
def test_sft_job_writes_a_checkpoint_the_rl_job_loads(tmp_path):
  c = _shrink(sft_config.get_config("runlocal"))
  train.run(c, str(tmp_path / "sft"))
  ckpt = tmp_path / "sft" / "checkpoints"
  assert (ckpt / "2").is_dir()
  rl = _shrink(grpo_tpu.get_config("runlocal"))
  rl.init.policy = "rlj"
  rl.init.path = str(ckpt)
  rl.tokenizer.kind = "sentencepiece"
  rl.tokenizer.path = str(tmp_path / "sft" / "tokenizer.model")
  history = train.run(rl, str(tmp_path / "rl"))
  assert history[-1]["step"] == 2


def test_tpu_config_without_tpu_fails_fast_with_instructions():
  c = grpo_tpu.get_config()
  with pytest.raises(SystemExit, match="expects 'tpu'.*runlocal"):
    train.run(c, "unused")


@pytest.mark.parametrize("key,value,match", [
    ("algo.name", "ppo", "algo.name"),
    ("sampler.num_generations", 1, "sampler.num_generations"),
    ("train.batch_prompts", 3, "train.batch_prompts"),
    ("mesh", [("data", 3), ("fsdp", 1), ("tensor", 1)], "mesh"),
    ("algo.kwargs.kl_estimator", "k4", "kl_estimator"),
])
def test_bad_config_names_the_key(key, value, match, tmp_path):
  c = grpo_tpu.get_config("runlocal")
  c.unlock()
  node, leaf = c, key.split(".")
  for part in leaf[:-1]:
    node = node[part]
  node[leaf[-1]] = value
  with pytest.raises(SystemExit, match=match):
    train.run(c, str(tmp_path))


def test_locked_config_rejects_typos():
  c = grpo_tpu.get_config("runlocal")
  c.lock()  # as launch.train's config flag does (lock_config=True)
  with pytest.raises(AttributeError):
    c.algo.kwargs.kl_cof = 0.0  # noqa: the point of the test


@pytest.mark.slow   # ~26 s: a trained RM serving rewards is covered by tests/launch/rm_job_test.py
# (slow too; in CI: tests/rlj/rm_step_test.py)
def test_rl_with_a_trained_reward_model_as_reward(tmp_path):
  """A reward-model run's workdir serves as an RL reward (``fn="reward_model"``) on the sampled token rows."""
  from configs import rm_bt
  rm_cfg = rm_bt.get_config("runlocal")
  rm_cfg.train.total_steps = 4
  rm_cfg.train.eval_every = 4
  rm_cfg.train.ckpt_every = 4
  rm_cfg.data.train_records = 256
  rm_cfg.data.eval_records = 32
  rm_cfg.tokenizer.train_records = 200
  rm_dir = str(tmp_path / "rm")
  train.run(rm_cfg, rm_dir)
  rl = _shrink(grpo_tpu.get_config("runlocal"))
  rl.tokenizer.kind = "sentencepiece"
  rl.tokenizer.path = os.path.join(rm_dir, "tokenizer.model")
  rl.rewards = ({"name": "rm", "fn": "reward_model", "kwargs": {"path": rm_dir}},)
  history = train.run(rl, str(tmp_path / "rl"))
  assert history[-1]["step"] == 2
  assert np.isfinite(history[-1]["reward/rm"])
  rl.rewards = ({"name": "rm", "fn": "reward_model", "kwargs": {"path": str(tmp_path / "nowhere")}},)
  with pytest.raises(SystemExit, match="rewards"):
    train.run(rl, str(tmp_path / "rl2"))


@pytest.mark.slow   # ~30 s: a whole job; in CI the Lookahead positions (tests/rlj/sample_ahead_test.py) and the
# loop's prompt order (tests/rlj/old_logp_test.py) are checked without one
def test_sample_ahead_checkpoints_only_the_trained_prompt_batches(tmp_path):
  """``train.sample_ahead``: each step also samples the next step's prompts, but a checkpoint records the data
  position after the trained batches only (the launcher hands the loop and the checkpoints one Lookahead)."""
  c = _shrink(grpo_tpu.get_config("runlocal"))
  c.train.sample_ahead = True
  c.train.eval_every = 0
  workdir = str(tmp_path / "ahead")
  history = train.run(c, workdir)
  assert [h["sample_ahead/stale"] for h in history if "sample_ahead/stale" in h] == [0.0, 1.0]
  for step in (1, 2):
    _, meta = export.read_meta(os.path.join(workdir, "checkpoints"), step)
    assert [d["batches"] for d in meta["data"]] == [step]
