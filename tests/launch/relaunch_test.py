"""Relaunch semantics without running a job: what a workdir remembers, what may change, what stops it.

(The end-to-end case, a finished GRPO run relaunched with a changed layer count, is in train_test.py.)
"""
import json
import os

import pytest

from configs import grpo_tpu, rm_bt
from launch import relaunch


def _snapshot(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def _config(src, tok):
  c = grpo_tpu.get_config("runlocal")
  c.data.source = "generic"
  c.data.source_dir = str(src)
  c.tokenizer.kind = "hf"
  c.tokenizer.path = str(tok)
  return c


@pytest.fixture
def started(tmp_path):
  """A workdir started with ``_config`` that holds a checkpoint, plus its source and tokenizer files."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "train.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"{i}"}) + "\n"
                                           for i in range(10)))
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text('{"model": "stand-in"}')
  (tok / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert relaunch.check(_config(src, tok), str(workdir)) == []
  (workdir / "checkpoints" / "20").mkdir(parents=True)      # the run did some work
  (workdir / "checkpoints" / "20" / "state").write_bytes(b"weights")
  return src, tok, workdir


def _refused(config, workdir):
  before = _snapshot(workdir)
  with pytest.raises(SystemExit) as e:
    relaunch.check(config, str(workdir))
  assert _snapshot(workdir) == before   # byte-identical: nothing written, moved or deleted
  msg = str(e.value)
  assert "\n" not in msg and "relaunch with the config it was started with" in msg and "--workdir" in msg
  return msg


def test_changed_keys_stop_and_list_each_key(started):
  src, tok, workdir = started
  c = _config(src, tok)
  c.model.overrides = dict(c.model.overrides, num_layers=3)
  c.algo.kwargs.clip_eps = 0.3
  msg = _refused(c, workdir)
  assert "model.overrides.num_layers: 2 -> 3" in msg and "algo.kwargs.clip_eps: 0.2 -> 0.3" in msg
  assert f"--config.init.path={workdir}/checkpoints" in msg


def test_schedule_and_logging_changes_are_accepted_and_reported(started):
  src, tok, workdir = started
  c = _config(src, tok)
  c.train.total_steps = 300
  c.train.eval_every = 7
  c.eval.num_prompts = 32
  lines = []
  changes = relaunch.check(c, str(workdir), print_fn=lines.append)
  assert [k for k, _, _ in changes] == ["eval.num_prompts", "train.eval_every", "train.total_steps"]
  assert any("train.total_steps 100 -> 300 (accepted" in line for line in lines)
  assert json.loads((workdir / "config.json").read_text())["train"]["total_steps"] == 300  # remembered


def test_edited_data_and_tokenizer_files_stop_the_resume(started):
  src, tok, workdir = started
  lines = (src / "train.jsonl").read_text().splitlines()
  (src / "train.jsonl").write_text("\n".join(lines[:4]) + "\n")
  msg = _refused(_config(src, tok), workdir)
  assert msg.startswith("config key 'data.source_dir': the data files changed") and "train.jsonl" in msg
  (src / "train.jsonl").write_text("\n".join(lines) + "\n")   # restored: resumes
  relaunch.check(_config(src, tok), str(workdir))

  (tok / "tokenizer_config.json").write_text('{"chat_template": "{{ mess4ges }}"}')
  msg = _refused(_config(src, tok), workdir)
  assert msg.startswith("config key 'tokenizer.path': the tokenizer files changed")
  assert "tokenizer_config.json: same size, content differs" in msg


def test_a_workdir_without_checkpoints_takes_the_new_config(tmp_path):
  c = rm_bt.get_config("runlocal")
  relaunch.check(c, str(tmp_path))
  c2 = rm_bt.get_config("runlocal")
  c2.seed = 5
  assert relaunch.check(c2, str(tmp_path)) == []     # no work to protect
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5


def test_keys_of_another_version_are_accepted(started):
  src, tok, workdir = started
  record = json.loads((workdir / "config.json").read_text())
  del record["train"]["old_logp"]        # a workdir written before the key existed
  (workdir / "config.json").write_text(json.dumps(record))
  changes = relaunch.check(_config(src, tok), str(workdir), print_fn=lambda _: None)
  assert changes == [("train.old_logp", "(unset)", "sampler")]
