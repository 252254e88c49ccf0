"""The layer edges of docs/architecture.md: who imports what, and which modules name no algorithm."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHM_NAMES = {"grpo", "gdpo", "p3o", "dno", "rloo"}


def _modules(folder: str):
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    for f in files:
      if f.endswith(".py"):
        yield os.path.relpath(os.path.join(root, f), REPO)


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      out.add(node.module.split(".")[0])
  return out


@pytest.mark.parametrize("folder,allowed", [
    ("configs", {"ml_collections", "configs", "__future__"}),
    ("algorithms", {"jax", "chex", "numpy", "algorithms", "__future__", "typing", "functools", "math"}),
])
def test_folder_imports_only(folder, allowed):
  for path in _modules(folder):
    assert _imports(path) <= allowed, (path, sorted(_imports(path) - allowed))


@pytest.mark.parametrize("folder", ["models", "rewards"])
def test_folder_imports_nothing_from_the_engine(folder):
  for path in _modules(folder):
    assert not _imports(path) & {"rlj", "launch", "configs"}, path


def _names_in_code(path: str) -> set[str]:
  """Identifiers and string constants of a module, docstrings and example config paths excluded."""
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  out = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        and "configs/" not in node.value):   # a usage line's example config file is no algorithm decision
      out.update(node.value.lower().replace(".", " ").replace("_", " ").replace("/", " ").split())
    elif isinstance(node, ast.Name):
      out.add(node.id.lower())
    elif isinstance(node, ast.Attribute):
      out.add(node.attr.lower())
  return out


@pytest.mark.parametrize("path", ["rlj/rl_loop.py", "launch/aot.py", "launch/aot_tools/shapes.py", "launch/builders.py",
                                  "launch/checks.py", "launch/train.py", "rlj/programs.py"])
def test_engine_and_launcher_name_no_algorithm(path):
  assert not _names_in_code(path) & ALGORITHM_NAMES, sorted(_names_in_code(path) & ALGORITHM_NAMES)


def test_config_rules_are_the_engine_rules():
  from configs import common
  from rlj import sharding
  assert tuple(common.DEFAULT_RULES) == tuple(sharding.DEFAULT_RULES)
