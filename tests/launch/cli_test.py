"""The launcher's command line: ``--help`` and ``--show`` exit 0, and every user mistake ends in one line (exit
status 1) that names the file, key or path, the reason and the fix; ``RLJ_TRACEBACK=1`` keeps the traceback.

Most cases call the launcher's functions in this process. The command-line cases run in ONE subprocess that
imports the launcher once and forks a child per command line (a fresh absl flag state each; importing jax costs
seconds, forking milliseconds).
"""
import ast
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from configs import grpo_tpu
from launch import cli_help, train
from models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("fast_compile")


def _one_line(info) -> str:
  msg = str(info.value)
  assert "\n" not in msg and "Traceback" not in msg, msg
  return msg


# ------------------------------------------------------------------------------------------------------------
# In process
# ------------------------------------------------------------------------------------------------------------

def test_help_lists_every_config_variant_and_preset_from_the_code():
  text = cli_help.usage()
  configs = cli_help.job_configs()
  listed = {p for p, _ in configs}
  assert {"configs/grpo_tpu.py", "configs/gspo_tpu.py", "configs/dno_tpu.py", "configs/rm_iqn.py",
          "configs/sft.py"} <= listed and "configs/common.py" not in listed   # job configs, not their helpers
  for path, purpose in configs:
    assert f"{path}  " in text and purpose and purpose in text, path
    keys = cli_help.variant_defaults(cli_help.load_module(os.path.join(ROOT, path)))
    assert "runlocal" in keys and "model" in keys, (path, keys)
  assert ", ".join(presets.names()) in text
  from configs import gspo_tpu
  assert "algo" in cli_help.variant_defaults(gspo_tpu) and " | ".join(sorted(gspo_tpu.LOSSES)) in text
  assert "hf" in cli_help.variant_defaults(grpo_tpu)
  for word in ("--show", "--workdir", "--config.<key>=<value>", cli_help.TRACEBACK_SWITCH):
    assert word in text


@pytest.mark.parametrize("path", [p for p, _ in cli_help.job_configs()])
def test_an_unknown_preset_stops_every_variant_of_every_config(path):
  for variants in ("model=llama-3-8b", "runlocal,model=llama-3-8b"):
    with pytest.raises(SystemExit) as info:
      cli_help.check_config_arg(f"{path}:{variants}")
    msg = _one_line(info)
    assert msg.startswith(f"--config {path}:{variants}: model='llama-3-8b' is not a model preset; did you mean "
                          f"'llama-3.1-8b'?") and ", ".join(presets.names()) in msg
  cli_help.check_config_arg(f"{path}:runlocal,model=qwen3-0.6b")   # a preset passes


@pytest.mark.parametrize("spec, expected", [
    ("configs/grpo_tpu.py:runlocl", r"^--config configs/grpo_tpu\.py:runlocl: unknown variant 'runlocl'; this "
     r"config's variants are runlocal, model=<str>, slice=<str>, hf=<str> \(did you mean 'runlocal'\?\)"),
    ("configs/gspo_tpu.py:algo=cipso", r"algo='cipso' is not one of cispo, gspo, gspo_token"),
    ("configs/gspo_tpu.py:runlocl,algo=cispo", r"variants are algo=<str>, runlocal.*did you mean 'runlocal'"),
    ("configs/sft.py:runlocal=maybe", r"runlocal='maybe' is not a boolean; write runlocal"),
    ("configs/rm_bt.py:model", r"'model' needs a value: model=<str>"),
    ("configs/grpo_tpu.pyy:runlocal", r"no such file 'configs/grpo_tpu\.pyy'; pass a config file, one of "
     r"configs/agent_tpu\.py, configs/dno_tpu\.py, .*configs/sft\.py"),
    ("configs:runlocal", r"is a folder 'configs'"),
])
def test_bad_config_file_or_variant_is_one_line(spec, expected):
  with pytest.raises(SystemExit, match=expected) as info:
    cli_help.check_config_arg(spec)
  _one_line(info)


