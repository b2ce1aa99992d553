"""Standing promises: README's commands, CI calling the README test command, notebook syntax."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex

from experiments import common
from tests.helpers import REPO


def readme_commands() -> list[str]:
  text = (REPO / "README.md").read_text()
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_opens_with_main_job_and_test_commands():
  main_job, tests = readme_commands()[:2]
  assert "python -m dsv2_jax train --config configs/tiny.py" in main_job
  assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  ci = (REPO / ".ci" / "run").read_text()
  assert readme_commands()[1] in ci


def test_colab_notebook_code_parses():
  notebook = json.loads((REPO / "colab" / "quickstart.ipynb").read_text())
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      source = "".join(line for line in cell["source"] if not line.lstrip().startswith("!"))
      ast.parse(source)


def test_readme_commands_name_configs_and_modules_that_exist():
  """Every `--config FILE[:args] [--config.a.b=v]` in README.md loads and validates, and
  every `python -m experiments.NAME` names a module (the commands were also run by hand)."""
  lines = [line.split("#")[0] for block in readme_commands() for line in block.splitlines()]
  checked = 0
  for line in lines:
    words = shlex.split(line.replace("[", "").replace("]", ""))
    if "--config" in words and "DIR" not in line:
      spec = words[words.index("--config") + 1]
      overrides = [w for w in words if w.startswith("--config.")]
      for flag, field in (("--init_from", "train.init_from"), ("--reward_from", "rlhf.reward_from")):
        if flag in words:  # The CLI sets these fields from its flags.
          overrides.append(f"--config.{field}={words[words.index(flag) + 1]}")
      common.load_config(spec, overrides)
      checked += 1
    for module in re.findall(r"python -m (experiments\.\w+)", line):
      assert importlib.util.find_spec(module) is not None, module
      checked += 1
  assert checked >= 10


def imported_modules(path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return names


def test_parallel_is_model_agnostic_and_model_has_no_import_cycle():
  for path in (REPO / "dsv2_jax" / "parallel").glob("*.py"):
    assert not any(m.startswith("dsv2_jax.model") for m in imported_modules(path)), path
  model = REPO / "dsv2_jax" / "model"
  graph = {p.stem: {m.split(".")[2] for m in imported_modules(p)
                    if m.startswith("dsv2_jax.model.") and m.split(".")[2] != p.stem}
           for p in model.glob("*.py")}

  def reaches(start, target, seen=()):
    return any(n == target or (n not in seen and reaches(n, target, seen + (n,)))
               for n in graph.get(start, ()))
  assert not [m for m in graph if reaches(m, m)]
