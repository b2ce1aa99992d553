"""`python -m dsv2_jax` end to end on a tiny run, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = [
    "--config", str(REPO / "configs" / "tiny.py") + ":steps=4,seq_len=32,batch_size=4,dataset=lee_news",
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.ffn_hidden=64",
    "--config.train.warmup_steps=1", "--config.train.log_every=2",
    "--config.eval.max_batches=2", "--config.eval.batch_size=32",
    "--config.sample.max_new_tokens=5",
]


def cli(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv2_jax", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("cli") / "run"
  out = cli("train", *TINY, f"--config.data.data_dir={data_dir}", "--workdir", str(workdir))
  return workdir, out.stdout


def test_train_writes_metrics_eval_and_prints_figures(trained):
  workdir, stdout = trained
  assert "bits/byte" in stdout and "sample:" in stdout
  result = json.loads((workdir / "eval.json").read_text())
  assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 4


def test_eval_on_trained_workdir(trained):
  workdir, _ = trained
  out = cli("eval", "--workdir", str(workdir), "--json")
  result = json.loads(out.stdout)
  assert result["step"] == 4 and result["tokens"] > 0 and result["bits_per_byte"] > 0


def test_generate_on_trained_workdir(trained):
  workdir, _ = trained
  out = cli("generate", "--workdir", str(workdir), "--prompt", "History of",
            "--max_new_tokens", "12", "--temperature", "0")
  assert out.stdout.startswith("History of")


def test_info_prints_parameter_count():
  out = cli("info", "--config", str(REPO / "configs" / "tiny.py"), "--json")
  report = json.loads(out.stdout)
  assert report["total_params"] == sum(report["breakdown"].values()) > 1_000_000


@pytest.mark.parametrize("args,message", [
    (["train", "--workdir", "/tmp/x", "--config", str(REPO / "configs" / "tiny.py"),
      "--config.model.num_heads=3"], "model.num_heads=3 does not divide"),
    (["eval", "--workdir", "/nonexistent/run"], "config.json not found"),
    (["generate"], "--workdir is required"),
])
def test_bad_input_is_one_clear_line(args, message):
  out = cli(*args, check=False)
  assert out.returncode == 2
  assert message in out.stderr and "Traceback" not in out.stderr
