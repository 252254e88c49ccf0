"""The launcher's command line: ``--help`` text, the ``--config file.py:<variants>`` check, and ``--show``.

Everything printed here is read from the code, so it cannot drift from it: the job configs are ``configs/*.py``
files with a ``get_config`` (each described by its docstring's first line), a config's variants are the
defaults it hands to ``configs.common.parse_arg`` (recorded by calling its ``get_config`` with a spy), and the
model presets are ``models.presets.names()`` (``model=<preset>`` is checked against them here, for every config and
variant: the configs themselves import ml_collections alone).
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import glob
import importlib.util
import os
import re
import sys
from typing import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
TRACEBACK_SWITCH = "RLJ_TRACEBACK"   # =1: user errors keep their Python traceback (for developers)

# What each variant key does; the keys each config takes, and their defaults, come from the config itself.
VARIANT_HELP = {
    "runlocal": "the local job: one CPU, a 0.4M-parameter model, the synthetic arithmetic task, a tokenizer "
                "trained at start-up (RL configs: an SFT stage, then RL; about a minute)",
    "model": "a model preset (listed below) for the pod job",
    "slice": "the TPU slice the pod job is sized for, e.g. v5p-32, v5p-64, v4-32, v5litepod-16, v6e-8 "
             "(python -m launch.aot compiles for it)",
    "hf": "with runlocal: start from a small Hugging Face checkpoint folder, GSM8K (data.source_dir) in its chat "
          "template (README \"Bring your own checkpoint\")",
    "algo": "the policy loss",
}


def show_tracebacks() -> bool:
  """Whether user errors keep their traceback (``RLJ_TRACEBACK=1``)."""
  return os.environ.get(TRACEBACK_SWITCH, "0") not in ("", "0")


# ------------------------------------------------------------------------------------------------------------
# Configs, variants, presets
# ------------------------------------------------------------------------------------------------------------

def job_configs() -> list[tuple[str, str]]:
  """``(configs/<name>.py, first line of its docstring)`` for every config file that defines ``get_config``."""
  out = []
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py"))):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    if any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
      doc = (ast.get_docstring(tree) or "").strip()
      out.append((os.path.relpath(path, ROOT), doc.splitlines()[0] if doc else ""))
  return out


def load_module(path: str):
  """The config module in ``path`` (a fresh module object each time; the file is executed, as config_flags does)."""
  name = "rlj_cli_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  if ROOT not in sys.path:   # configs import ``configs.common``
    sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def _recording_parse_arg() -> Iterator[dict]:
  """Within the block, ``configs.common.parse_arg`` records the defaults it is given and ignores its argument."""
  from configs import common
  seen, real = {}, common.parse_arg

  def spy(arg, **defaults):
    del arg
    seen.update(defaults)
    return real(None, **defaults)

  common.parse_arg = spy
  try:
    yield seen
  finally:
    common.parse_arg = real


def variant_defaults(module) -> dict:
  """The ``--config file.py:<variants>`` keys of a config module with their defaults, in the order it names them."""
  with _recording_parse_arg() as seen:
    module.get_config(None)
  return dict(seen)


def _variant_choices(key: str, module) -> str:
  if key == "algo" and hasattr(module, "LOSSES"):
    return ": " + " | ".join(sorted(module.LOSSES))
  return ""


def usage() -> str:
  """The text of ``python -m launch.train --help``."""
  from models import presets   # imports jax.numpy: only when help is asked for
  lines = [
      "usage: python -m launch.train --config configs/<job>.py[:<variant>,...] [--config.<key>=<value> ...] "
      "[--workdir DIR] [--show]",
      "",
      "One launcher runs every job: the config file says which, and its docstring is its runbook.",
      "",
      "job configs:",
  ]
  configs = job_configs()
  width = max(len(p) for p, _ in configs)
  for path, purpose in configs:
    lines.append(f"  {path:<{width}}  {purpose}")
  lines += ["", "variants (--config file.py:<variant>,<variant>; each config takes the ones listed with it):"]
  used = {}
  for path, _ in configs:
    module = load_module(os.path.join(ROOT, path))
    defaults = variant_defaults(module)
    for key in defaults:
      used.setdefault(key, module)
    shown = [k if isinstance(v, bool) else f"{k}=<...>" + (f" (default {v})" if v else "")
             for k, v in defaults.items()]
    lines.append(f"  {path:<{width}}  {', '.join(shown)}")
  lines.append("")
  for key, module in used.items():
    lines.append(f"  {key:<10} {VARIANT_HELP.get(key, '')}{_variant_choices(key, module)}")
  lines += [
      "",
      f"model presets (model=<preset>; models/presets.py): {', '.join(presets.names())}",
      "",
      "flags:",
      "  --config FILE[:VARIANTS]   the job config (required)",
      "  --config.<key>=<value>     override one key, e.g. --config.train.total_steps=50; the config is locked, so a",
      "                             misspelt key fails; --show prints every key",
      "  --workdir DIR              the run folder (default runs/<config>-<time>); an existing one resumes",
      "  --show                     print the resolved config (YAML) and the pre-run checks, then exit: nothing is",
      "                             built or compiled",
      "  --helpfull                 every flag, absl's included (multi-host: --coordinator_address, ...)",
      "",
      "examples:",
      "  python -m launch.train --config configs/grpo_tpu.py:runlocal --workdir runs/grpo-local",
      "  python -m launch.train --config configs/grpo_tpu.py:runlocal --config.train.total_steps=20 --show",
      "  python -m launch.train --config configs/gspo_tpu.py:runlocal,algo=cispo",
      "  python -m launch.aot --config configs/grpo_tpu.py:model=llama-3.1-8b     # does a pod config fit its slice?",
      "",
      f"A mistake in the command line or the config stops the launch in one line that names the key, file or path "
      f"and the fix; {TRACEBACK_SWITCH}=1 shows the Python traceback as well.",
  ]
  return "\n".join(lines)


def check_config_arg(spec: str):
  """Loads ``--config``'s file and calls its ``get_config`` with the variants, so that a missing file, an unknown
  variant or a bad value stops in one line (absl would print config_flags' traceback); returns the config.

  Raises:
    SystemExit: naming the file and variant, with the choices and a suggestion.
  """
  path, has_arg, arg = spec.partition(":")
  configs = ", ".join(p for p, _ in job_configs())
  if not os.path.isfile(path):
    what = "is a folder" if os.path.isdir(path) else "no such file"
    raise SystemExit(f"--config {spec}: {what} {path!r}; pass a config file, one of {configs} (python -m "
                     f"launch.train --help describes them)")
  module = load_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise SystemExit(f"--config {spec}: {path} has no get_config function; pass one of {configs}")
  try:
    config = module.get_config(arg) if has_arg else module.get_config()
  except ValueError as e:
    if show_tracebacks():
      raise
    keys = list(variant_defaults(module))
    given = [item.partition("=")[0].strip() for item in arg.split(",")]
    unknown = [k for k in given if k and k not in keys]
    close = difflib.get_close_matches(unknown[0], keys, n=1) if unknown else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SystemExit(f"--config {spec}: {e}{hint}; python -m launch.train --help lists every config's variants") \
        from None
  from models import presets
  for item in arg.split(","):
    key, _, value = (part.strip() for part in item.partition("="))
    if key == "model" and value not in presets.names():
      close = difflib.get_close_matches(value, presets.names(), n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise SystemExit(f"--config {spec}: model={value!r} is not a model preset; {hint}choose one of "
                       f"{', '.join(presets.names())} (models/presets.py)")
  return config


def check_overrides(spec: str, args: list[str], config=None) -> None:
  """Every ``--config.<key>[=<value>]`` in ``args`` against the keys of the config ``spec`` names (``config``: that
  config when the caller built it already, ``check_config_arg``), so that a key it does not have stops in one line
  naming the closest one (config_flags' own message spans two lines).

  Raises:
    SystemExit: naming the override, the missing key and a suggestion (or the keys that exist there).
  """
  overrides = [a for a in args if re.match(r"^--?config\.", a)]
  if not overrides:
    return
  if config is None:
    path, has_arg, arg = spec.partition(":")
    module = load_module(path)
    config = module.get_config(arg) if has_arg else module.get_config()
  for flag in overrides:
    name_part, eq, value = flag.partition("=")
    parts = name_part.split(".", 1)[1].split(".")
    node, done = config, []
    for i, part in enumerate(parts):
      name = part.split("[", 1)[0]
      if not hasattr(node, "keys"):   # inside a list or tuple value: config_flags checks the rest
        break
      if name not in node:
        keys = sorted(node.keys())
        close = difflib.get_close_matches(name, keys, n=1)
        fixed = "--config." + ".".join(done + close + parts[i + 1:]) + eq + value
        hint = (f"did you mean {fixed}?" if close else
                f"the keys {'of ' + '.'.join(done) if done else 'at the top'} are {', '.join(keys)}")
        raise SystemExit(f"{flag}: the config has no key {'.'.join(done + [name])!r}; {hint} (the config is "
                         f"locked: every key must exist; --show prints them)")
      node, done = node[name], done + [name]


# ------------------------------------------------------------------------------------------------------------
# --show
# ------------------------------------------------------------------------------------------------------------

def config_yaml(config) -> str:
  """The config as YAML: nested sections, lists and tuples of scalars inline, strings with line breaks quoted."""
  import yaml   # PyYAML comes with ml_collections

  class Dumper(yaml.SafeDumper):
    pass

  def text(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

  Dumper.add_representer(str, text)
  Dumper.add_representer(tuple, lambda dumper, value: dumper.represent_list(value))
  try:
    return yaml.dump(config.to_dict(), Dumper=Dumper, default_flow_style=None, sort_keys=True, width=120,
                     allow_unicode=True).rstrip()
  except yaml.representer.RepresenterError:   # a value YAML has no tag for (an object set in Python): JSON
    return config.to_json_best_effort(indent=2, sort_keys=True)


def show(config, *, spec: str, workdir: str, checks: list[tuple[str, Callable[[], list[str] | None]]]) -> None:
  """Prints the resolved config, then runs ``checks`` (``(name, fn)``; ``fn`` returns the lines of what passed)
  and prints each result. A failing check raises its one-line SystemExit, as the launch would."""
  print(f"# {spec}, resolved (every key can be overridden with --config.<key>=<value>)", flush=True)
  print(config_yaml(config), flush=True)
  print("# pre-run checks (the launch runs the same; nothing was built or compiled):", flush=True)
  for name, fn in checks:
    passed = fn() or []
    print(f"#   ok  {name}", flush=True)
    for line in passed:
      print(f"#   ok    {line}", flush=True)
  from launch import relaunch
  if relaunch.has_work(workdir):   # the relaunch comparison the launch runs: a refused change stops here too
    accepted = []
    relaunch.check(config, workdir, write=False, print_fn=accepted.append)
    state = "holds checkpoints: the job resumes from its newest, with the config it was started with"
    state += "".join(f"\n#   {line}" for line in accepted)
  else:
    state = "exists, no checkpoint yet" if os.path.isdir(workdir) else "new: the job creates it"
  print(f"# workdir {workdir}: {state}", flush=True)
