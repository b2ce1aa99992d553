"""Training stages: a run that starts from another run's final parameters.

The article trains in three stages (SPEC 2.1): base pretraining, long-context
adaptation, instruction tuning. Here a stage is just a config (its data, sequence
length, schedule, attention and RoPE settings) plus `train.init_from=PARENT_WORKDIR`:
the new run's parameters are the parent's latest checkpoint; its optimizer state,
step, RNG and data position start fresh. The parameters are restored straight into
the new run's shardings, so the parent may have used any mesh.

The new workdir records its parent in `parent.json` (path, step, a hash of the
parent's config.json), so a chain of runs is traceable; `info --workdir` prints it.
A resumed run restores its own checkpoints and ignores `init_from`.

The output head may change between stages (`model.head`): a reward model starts from a
language model's trunk, its scalar head freshly initialised and the parent's
vocabulary head left behind. Every other parameter must match in shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsv2_jax import config as config_lib
from dsv2_jax.model.transformer import build_model
from dsv2_jax.train.checkpoint import Checkpointer, CheckpointError

PARENT_FILE = "parent.json"
HEAD_PARAMS = ("head", "score_head")  # Top-level parameters of the output heads.


class StageError(ValueError):
  """`train.init_from` names a run this one cannot start from."""


def config_hash(workdir: str | pathlib.Path) -> str:
  """The first 16 hex digits of the SHA-256 of a workdir's config.json."""
  return hashlib.sha256((pathlib.Path(workdir) / "config.json").read_bytes()).hexdigest()[:16]


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _without(tree: Any, names: tuple[str, ...]) -> Any:
  return {k: v for k, v in tree.items() if k not in names}


def _shape_mismatch(parent: Any, child: Any) -> str | None:
  """The first difference between two abstract parameter trees, in words, or None."""
  parent_leaves = dict((_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(parent)[0])
  child_leaves = dict((_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(child)[0])
  for name in sorted(child_leaves.keys() - parent_leaves.keys()):
    return f"{name} exists here but not in the parent"
  for name in sorted(parent_leaves.keys() - child_leaves.keys()):
    return f"{name} exists in the parent but not here"
  for name in sorted(child_leaves):
    if parent_leaves[name].shape != child_leaves[name].shape:
      return (f"{name} is {list(parent_leaves[name].shape)} in the parent and "
              f"{list(child_leaves[name].shape)} here")
  return None


def params_key(config: ml_collections.ConfigDict) -> str:
  """Where a run's checkpoints keep its (policy's) parameters."""
  return "params" if config.rlhf.algorithm == "none" else "policy"


def parent_config(init_from: str) -> tuple[pathlib.Path, ml_collections.ConfigDict]:
  """The parent workdir (resolved) and its saved config; StageError if it is not a run."""
  parent = pathlib.Path(init_from).expanduser().resolve()
  path = parent / "config.json"
  if not path.is_file():
    raise StageError(f"train.init_from={init_from}: {path} not found; point it at the "
                     "workdir of a finished dsv2_jax training run.")
  return parent, config_lib.from_json(path.read_text())


def _abstract_params(model_config: ml_collections.ConfigDict) -> Any:
  model = build_model(model_config)
  return nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))


def check_parent(init_from: str, model_config: ml_collections.ConfigDict) -> None:
  """StageError unless `init_from` is a run whose parameter shapes are this model's
  (abstract shapes only: run before anything is written)."""
  _, config = parent_config(init_from)
  _check_shapes(init_from, _abstract_params(config.model), _abstract_params(model_config),
                config.model.head != model_config.head)


def _check_shapes(init_from: str, parent: Any, child: Any, new_head: bool = False) -> None:
  if new_head:  # A head present on one side only is dropped or freshly initialised.
    one_sided = tuple(k for k in HEAD_PARAMS if (k in parent) != (k in child))
    parent, child = _without(parent, one_sided), _without(child, one_sided)
  mismatch = _shape_mismatch(parent, child)
  if mismatch:
    raise StageError(f"train.init_from={init_from}: its parameters do not fit this model "
                     f"({mismatch}); a stage may change data, length, schedule, attention "
                     "kernel, RoPE settings and the output head, not the other parameter "
                     "shapes.")


