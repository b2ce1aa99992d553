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
      common.load_config(spec, overrides)
      checked += 1
    for module in re.findall(r"python -m (experiments\.\w+)", line):
      assert importlib.util.find_spec(module) is not None, module
      checked += 1
  assert checked >= 10
