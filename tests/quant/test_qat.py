"""Quantization-aware training, export and the quantize command end to end.

Checked: quant.rules parsing and matching (a rule that matches nothing is an error), the
penalty weight's exponential decay 0.1 -> 0.01, a QAT run logging its penalty, the export
holding exactly the weights the QAT forward pass used (same logits), the bytes report,
post-training quantization of a float run, and every bad input of `quantize` as one line
with exit status 2 and nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.quant import blocks, export, qat as qat_lib, rules as rules_lib
from dsv2_jax.train import trainer
from tests import helpers
from tests.helpers import REPO, tiny_config


def test_rules_parse():
  rules = rules_lib.parse("ffn=int8, experts=int8:channel,attention=fp16", "4x4")
  assert [str(r) for r in rules] == ["ffn=int8:4x4", "experts=int8:channel", "attention=fp16"]
  assert rules_lib.parse("", "4x4") == ()
  for text, message in [("ffn=int8,ffn=bf16", "twice"), ("mlp=int8", "is not a module"),
                        ("ffn=int4", "no valid format"), ("ffn=bf16:4x4", "no valid format"),
                        ("ffn=int8:0x4", "is not a block shape")]:
    with pytest.raises(ValueError, match=message):
      rules_lib.parse(text, "4x4")


def boxed_params(**fields):
  model = helpers.build_model(helpers.small_model_config(**fields))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 8), jnp.int32))["params"])


def test_plan_matches_modules_and_rejects_rules_that_match_nothing():
  plan = rules_lib.plan(rules_lib.parse("ffn=int8,attention=bf16", "4x4"), boxed_params())
  assert sorted(plan.entries) == sorted(
      [f"layers/ffn/{n}/w" for n in ("up", "gate", "down")]
      + [f"layers/attention/{n}/w" for n in ("query", "key", "value", "out")])
  plan = rules_lib.plan(rules_lib.parse("experts=int8,router=int8", "4x4"),
                        boxed_params(moe=helpers.MOE))
  assert {p.rsplit("/", 1)[-1] for p in plan.entries} == {"w_in", "w_out", "w", "gate_out"}
  with pytest.raises(ValueError, match="experts=int8:4x4 matches no parameter"):
    rules_lib.plan(rules_lib.parse("experts=int8", "4x4"), boxed_params())
  with pytest.raises(ValueError, match="head=bf16 matches no parameter"):
    rules_lib.plan(rules_lib.parse("head=bf16", "4x4"), boxed_params(tie_embeddings=True))


def test_penalty_weight_decays_exponentially_from_0p1_to_0p01():
  q = qat_lib.QAT(rules_lib.Plan({}), 0.1, 0.01, steps=100)
  np.testing.assert_allclose([float(q.penalty_weight(s)) for s in (0, 50, 100)],
                             [0.1, np.sqrt(0.1 * 0.01), 0.01], rtol=1e-6)
  assert float(qat_lib.QAT(rules_lib.Plan({}), 0.0, 0.0).penalty_weight(7)) == 0.0


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("qat") / "run"
  c = tiny_config(data_dir)
  c.quant.rules = "ffn=int8,attention=fp16"
  c.train.update(log_every=1, checkpoint_every=0)
  trainer.train_and_evaluate(c, workdir)
  return workdir


def test_qat_run_logs_its_penalty_and_schedule(qat_run):
  lines = [json.loads(x) for x in (qat_run / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in lines if "quant/penalty" in x]
  assert len(train) == 6 and all(x["quant/penalty"] > 0 for x in train)
  want = [0.1 * 0.1 ** ((x["step"] - 1) / 6) for x in train]  # lambda at the step's start.
  np.testing.assert_allclose([x["quant/lambda"] for x in train], want, rtol=1e-5)


def test_export_holds_the_weights_qat_used(qat_run, tmp_path):
  report = export.export(qat_run, tmp_path / "int8")
  qat = trainer.Run(trainer.load_config(qat_run), qat_run)
  used, _, step = qat.trained_params()  # The rounded weights of QAT's forward pass.
  stored_cfg = trainer.load_config(tmp_path / "int8")
  assert stored_cfg.quant.exported and report["step"] == step
  run = trainer.Run(stored_cfg, tmp_path / "int8")
  stored, _, _ = run.trained_params()
  up = stored["layers"]["ffn"]["up"]["w"]
  assert isinstance(up, blocks.QTensor) and up.qvalue.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(blocks.dequantize(up)),
                                np.asarray(used["layers"]["ffn"]["up"]["w"]))
  assert stored["layers"]["attention"]["query"]["w"].dtype == jnp.float16
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(run.model.apply({"params": stored}, tokens)),
                                np.asarray(qat.model.apply({"params": used}, tokens)))
  groups = report["groups"]
  assert groups["ffn"]["f32_over_stored"] == pytest.approx(4 / (1 + 4 / 16))  # f32 scales.
  assert groups["attention"]["f32_over_stored"] == 2.0 and groups["other"]["format"] == "float32"
  assert json.loads((tmp_path / "int8" / export.REPORT_FILE).read_text())["rules"] == \
      "ffn=int8,attention=fp16"


def test_post_training_quantization_of_a_float_run(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.train.update(steps=2, checkpoint_every=0)
  trainer.train_and_evaluate(c, tmp_path / "run")
  report = export.export(tmp_path / "run", tmp_path / "ptq", block="channel", int8_dot=True)
  assert report["rules"] == "ffn=int8,attention=fp16" and report["groups"]["ffn"]["f32_over_stored"] > 3.5  # 1 + 4 / K bytes
  run = trainer.Run(trainer.load_config(tmp_path / "ptq"), tmp_path / "ptq")
  params, _, _ = run.trained_params()
  assert params["layers"]["ffn"]["down"]["w"].dot == "int8"
  tokens = jnp.zeros((1, 8), jnp.int32)
  assert np.isfinite(np.asarray(run.model.apply({"params": params}, tokens))).all()


def quantize_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dsv2_jax", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)


def test_cli_bad_input_is_one_line_and_writes_nothing(qat_run, tmp_path):
  out = tmp_path / "out"
  cases = [
      (["quantize", "--workdir", str(tmp_path / "missing"), "--out", str(out)],
       "config.json not found"),
      (["quantize", "--workdir", str(qat_run), "--out", str(out), "--rules", "experts=int8"],
       "matches no parameter of this model"),
      (["quantize", "--workdir", str(qat_run), "--out", str(out), "--block", "0x4"],
       "quant.block='0x4' is not a block shape"),
      (["quantize", "--workdir", str(qat_run)], "quantize needs --out"),
      (["eval", "--workdir", str(qat_run), "--int8_dot"], "--int8_dot needs a quantized"),
  ]
  for args, message in cases:
    proc = quantize_cli(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
    assert not out.exists()
  proc = quantize_cli("quantize", "--workdir", str(qat_run), "--out", str(out), "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["total"]["params"] > 0
  proc = quantize_cli("quantize", "--workdir", str(qat_run), "--out", str(out))
  assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