def init_params(init_from: str, abstract_params: Any, param_shardings: Any
                ) -> tuple[Any, dict[str, Any]]:
  """The parent's latest restorable parameters, placed in `param_shardings`.

  Args:
    init_from: the parent workdir.
    abstract_params: this run's freshly initialised parameters. Shapes must match the
      parent's; dtypes become this run's. When the head kind differs from the parent's,
      this run's head keeps these values (the parent's head is not read).
    param_shardings: the matching NamedSharding tree (this run's mesh).

  Returns:
    (params, record): the parameters and the parent record written to parent.json.

  Raises:
    StageError: the parent is missing, has no checkpoint, or its shapes differ.
  """
  parent, config = parent_config(init_from)
  parent_params = _abstract_params(config.model)
  fresh = {}
  if set(parent_params) != set(abstract_params):  # Another head kind: keep the new one.
    _check_shapes(init_from, parent_params, abstract_params, new_head=True)
    new = tuple(k for k in HEAD_PARAMS if k in abstract_params and k not in parent_params)
    fresh = {k: abstract_params[k] for k in new}
    abstract_params, param_shardings = (_without(abstract_params, new),
                                        _without(param_shardings, new))
  else:
    _check_shapes(init_from, parent_params, abstract_params)
  checkpointer = Checkpointer(parent / "checkpoints", max_to_keep=1, use_async=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise StageError(f"train.init_from={init_from} has no checkpoint: train it first.")
    for step in reversed(steps):
      try:
        params = checkpointer.restore_params(step, abstract_params, param_shardings,
                                             params_key(config))
        break
      except CheckpointError as e:
        logging.warning("%s Trying the previous step of the parent.", e)
    else:
      raise StageError(f"train.init_from={init_from}: none of its checkpoints {steps} "
                       "restores; retrain the parent or pick another run.")
  finally:
    checkpointer.close()
  if step < config.train.steps:
    logging.warning("train.init_from=%s: its latest checkpoint is step %d of %d (the parent "
                    "did not finish); starting from it anyway.", init_from, step,
                    config.train.steps)
  record = {"path": str(parent), "step": int(step), "config_hash": config_hash(parent),
            "dataset": config.data.dataset, "seq_len": config.data.seq_len}
  if fresh:
    record["new_head"] = sorted(fresh)
  return {**params, **fresh}, record


def write_parent(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  (workdir / PARENT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def lineage(workdir: str | pathlib.Path, max_depth: int = 32) -> list[dict[str, Any]]:
  """The chain of runs ending at `workdir`, oldest first.

  Each entry: path, and for every run that has a parent, the parent's recorded step
  and config hash, plus `config_changed` when the parent's config.json no longer has
  the hash recorded (edited or replaced since) and `missing` when it is gone.
  """
  chain: list[dict[str, Any]] = [{"path": str(pathlib.Path(workdir).expanduser().resolve())}]
  for _ in range(max_depth):
    record_path = pathlib.Path(chain[0]["path"]) / PARENT_FILE
    if not record_path.is_file():
      break
    record = json.loads(record_path.read_text())
    parent = pathlib.Path(record["path"])
    entry = {"path": str(parent)}
    chain[0]["init_from"] = {"step": record["step"], "config_hash": record["config_hash"]}
    if not (parent / "config.json").is_file():
      entry["missing"] = True
      chain.insert(0, entry)
      break
    if config_hash(parent) != record["config_hash"]:
      entry["config_changed"] = True
    chain.insert(0, entry)
  for entry in chain:
    if not entry.get("missing"):
      c = config_lib.from_json((pathlib.Path(entry["path"]) / "config.json").read_text())
      entry.update(dataset=c.data.dataset, seq_len=c.data.seq_len, steps=c.train.steps,
                   attention=c.model.attention, rope_scaling=c.model.rope_scaling,
                   rope_scale=c.model.rope_scale)
  return chain


def format_lineage(chain: list[dict[str, Any]]) -> str:
  lines = ["stages (oldest first):"]
  for i, e in enumerate(chain):
    if e.get("missing"):
      lines.append(f"  {i + 1}. {e['path']}  (missing)")
      continue
    rope = e["rope_scaling"] + (f" x{e['rope_scale']:g}" if e["rope_scaling"] != "none" else "")
    line = (f"  {i + 1}. {e['path']}  {e['dataset']}  seq_len {e['seq_len']}  "
            f"{e['steps']} steps  attention {e['attention']}  rope {rope}")
    if "init_from" in e:
      line += (f"\n       from step {e['init_from']['step']} of run {i} "
               f"(config {e['init_from']['config_hash']})")
    if e.get("config_changed"):
      line += "\n       warning: this run's config.json changed since its child started"
    lines.append(line)
  return "\n".join(lines)