def test_override_of_a_missing_key_names_the_closest_one():
  spec = "configs/grpo_tpu.py:runlocal"
  cli_help.check_overrides(spec, ["--workdir=x", "--config.train.total_steps=3", "--config.model.overrides.remat",
                                  "--config.rewards=()", "--config.mesh=[('data',-1)]"])   # every key exists
  for flag, expected in [
      ("--config.trian.total_steps=3", "--config.trian.total_steps=3: the config has no key 'trian'; did you mean "
                                       "--config.train.total_steps=3?"),
      ("--config.train.totl_steps=3", "no key 'train.totl_steps'; did you mean --config.train.total_steps=3?"),
      ("--config.xyzzy=1", "no key 'xyzzy'; the keys at the top are algo, data,"),
  ]:
    with pytest.raises(SystemExit) as info:
      cli_help.check_overrides(spec, ["--config.seed=1", flag])
    assert expected in _one_line(info)


def _documented_commands() -> list[str]:
  """Every command line in README.md and in the configs' docstrings (runbooks) that names a config file."""
  texts = [open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()]
  for path, _ in cli_help.job_configs():
    texts.append(ast.get_docstring(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())))
  lines = "\n".join(re.sub(r"\\\n\s*", " ", t) for t in texts).splitlines()
  return [line for line in lines if re.search(r"--config[ =]configs/", line)]


def test_documented_commands_name_variants_and_keys_that_exist():
  """The runbooks cannot drift from the configs: each documented ``--config file.py:variants`` loads, and each
  ``--config.<key>`` on the same command line is a key of that config."""
  commands = _documented_commands()
  assert len(commands) > 20
  for line in commands:
    for spec in re.findall(r"--config[ =](configs/[\w.-]+\.py(?::[^\s`'\\]*)?)", line):
      if "<" in spec:            # a placeholder such as model=<preset>
        continue
      cli_help.check_config_arg(spec)
      keys = [k for k in re.findall(r"--config\.([\w.]+)", line) if "<" not in k]
      cli_help.check_overrides(spec, [f"--config.{k}=0" for k in keys])
  for path, _ in cli_help.job_configs():   # a config's runbook: every key it names, in prose too
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read()))
    keys = [k.rstrip(".") for k in re.findall(r"--config\.([\w.]+)", doc)]
    for variant in ("", ":runlocal"):
      cli_help.check_overrides(path + variant, [f"--config.{k}=0" for k in keys])


def _config(**changes):
  c = grpo_tpu.get_config("runlocal")
  c.tokenizer.train_records = 200
  c.sft.steps, c.train.total_steps, c.eval.num_prompts = 2, 2, 8
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  c.lock()
  return c


def test_unwritable_workdir_stops_before_anything_is_built(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  for workdir, reason in [(tmp_path / "file", "is a file, not a folder"),
                          (tmp_path / "file" / "run", "cannot create or write it (Not a directory)")]:
    with pytest.raises(SystemExit) as info:
      train.run(_config(), str(workdir))
    assert _one_line(info) == (f"--workdir {workdir}: {reason}; pass --workdir a folder "
                               + ("the job may write (it is created when missing)" if "file," in reason else
                                  "this user may write"))

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))
  monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)   # what a folder of another user gives
  with pytest.raises(SystemExit) as info:
    train.run(_config(), str(tmp_path / "ro"))
  assert _one_line(info) == (f"--workdir {tmp_path / 'ro'}: cannot create or write it (Permission denied); pass "
                             f"--workdir a folder this user may write")
  assert not (tmp_path / "ro" / "config.json").exists()


BAD_LINE = '{"question": "2 + 2 = ?", "answer": "#### 4"'   # the closing brace is missing
END = len(BAD_LINE) + 1                                          # the column where json finds it missing


