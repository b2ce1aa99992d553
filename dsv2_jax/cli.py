"""Command line: `python -m dsv2_jax {train,eval,generate,info} [flags]`.

  train     --config FILE[:args] --workdir DIR [--config.a.b=v ...] [--stop_after N]
            [--mesh PRESET | --mesh AXIS=SIZE,...]
  eval      --workdir DIR [--eval_dataset NAME] [--eval_split SPLIT]
  generate  --workdir DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K]
  info      --config FILE | --workdir DIR [--json]
  plan      --config FILE --mesh MESH [--devices N] [--device_memory_gib G] [--json]

Bad input (config, data, checkpoint, flags) ends with one clear line on stderr and
exit status 2; nothing in the workdir is deleted.

Multi-host (TPU pods, GPU clusters): run the same command on every host with
`--distributed` (see `dsv2_jax.parallel.distributed`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dsv2_jax import config as config_lib

COMMANDS = ("train", "eval", "generate", "info", "plan")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally with ':args'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "train: stop with a checkpoint after this many steps.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "generate: tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "generate: 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate: sample among the top k; 0 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_EVAL_DATASET = flags.DEFINE_string("eval_dataset", None, "eval: another dataset to score.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "eval: split to score.")
_JSON = flags.DEFINE_bool("json", False, "info/eval: print JSON only.")
_MESH = flags.DEFINE_string(
    "mesh", None, "train: replaces config.mesh; a preset (dp, fsdp, tp, dp_tp2, fsdp_tp4, "
    "dp_ep4, pp4_dp, pp2_tp2_dp) or AXIS=SIZE,... over data/fsdp/tensor/expert/stage.")
_DEVICES = flags.DEFINE_integer("devices", None,
                                "plan: total devices (fills a -1 mesh axis; default: none).")
_DEVICE_MEMORY = flags.DEFINE_float("device_memory_gib", 0.0,
                                    "plan: memory per device, to say whether it fits.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run (jax.distributed.initialize) first.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--distributed: HOST:PORT of process 0 (default: detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "--distributed: process count (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "--distributed: this process's id (default: detected).")


class UsageError(ValueError):
  """The command line is incomplete or inconsistent."""


def _need_workdir() -> str:
  if not _WORKDIR.value:
    raise UsageError("--workdir is required for this command.")
  return _WORKDIR.value


def _train() -> None:
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None:
    raise UsageError("train needs --config (e.g. --config configs/tiny.py).")
  workdir = _need_workdir()
  if _MESH.value:
    from dsv2_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
    _CONFIG.value.mesh.update(sharding.parse_mesh(_MESH.value))
  result = trainer.train_and_evaluate(_CONFIG.value, workdir, stop_after=_STOP_AFTER.value)
  if jax.process_index() != 0:
    return  # Process 0 reports for all.
  if result is None:
    print(f"stopped after step {_STOP_AFTER.value}; run the same command to resume.")
    return
  print(f"held-out ({_CONFIG.value.data.dataset}/{_CONFIG.value.data.eval_split}): "
        f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
        f"bits/byte {result['bits_per_byte']:.4f}  "
        f"(unigram baseline {result['unigram_bits_per_byte']:.4f})  tokens {result['tokens']:,}")
  sample = pathlib.Path(workdir) / "sample.txt"
  if sample.exists():
    print("sample:\n" + sample.read_text(encoding="utf-8"))


def _trained_run():
  """Config, Run and restored state of a trained workdir."""
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  workdir = _need_workdir()
  config = trainer.load_config(workdir)
  run = trainer.Run(config, workdir)
  if run.checkpointer.latest_step() is None:
    raise UsageError(f"{workdir} has no checkpoint yet: train first.")
  state, shardings, _ = run.initial_state()
  return config, run, state, shardings


def _eval() -> None:
  from dsv2_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  config, run, state, shardings = _trained_run()
  with config.unlocked():
    if _EVAL_DATASET.value:
      config.data.dataset = _EVAL_DATASET.value
    if _EVAL_SPLIT.value:
      config.data.eval_split = _EVAL_SPLIT.value
  eval_fn = evaluate.make_eval_fn(run.model, run.tokenizer, run.mesh, shardings.params)
  result = evaluate.evaluate(eval_fn, state.params, config, run.tokenizer, run.mesh)
  result.update(step=int(state.step), dataset=config.data.dataset, split=config.data.eval_split)
  print(json.dumps(result, indent=None if _JSON.value else 2, sort_keys=True))


def _generate() -> None:
  config, run, state, _ = _trained_run()
  s = config.sample
  prompt = _PROMPT.value if _PROMPT.value is not None else s.prompt
  pick = lambda flag, default: default if flag.value is None else flag.value  # noqa: E731
  print(run.sample(state.params, prompt, pick(_MAX_NEW, s.max_new_tokens),
                   pick(_TEMPERATURE, s.temperature), pick(_TOP_K, s.top_k), _SEED.value))


def _info() -> None:
  from dsv2_jax import info  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is not None:
    config = _CONFIG.value
  elif _WORKDIR.value:
    config = trainer.load_config(_WORKDIR.value)
  else:
    raise UsageError("info needs --config FILE or --workdir DIR.")
  config_lib.validate(config)
  report = info.model_info(config)
  print(json.dumps(report, indent=2) if _JSON.value else info.format_info(report))


def _plan() -> None:
  import math  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dsv2_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None or not _MESH.value:
    raise UsageError("plan needs --config FILE and --mesh (e.g. --mesh fsdp=64,tensor=8).")
  parsed = sharding.parse_mesh(_MESH.value)
  fixed = math.prod(v for v in parsed.values() if v != -1)
  sizes = sharding.mesh_shape(ml_collections.ConfigDict(parsed), _DEVICES.value or fixed)
  # The stand-in mesh is compiled on simulated CPU devices, set before any device exists.
  jax.config.update("jax_platforms", "cpu")
  from dsv2_jax import plan  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", plan.stand_in_devices(sizes))
  report = plan.plan(_CONFIG.value, sizes, _DEVICE_MEMORY.value)
  print(json.dumps(report, indent=2) if _JSON.value else plan.format_plan(report))


def _errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean bad input: reported in one line, exit status 2."""
  from dsv2_jax.data.corpora import MissingCorpusError  # pylint: disable=g-import-not-at-top
  from dsv2_jax.data.sources import DatasetUnavailableError  # pylint: disable=g-import-not-at-top
  from dsv2_jax.parallel.sharding import MeshError  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  return (config_lib.ConfigError, UsageError, MissingCorpusError, DatasetUnavailableError,
          MeshError, CheckpointError, FileNotFoundError)


def main(argv: list[str]) -> None:
  commands = [a for a in argv[1:] if not a.startswith("-")]
  if len(commands) != 1 or commands[0] not in COMMANDS:
    raise app.UsageError(f"give exactly one command out of {COMMANDS}; got {commands}.")
  logging.getLogger("absl").setLevel(logging.ERROR)
  handler = {"train": _train, "eval": _eval, "generate": _generate, "info": _info,
             "plan": _plan}[commands[0]]
  try:
    if _DISTRIBUTED.value:
      from dsv2_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    handler()
  except _errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main)
