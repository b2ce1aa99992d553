"""`python -m dsv2_jax quantize`: a trained run's weights stored as `quant.rules` says.

The output is a workdir like any other (config.json, parent.json, checkpoints/) whose
checkpoint holds only parameters: INT8 weights as `blocks.QTensor` (int8 values in the
weight's shape + f32 block scales), bf16/fp16 weights in that dtype, the rest as
trained. Its config has `quant.exported = True`, so `eval` and `generate` read it with
`restore` and the model multiplies by the INT8 weights directly (`quant.int8_dot`).
`quantized.json` reports bytes per tensor group against f32 and bf16.

A run trained without `quant.rules` gives post-training quantization (PTQ); a QAT run
gives exactly the weights its forward pass used (the same rounding of the same master
weights).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax.parallel import sharding
from dsv2_jax.quant import blocks, rules as rules_lib
from dsv2_jax.quant.qat import QAT
from dsv2_jax.train.checkpoint import Checkpointer

REPORT_FILE = "quantized.json"


class QuantizeError(ValueError):
  """Bad input to `quantize` (a missing run, an output that already holds one)."""


def stored_abstract(quant: QAT, abstract_params: Any, int8_dot: bool) -> Any:
  """Shapes and dtypes of `quant.store(params)` (QTensor leaves where INT8)."""
  return jax.eval_shape(lambda p: quant.store(p, int8_dot), abstract_params)


def stored_shardings(stored: Any, boxed_params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Each stored leaf where its float parameter lives; block scales replicated."""
  shardings = sharding.logical_shardings(boxed_params, mesh)
  replicated = sharding.replicated(mesh)
  return jax.tree.map(
      lambda leaf, s: leaf.replace(qvalue=s, scale=replicated)
      if isinstance(leaf, blocks.QTensor) else s,
      stored, shardings, is_leaf=lambda x: isinstance(x, blocks.QTensor))


def restore(checkpointer: Checkpointer, quant: QAT, boxed_params: Any,
            mesh: jax.sharding.Mesh, int8_dot: bool) -> tuple[Any, Any, int]:
  """(stored params, their shardings, step) of an exported workdir's checkpoint."""
  stored = stored_abstract(quant, nn.meta.unbox(boxed_params), int8_dot)
  shardings = stored_shardings(stored, boxed_params, mesh)
  step = checkpointer.latest_step()
  return checkpointer.restore_params(step, stored, shardings), shardings, step


def _group(path: str, plan: rules_lib.Plan) -> str:
  entry = plan.rule_of(path)
  return entry[0].module if entry else "other"


def bytes_report(params: Any, stored: Any, plan: rules_lib.Plan) -> dict[str, Any]:
  """Per tensor group (each rule's module, and 'other'): parameters and bytes as f32,
  as bf16 and as stored (INT8 values + scales)."""
  groups: dict[str, dict[str, Any]] = {}
  flat_stored = dict(jax.tree_util.tree_flatten_with_path(
      stored, is_leaf=lambda x: isinstance(x, blocks.QTensor))[0])
  for keys, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = rules_lib.path_of(keys)
    g = groups.setdefault(_group(path, plan), {"params": 0, "f32_bytes": 0, "bf16_bytes": 0,
                                               "stored_bytes": 0})
    s = flat_stored[keys]
    g["params"] += int(w.size)
    g["f32_bytes"] += int(w.size) * 4
    g["bf16_bytes"] += int(w.size) * 2
    g["stored_bytes"] += int(s.nbytes)
    entry = plan.rule_of(path)
    g.setdefault("format", f"int8 {entry[0].layout} blocks" if isinstance(s, blocks.QTensor)
                 else str(np.dtype(s.dtype)))
  total = {k: sum(g[k] for g in groups.values())
           for k in ("params", "f32_bytes", "bf16_bytes", "stored_bytes")}
  for g in [*groups.values(), total]:
    g["f32_over_stored"] = g["f32_bytes"] / g["stored_bytes"]
  return {"groups": groups, "total": total}


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export(source: str | pathlib.Path, out: str | pathlib.Path, rules: str | None = None,
           block: str | None = None, int8_dot: bool = False) -> dict[str, Any]:
  """Writes the quantized workdir `out` from the run at `source`; returns the report.

  rules / block: `quant.rules` / `quant.block` (default: the run's own, else
  `rules.default_rules`). Raises ConfigError / QuantizeError / CheckpointError (bad input)
  before anything is written to `out`.
  """
  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train import stages, trainer
  source, out = pathlib.Path(source).expanduser().resolve(), pathlib.Path(out).expanduser()
  config = trainer.inference_config(trainer.load_config(source))
  if config.quant.exported:
    raise QuantizeError(f"{source} is already a quantized export; quantize the run it came "
                        "from (see its parent.json).")
  q = config.quant
  q.rules = rules or q.rules or rules_lib.default_rules(config.model)
  q.block = block or q.block
  config_lib.validate(config)
  run = trainer.Run(config, source)
  if run.checkpointer.latest_step() is None:
    raise QuantizeError(f"{source} has no checkpoint yet: train it first.")
  if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
    raise QuantizeError(f"--out {out} already holds checkpoints; choose a new directory.")
  params, _, step = run.trained_params(rounded=False)  # The float master weights.
  stored = jax.jit(lambda p: run.quant.store(p, int8_dot))(params)
  trainer.prepare_workdir(out.resolve())
  out = out.resolve()
  q.exported, q.int8_dot = True, int8_dot
  (out / "config.json").write_text(config_lib.to_json(config))
  checkpointer = Checkpointer(out / "checkpoints", max_to_keep=1, use_async=False)
  try:
    checkpointer.save(step, {"params": stored}, None)
  finally:
    checkpointer.close()
  stages.write_parent(out, {"path": str(source), "step": int(step),
                            "config_hash": stages.config_hash(source),
                            "dataset": config.data.dataset, "seq_len": config.data.seq_len,
                            "quantized": q.rules, "block": q.block})
  report = bytes_report(params, stored, run.quant.plan)
  report.update(source=str(source), step=int(step), rules=q.rules, block=q.block,
                int8_dot=int8_dot, disk_bytes=_disk_bytes(out / "checkpoints"))
  (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  return report


def format_report(report: dict[str, Any]) -> str:
  """A table of the bytes per tensor group."""
  lines = [f"quantized {report['source']} (step {report['step']}) as {report['rules']} "
           f"(block {report['block']})",
           f"{'group':<10} {'format':<22} {'params':>11} {'f32 MiB':>9} {'bf16 MiB':>9} "
           f"{'stored MiB':>10} {'f32/stored':>10}"]
  mib = lambda b: f"{b / 2**20:.3f}"  # noqa: E731
  rows = [*report["groups"].items(), ("total", {**report["total"], "format": ""})]
  for name, g in rows:
    lines.append(f"{name:<10} {g['format']:<22} {g['params']:>11,} {mib(g['f32_bytes']):>9} "
                 f"{mib(g['bf16_bytes']):>9} {mib(g['stored_bytes']):>10} "
                 f"{g['f32_over_stored']:>9.2f}x")
  lines.append(f"on disk: {mib(report['disk_bytes'])} MiB (checkpoint files)")
  return "\n".join(lines)
