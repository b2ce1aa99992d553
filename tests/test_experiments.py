"""experiments/common.py: config specs as the CLI reads them, the JSON report, the machine."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from experiments import common


def test_config_spec_takes_arguments_then_overrides():
  spec = common.with_args("configs/tiny.py:steps=7", "moe=8x2", "")
  assert spec == "configs/tiny.py:steps=7,moe=8x2"
  assert common.with_args("configs/tiny.py", "remat=full") == "configs/tiny.py:remat=full"
  c = common.load_config(spec, ["--config.model.num_layers=2", "--config.seed=3"])
  assert (c.train.steps, c.model.moe.num_experts, c.model.num_layers, c.seed) == (7, 8, 2, 3)


def test_parse_args_keeps_config_overrides_and_rejects_other_flags():
  parser = argparse.ArgumentParser()
  common.add_config_flag(parser, "configs/tiny.py")
  args = common.parse_args(parser, ["--config", "configs/tiny.py:steps=5",
                                    "--config.model.d_model=64"])
  assert args.config == "configs/tiny.py:steps=5"
  assert args.overrides == {"config": ["--config.model.d_model=64"]}
  with pytest.raises(SystemExit):
    common.parse_args(parser, ["--nope=1"])


def test_write_records_the_machine_and_skips_the_plot_without_matplotlib(
    tmp_path, monkeypatch, capsys):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
  plotted = []
  common.write({"summary": {"x": 1}}, str(tmp_path / "r.json"), plotted.append)
  out = capsys.readouterr().out
  assert not plotted and "plot skipped" in out and "'.[bench]'" in out
  machine = json.loads((tmp_path / "r.json").read_text())["machine"]
  assert {"cpu", "avx512", "amx", "backend", "device", "jax"} <= set(machine)
  assert isinstance(machine["avx512"], bool) and machine["cpu"]


def _run_experiment(*args: str) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.helpers import REPO  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # ~90 s on 2 cores; the suite is meant for accelerators.
def test_accelerator_suite_dry_run(tmp_path):
  """experiments/accelerator_suite.sh end to end at tiny sizes on this backend (DRY=1):
  every benchmark writes its JSON with the device, the GPU-only cuDNN case is skipped
  with its reason on a CPU."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.helpers import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable)
  proc = subprocess.run(["bash", str(REPO / "experiments" / "accelerator_suite.sh")],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["files"] == ["dsa.json", "moe.json", "throughput.json"]
  assert summary["device"] and summary["machine"]["cpu"]
  dsa = json.loads((tmp_path / "dsa.json").read_text())
  cudnn = [r for r in dsa["records"] if r["impl"] == "dense_cudnn"]
  if summary["backend"] != "gpu":
    assert cudnn and all("needs a GPU" in r["skipped"] for r in cudnn)
  assert any(r["impl"] == "dsa_fraction" and r.get("fwd_ms") for r in dsa["records"])
  moe = json.loads((tmp_path / "moe.json").read_text())
  assert {r["impl"] for r in moe["records"]} >= {"moe_tiled", "moe_ragged_dot", "dense_ffn"}


@pytest.mark.slow
def test_long_context_rag_and_decode_speed_quick_runs(tmp_path, data_dir):
  """The issue-14 experiments still run end to end (--quick; a few minutes)."""
  work = tmp_path / "lc"
  _run_experiment("experiments.long_context", "--quick", "--workdir", str(work),
                  "--data_dir", data_dir, "--out", str(tmp_path / "lc.json"))
  result = json.loads((tmp_path / "lc.json").read_text())
  assert set(result["summary"]) >= {"stage1", "pi", "yarn"} and result["stride"]
  _run_experiment("experiments.rag", "--quick", "--run", str(work / "stage1"), "--data_dir",
                  data_dir, "--query_tokens", "32", "--stride", "32", "--passage_tokens", "64",
                  "--out", str(tmp_path / "rag.json"))
  rag = json.loads((tmp_path / "rag.json").read_text())
  assert rag["bpb"]["native"]["tokens"] == rag["bpb"]["rag"]["tokens"]
  _run_experiment("experiments.decode_speed", "--quick", "--no_hf",
                  "--out", str(tmp_path / "decode.json"))


@pytest.mark.slow
def test_stage3_experiments_quick_runs(tmp_path, data_dir):
  """The issue-15 experiments still run end to end (--quick; about 10 minutes)."""
  pytest.importorskip("sklearn")  # The reward model's baseline (the `bench` extra).
  _run_experiment("experiments.instruction_tuning", "--quick", "--workdir", str(tmp_path / "it"),
                  "--data_dir", data_dir, "--out", str(tmp_path / "it.json"))
  it = json.loads((tmp_path / "it.json").read_text())
  assert set(it["held_out"]) == {"base", "sft"}
  _run_experiment("experiments.reward_model", "--quick", "--workdir", str(tmp_path / "rm"),
                  "--data_dir", data_dir, "--out", str(tmp_path / "rm.json"))
  rm = json.loads((tmp_path / "rm.json").read_text())
  assert 0.0 <= rm["summary"]["reward_mean"]["pairwise_accuracy"] <= 1.0
  _run_experiment("experiments.rlhf", "--quick", "--workdir", str(tmp_path / "rl"),
                  "--policy", str(tmp_path / "it" / "sft"),
                  "--reward", str(tmp_path / "rm" / "reward_mean"), "--data_dir", data_dir,
                  "--out", str(tmp_path / "rl.json"))
  rl = json.loads((tmp_path / "rl.json").read_text())
  assert set(rl["summary"]) == {"ppo", "dpo"}


@pytest.mark.slow
def test_quantization_experiment_quick_runs(tmp_path, data_dir):
  """experiments/quantization.py runs end to end (--quick; about 8 minutes): every
  variant is scored, the QAT exports score like their runs, the speed cases all ran."""
  _run_experiment("experiments.quantization", "--quick", "--workdir", str(tmp_path / "q"),
                  "--data_dir", data_dir, "--out", str(tmp_path / "q.json"))
  q = json.loads((tmp_path / "q.json").read_text())
  assert set(q["quality"]["dense"]["figures"]) == {
      "f32", "qat_4x4", "qat_4x4_no_penalty", "qat_channel", "qwix_channel", "ptq_4x4",
      "ptq_channel"}
  assert "qwix_channel" not in q["quality"]["moe"]["figures"]
  assert set(q["speed"]["cases"]) == {"f32", "bf16", "int8_weight_only_4x4", "int8_dot_4x4",
                                      "int8_weight_only_channel", "int8_dot_channel"}
  assert [r["experts_keep"] for r in q["experts"]["rows"]] == [8, 4, 2]
  assert q["experts"]["rows"][-1]["param_bytes"] < q["experts"]["rows"][0]["param_bytes"]


def test_mla_cache_table_reproduces_the_papers_cut():
  """experiments/mla_cache.py: cache bytes from the models' own cache shapes (DeepSeek-V2
  against MHA, GQA and DeepSeek 67B); the decode timing runs under -m slow."""
  from experiments import mla_cache  # pylint: disable=g-import-not-at-top
  table = mla_cache.cache_table()
  v2 = table["models"]["deepseek_v2"]
  assert v2["values_per_token"] == 60 * (512 + 64) and v2["bytes_per_token"] == 69_120
  assert table["models"]["v2_mha"]["values_per_token"] == 60 * 2 * 128 * 128
  assert table["models"]["deepseek_67b"]["values_per_token"] == 95 * 2 * 8 * 128
  assert abs(table["paper_cut_6bit"] - mla_cache.PAPER_CUT) < 0.001  # 93.3% at 6 bits.
  assert abs(table["cut_vs_67b_same_dtype"] - 0.822) < 0.001


@pytest.mark.slow
def test_mla_cache_decode_timing_runs():
  from experiments import mla_cache  # pylint: disable=g-import-not-at-top
  args = mla_cache.argparse.Namespace(width=32, layers=1, heads=4, kv_heads=2, latent=8,
                                      rope=4, batch=2, context=32, rounds=1)
  cases = mla_cache.decode_speeds(args)["cases"]
  assert set(cases) == {"mha", "gqa", "mla"}
  assert all(c["tokens_per_s"] > 0 for c in cases.values())
  assert cases["mla"]["cache_mib"] < cases["gqa"]["cache_mib"] < cases["mha"]["cache_mib"]


@pytest.mark.slow
def test_layout_quality_quick_runs(tmp_path, data_dir):
  """experiments/layout_quality.py end to end at 2 steps, two seeds (about 2 minutes)."""
  _run_experiment("experiments.layout_quality", "--variants", "article_gmoe,deepseek_v2",
                  "--seeds", "0,1", "--steps", "2", "--workdir", str(tmp_path / "lq"),
                  "--data_dir", data_dir, "--out", str(tmp_path / "lq.json"))
  result = json.loads((tmp_path / "lq.json").read_text())
  v2 = result["variants"]["deepseek_v2"]
  assert set(v2["bits_per_byte"]) == {"0", "1"} and v2["standard_error"] is not None
  assert result["variants"]["article_gmoe"]["minus_baseline"] == 0.0