def _jsonl_source(tmp_path, bad_line_no: int):
  src = tmp_path / "src"
  src.mkdir()
  rows = [json.dumps({"question": f"{i} + 1 = ?", "answer": f"#### {i + 1}"}) for i in range(12)]
  rows[bad_line_no - 1] = BAD_LINE
  for split in ("train", "test"):
    (src / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
  return src


def test_malformed_first_jsonl_line_stops_in_the_pre_run_check(tmp_path):
  src = _jsonl_source(tmp_path, bad_line_no=1)
  with pytest.raises(SystemExit) as info:
    train.launch(_config(**{"data.source": "gsm8k", "data.source_dir": str(src)}), str(tmp_path / "run"))
  assert _one_line(info) == (
      f"config key 'data.source_dir': {src / 'train.jsonl'}:1:{END}: malformed JSON at column {END} (the end of the "
      f"line): Expecting ',' delimiter; fix or remove line 1 (a JSONL file holds one JSON object per line)")
  assert not (tmp_path / "run").exists()


def test_malformed_later_jsonl_line_stops_in_one_line_when_the_data_is_built(tmp_path):
  """The pre-run check reads the first line only; the build of the dataset meets line 7."""
  src = _jsonl_source(tmp_path, bad_line_no=7)
  with pytest.raises(SystemExit) as info:
    train.launch(_config(**{"data.source": "gsm8k", "data.source_dir": str(src)}), str(tmp_path / "run"))
  msg = _one_line(info)
  assert msg.startswith("config key 'data.source_dir': ") and (
      msg.endswith(f".jsonl:7:{END}: malformed JSON at column {END} (the end of the line): Expecting ',' delimiter; "
                   f"fix or remove line 7 (a JSONL file holds one JSON object per line)")), msg
  assert str(src) in msg


def test_tokenizer_files_that_are_not_there(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "hf_only").mkdir()
  (tmp_path / "hf_only" / "tokenizer.json").write_text("{}")
  cases = [
      ({"tokenizer.kind": "auto", "tokenizer.path": "nope/tokenizer.model"},
       "config key 'tokenizer.path': no such file or folder 'nope/tokenizer.model'; pass the checkpoint folder or "
       "its tokenizer.json / tokenizer.model"),
      ({"tokenizer.kind": "auto", "tokenizer.path": str(tmp_path / "empty")},
       f"config key 'tokenizer.path': the folder {tmp_path / 'empty'} has no tokenizer.json or tokenizer.model; "
       f"pass the checkpoint folder the tokenizer came with, or the tokenizer file itself"),
      ({"tokenizer.kind": "sentencepiece", "tokenizer.path": str(tmp_path / "hf_only")},
       f"config key 'tokenizer.path': the folder {tmp_path / 'hf_only'} has no tokenizer.model (tokenizer kind "
       f"'sentencepiece'); it has tokenizer.json: use tokenizer kind 'auto'"),
      ({"tokenizer.path": "nope/tokenizer.model"},   # runlocal trains its own tokenizer
       "config key 'tokenizer.path': 'nope/tokenizer.model' is ignored: tokenizer.kind='train_synthetic' trains "
       "its own tokenizer; to load this one add --config.tokenizer.kind=auto (or hf / sentencepiece), else drop "
       "tokenizer.path"),
  ]
  for changes, expected in cases:
    with pytest.raises(SystemExit) as info:
      train.run(_config(**changes), str(tmp_path / "run"))
    assert _one_line(info) == expected
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------
# Command lines, one subprocess for all
# ------------------------------------------------------------------------------------------------------------

_RUNNER = r"""
import json, os, sys, traceback
from absl import app
from launch import train
results = []
for i, case in enumerate(json.loads(sys.argv[1])):
  out = os.path.join(sys.argv[2], f"{i}.txt")
  pid = os.fork()
  if pid == 0:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(case["env"])
    sys.argv = ["launch.train", *case["args"]]
    code = 0
    try:
      app.run(train.main, argv=sys.argv, flags_parser=train.parse_flags)
    except SystemExit as e:
      code = e.code
      if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    except BaseException:   # as the interpreter reports an uncaught exception
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
  _, status = os.waitpid(pid, 0)
  results.append({"rc": os.waitstatus_to_exitcode(status), "out": open(out).read()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """Runs every case of ``_CASES`` (``{name: (args, env)}``) once; returns ``{name: (exit status, output)}``."""
  tmp = tmp_path_factory.mktemp("cli")
  workdir = str(tmp / "run")
  cases = {name: {"args": [a.replace("{workdir}", workdir) for a in args], "env": env}
           for name, (args, env) in _CASES.items()}
  proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(list(cases.values())), str(tmp)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not os.path.exists(workdir), "no case may create the workdir"
  return {name: (r["rc"], r["out"]) for name, r in zip(cases, results)}


LOCAL = ["--config", "configs/grpo_tpu.py:runlocal", "--workdir", "{workdir}"]
_CASES = {
    "help": (["--help"], {}),
    "show": ([*LOCAL, "--config.train.total_steps=7", "--show"], {}),
    "show_pod_config": (["--config", "configs/grpo_tpu.py", "--workdir", "{workdir}", "--show"], {}),
    "variant_typo": (["--config", "configs/grpo_tpu.py:runlocl", "--workdir", "{workdir}"], {}),
    "unknown_preset": (["--config=configs/dno_tpu.py:runlocal,model=llama-3-8b", "--workdir", "{workdir}"], {}),
    "key_typo": ([*LOCAL, "--config.trian.total_steps=3"], {}),
    "bad_value": ([*LOCAL, "--config.train.total_steps=abc"], {}),
    "bad_batch": ([*LOCAL, "--config.train.batch_prompts=3"], {}),
    "no_config": (["--workdir", "{workdir}"], {}),
    "unknown_flag": ([*LOCAL, "--workdirr=x"], {}),
    "traceback_switch": (["--config", "configs/grpo_tpu.py:runlocl", "--workdir", "{workdir}"],
                         {"RLJ_TRACEBACK": "1"}),
}


def test_help_exits_zero_with_the_configs(cli):
  rc, out = cli["help"]
  assert rc == 0 and out.startswith("usage: python -m launch.train --config configs/<job>.py")
  assert all(path in out for path, _ in cli_help.job_configs())


def test_show_prints_the_resolved_config_and_the_checks_and_builds_nothing(cli):
  rc, out = cli["show"]
  assert rc == 0, out
  import yaml
  body = yaml.safe_load(out)      # the comment lines are YAML comments: the output is the config as YAML
  assert body["train"]["total_steps"] == 7 and body["data"]["user_template"] == "{prompt}\n"
  assert body["mesh"] == [["data", -1], ["fsdp", 1], ["tensor", 1]]
  assert "#   ok  hardware:" in out and "#   ok    algorithm 'grpo'" in out and "#   ok    rewards: 'correct'" in out
  assert "nothing was built or compiled" in out and "new: the job creates it" in out
  rc, out = cli["show_pod_config"]   # the config is printed, then the check that would stop the launch
  lines = out.strip().splitlines()
  assert rc == 1 and "model:" in out and lines[-1].startswith("config key 'hardware' expects 'tpu'"), out[-500:]


@pytest.mark.parametrize("case, expected", [
    ("variant_typo", "--config configs/grpo_tpu.py:runlocl: unknown variant 'runlocl'"),
    ("unknown_preset", "--config configs/dno_tpu.py:runlocal,model=llama-3-8b: model='llama-3-8b' is not a model "
                       "preset; did you mean 'llama-3.1-8b'?"),
    ("key_typo", "--config.trian.total_steps=3: the config has no key 'trian'; did you mean "
                 "--config.train.total_steps=3? (the config is locked"),
    ("bad_value", "bad command line: flag --config.train.total_steps=abc: invalid literal for int() with base 10: "
                  "'abc'; give the key a value of the type it holds"),
    ("bad_batch", "config key 'train.batch_prompts': "),
    ("no_config", "--config is required, e.g. --config configs/grpo_tpu.py:runlocal"),
    ("unknown_flag", "bad command line: Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
])
def test_mistakes_end_in_one_line(cli, case, expected):
  rc, out = cli[case]
  assert rc == 1 and len(out.strip().splitlines()) == 1 and out.startswith(expected), out[-2000:]


def test_the_traceback_switch_keeps_the_traceback(cli):
  rc, out = cli["traceback_switch"]
  assert rc == 1 and "Traceback (most recent call last)" in out and "in parse_arg" in out
  assert "ValueError: unknown variant 'runlocl'" in out
