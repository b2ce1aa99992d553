"""Command line: `python -m dsv2_jax {train,eval,generate,index,quantize,info,plan,convert}`.

  train     train (or resume) a run and evaluate it on held-out text
            --config FILE[:args] --workdir DIR [--config.a.b=v ...] [--stop_after N]
            [--init_from PARENT_WORKDIR]  (a later stage: start from PARENT's parameters)
            [--mesh PRESET | --mesh AXIS=SIZE,...] [--distributed]
  eval      held-out loss / perplexity / bits per byte of a run's latest checkpoint
            --workdir DIR [--eval_dataset NAME] [--eval_split SPLIT] [--json]
            [--text FILE ...] [--window W --stride S] [--rag INDEX]  (sliding windows:
            every token scored once with >= W - S tokens of context)
            [--experts_keep M [--expert_profile DATASET]]  (MoE: only the M experts per
            layer DATASET's train split uses most; also for generate)
  generate  continue a prompt with a run's latest checkpoint (KV-cache sampling; past the
            window, the window rolls forward by the stride and is recomputed)
            --workdir DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K
            --top_p P --seed S --window W --stride S --rag INDEX]
  index     build a BM25 retrieval index beside a run, for --rag (passages of rag.passage_tokens)
            --workdir DIR --corpus NAME:SPLIT|FOLDER [--corpus ...] [--index_name NAME]
  quantize  store a run's weights as quant.rules says (INT8 blocks, bf16/fp16) in a new
            workdir that eval and generate read (post-training if the run was not QAT)
            --workdir RUN --out DIR [--rules MODULE=FORMAT,...] [--block 4x4|channel|...]
            [--int8_dot]  (eval/generate of DIR use INT8 x INT8 dots; else weight-only)
  info      total / active parameters of a config or run (shapes only); for a run,
            also its chain of stages (train.init_from parents)
            --config FILE | --workdir DIR [--json]
  plan      per-device memory of a config on a mesh (abstract compile, nothing allocated)
            --config FILE --mesh MESH [--devices N] [--device_memory_gib G] [--json]
            or, with --latency h100|h200|tpu_v5p, one request's latency on paper under
            TP 8, TP 8 x PP 4 and with overlap [--prompt_tokens N --new_tokens N]
  convert   a Hugging Face DeepseekV2ForCausalLM checkpoint (config.json + safetensors)
            as a workdir that eval, generate, info and train --init_from read
            --from_hf DIR --workdir OUT [--json]

Exit status: 0 done (or stopped with a checkpoint: --stop_after, SIGTERM, SIGINT; rerun
the same command to resume); 2 bad input (config file or field, flag value, data,
checkpoint, workdir) or a diverged run, reported in one line on stderr that names the
problem and the fix. Nothing in the workdir is ever deleted.

Multi-host (TPU pods, GPU clusters): run the same command on every host with
`--distributed` (see `dsv2_jax.parallel.distributed`).
"""

from __future__ import annotations

import difflib
import json
import logging
import pathlib
import re
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from dsv2_jax import config as config_lib

COMMANDS = ("train", "eval", "generate", "index", "quantize", "info", "plan", "convert")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally with ':args'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
_REWARD_FROM = flags.DEFINE_string(
    "reward_from", None, "train (rlhf.algorithm ppo|dpo): the reward model's workdir "
    "(sets rlhf.reward_from).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "train: start from this run's final parameters (train.init_from).")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "train: stop with a checkpoint after this many steps.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "generate: tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "generate: 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate: sample among the top k; 0 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_EVAL_DATASET = flags.DEFINE_string("eval_dataset", None, "eval: another dataset to score.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None, "eval: split to score.")
_CORPUS = flags.DEFINE_multi_string(
    "corpus", None, "index: a dataset split NAME:SPLIT (e.g. wiki_excerpt:train) or a folder "
    "of UTF-8 .txt files; repeat to index several.")
_INDEX_NAME = flags.DEFINE_string("index_name", "default",
                                  "index: the index's name (saved as WORKDIR/rag/NAME).")
_TEXT = flags.DEFINE_multi_string("text", None, "eval: UTF-8 text file(s) to score "
                                  "(sliding windows) instead of the eval split.")
_WINDOW = flags.DEFINE_integer("window", None, "eval/generate: sliding window in tokens "
                               "(default eval.window / sample.window).")
_STRIDE = flags.DEFINE_integer("stride", None, "eval/generate: window stride in tokens "
                               "(default eval.stride / sample.stride).")
_TOP_P = flags.DEFINE_float("top_p", None, "generate: nucleus sampling mass; 1 = off.")
_RAG = flags.DEFINE_string("rag", None, "eval/generate: retrieval index (a name under "
                           "WORKDIR/rag/ from the index command, or a folder).")
_JSON = flags.DEFINE_bool("json", False, "info/eval/quantize: print JSON only.")
_OUT = flags.DEFINE_string("out", None, "quantize: the new workdir to write.")
_FROM_HF = flags.DEFINE_string("from_hf", None, "convert: a transformers DeepseekV2ForCausalLM "
                               "checkpoint directory (config.json + *.safetensors).")
_EXPERTS_KEEP = flags.DEFINE_integer(
    "experts_keep", None, "eval/generate of an MoE run: keep only the M experts per layer "
    "that --expert_profile's data uses most (the gate renormalised over them).")
_EXPERT_PROFILE = flags.DEFINE_string(
    "expert_profile", None, "eval/generate --experts_keep: the dataset whose train split "
    "is profiled (default: the run's data.dataset).")
_PROFILE_BATCHES = flags.DEFINE_integer("profile_batches", 16, "--experts_keep: batches "
                                        "of eval.batch_size rows profiled.")
_RULES = flags.DEFINE_string("rules", None, "quantize: quant.rules, MODULE=FORMAT,... "
                             "(default: the run's own, else the article's advice: FFN and "
                             "experts int8, attention fp16).")
_BLOCK = flags.DEFINE_string("block", None, "quantize: quant.block (4x4, RxC, channel, "
                             "tensor; default: the run's own).")
_INT8_DOT = flags.DEFINE_bool("int8_dot", None, "quantize/eval/generate: multiply INT8 "
                              "weights as INT8 x INT8 -> INT32 dots (--noint8_dot: "
                              "weight-only, dequantized inside each matmul).")
_MESH = flags.DEFINE_string(
    "mesh", None, "train: replaces config.mesh; a preset (dp, fsdp, tp, dp_tp2, fsdp_tp4, "
    "dp_ep4, pp4_dp, pp2_tp2_dp) or AXIS=SIZE,... over data/fsdp/tensor/expert/stage.")
_LATENCY = flags.DEFINE_string(
    "latency", None, "plan: instead of memory, the inference latency model on this hardware "
    "preset (h100, h200, tpu_v5p): TP 8, TP 8 x PP 4, with and without overlap.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 2048, "plan --latency: prompt length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "plan --latency: tokens generated.")
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
  if _INIT_FROM.value is not None:
    _CONFIG.value.train.init_from = _INIT_FROM.value
  if _REWARD_FROM.value is not None:
    _CONFIG.value.rlhf.reward_from = _REWARD_FROM.value
  result = trainer.train_and_evaluate(_CONFIG.value, workdir, stop_after=_STOP_AFTER.value)
  if jax.process_index() != 0:
    return  # Process 0 reports for all.
  if isinstance(result, trainer.Stopped):
    why = {"stop_after": f"--stop_after {_STOP_AFTER.value}"}.get(result.reason, result.reason)
    print(f"stopped at step {result.step} ({why}) with a checkpoint; run the same command "
          "to resume.")
    return
  from dsv2_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  print(f"held-out ({_CONFIG.value.data.dataset}/{_CONFIG.value.data.eval_split}): "
        + evaluate.summary(result))
  sample = pathlib.Path(workdir) / "sample.txt"
  if sample.exists():
    print("sample:\n" + sample.read_text(encoding="utf-8"))


def _open_run(need_checkpoint: bool = True):
  """Config and Run of a trained workdir, nothing restored yet (flags are checked first)."""
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  workdir = _need_workdir()
  config = trainer.inference_config(trainer.load_config(workdir))
  if _INT8_DOT.value is not None:
    if not config.quant.exported:
      raise UsageError(f"--int8_dot needs a quantized workdir; {workdir} is not one "
                       "(make one with `quantize --workdir RUN --out DIR`).")
    config.quant.int8_dot = _INT8_DOT.value
  run = trainer.Run(config, workdir)
  if need_checkpoint and run.checkpointer.latest_step() is None:
    raise UsageError(f"{workdir} has no checkpoint yet: train first.")
  return config, run


def _trained_params(config, run):
  """(params, param_shardings, step) of the run, with only the experts --experts_keep
  keeps (then `run.model` and config.model are the smaller model's)."""
  if _EXPERTS_KEEP.value is None:
    if _EXPERT_PROFILE.value:
      raise UsageError("--expert_profile goes with --experts_keep M.")
    return run.trained_params()
  from dsv2_jax.infer import expert_selection  # pylint: disable=g-import-not-at-top
  if config.quant.exported:
    raise UsageError("--experts_keep reads float weights; select experts on the run itself "
                     "(the quantized export's source, see its parent.json).")
  try:  # Checked before the slow restore.
    expert_selection.kept_model_config(config.model, _EXPERTS_KEEP.value)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if _PROFILE_BATCHES.value < 1:
    raise UsageError(f"--profile_batches={_PROFILE_BATCHES.value} must be >= 1.")
  dataset = _EXPERT_PROFILE.value or config.data.dataset
  params, _, step = run.trained_params()
  before = expert_selection.parameter_bytes(params)
  params, shardings = run.keep_experts(params, _EXPERTS_KEEP.value, dataset,
                                       _PROFILE_BATCHES.value)
  after = expert_selection.parameter_bytes(params)
  print(f"kept {_EXPERTS_KEEP.value} experts per layer (profiled on {dataset}:train, "
        f"{_PROFILE_BATCHES.value} batches): parameters {before / 2**20:.2f} -> "
        f"{after / 2**20:.2f} MiB", file=sys.stderr)
  return params, shardings, step


def _window(config, section: str, default_window: int) -> tuple[int, int]:
  """(window, stride) from the flags, else config.<section>, else the defaults."""
  from dsv2_jax.infer import sliding_window  # pylint: disable=g-import-not-at-top
  window = _WINDOW.value or config[section].window or default_window
  default_stride = window if section == "eval" else max(1, window // 4)
  stride = _STRIDE.value or config[section].stride or default_stride
  limit = config.model.max_seq_len
  if window > limit:
    raise UsageError(f"--window={window} is longer than the model takes "
                     f"(model.max_seq_len={limit}); use --window <= {limit}.")
  try:
    sliding_window.check_window(window, stride)
  except ValueError as e:
    raise UsageError(f"--window/--stride: {e}") from None
  return window, stride


def _rag_index(run):
  """The index named by --rag (loaded before any slow restore), or None."""
  if not _RAG.value:
    return None
  from dsv2_jax.infer import retrieval  # pylint: disable=g-import-not-at-top
  return retrieval.RetrievalIndex.load(retrieval.index_path(run.workdir, _RAG.value))


def _eval() -> None:
  # pylint: disable=g-import-not-at-top
  from dsv2_jax.infer import retrieval, sliding_window
  from dsv2_jax.parallel import sharding
  from dsv2_jax.train import evaluate
  config, run = _open_run()
  with config.unlocked():
    if _EVAL_DATASET.value:
      config.data.dataset = _EVAL_DATASET.value
    if _EVAL_SPLIT.value:
      config.data.eval_split = _EVAL_SPLIT.value
  windowed = bool(_TEXT.value or _WINDOW.value or _STRIDE.value or _RAG.value
                  or config.eval.window or config.eval.stride)
  texts = sliding_window.read_text_files(_TEXT.value) if _TEXT.value else None
  index = _rag_index(run)
  if windowed:
    window, stride = _window(config, "eval", config.data.seq_len)
    if index is not None and config.rag.query_tokens + stride >= window:
      raise UsageError(f"--rag needs room for passages: rag.query_tokens "
                       f"({config.rag.query_tokens}) + stride ({stride}) must be < window "
                       f"({window}).")
  params, param_shardings, step = _trained_params(config, run)
  eval_fn = evaluate.make_eval_fn(run.model, run.tokenizer, run.mesh, param_shardings)
  if not windowed:  # Packed rows of data.seq_len, as the trainer's evals.
    result = evaluate.evaluate(eval_fn, params, config, run.tokenizer, run.mesh)
    result.update(dataset=config.data.dataset, split=config.data.eval_split)
  else:
    if texts is None:  # The eval split's documents as one stream, as packing joins them.
      texts = [text for _, text in retrieval.load_corpus(
          f"{config.data.dataset}:{config.data.eval_split}", config.data.data_dir,
          config.data.text_key)]
    augment = None if index is None else retrieval.window_augmenter(
        index, run.tokenizer, config.rag.top_k, config.rag.query_tokens, window)
    result = sliding_window.score(
        eval_fn, params, sliding_window.document_stream(texts, run.tokenizer),
        window, stride, config.eval.batch_size, run.tokenizer,
        put_batch=lambda b: sharding.put_batch(b, run.mesh), augment=augment)
    if _TEXT.value:
      result.update(text=list(_TEXT.value))
    else:
      result.update(dataset=config.data.dataset, split=config.data.eval_split)
    if _RAG.value:
      result.update(rag=_RAG.value, rag_top_k=config.rag.top_k,
                    rag_query_tokens=config.rag.query_tokens)
  result.update(step=step)
  print(json.dumps(result, indent=None if _JSON.value else 2, sort_keys=True))


def _generation_args(config) -> tuple[str, int, float, int, float]:
  """(prompt, max_new_tokens, temperature, top_k, top_p) from the flags or config.sample."""
  s = config.sample
  pick = lambda flag, default: default if flag.value is None else flag.value  # noqa: E731
  prompt = pick(_PROMPT, s.prompt)
  max_new, temperature, top_k = pick(_MAX_NEW, s.max_new_tokens), pick(_TEMPERATURE,
                                     s.temperature), pick(_TOP_K, s.top_k)
  top_p = pick(_TOP_P, s.top_p)
  if max_new <= 0:
    raise UsageError(f"--max_new_tokens={max_new} must be a positive integer.")
  if not temperature >= 0:  # Also rejects NaN.
    raise UsageError(f"--temperature={temperature} must be >= 0 (0 = greedy).")
  if top_k < 0:
    raise UsageError(f"--top_k={top_k} must be >= 0 (0 = sample among all tokens).")
  if not 0 < top_p <= 1:
    raise UsageError(f"--top_p={top_p} must be in (0, 1] (1 = off).")
  if not prompt:
    raise UsageError("--prompt is empty: give the text to continue.")
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError:
    raise UsageError("--prompt is not valid UTF-8 text: pass the prompt in UTF-8 (check the "
                     "terminal's locale or the file it came from).") from None
  return prompt, max_new, temperature, top_k, top_p


def _generate() -> None:
  from dsv2_jax.infer import retrieval  # pylint: disable=g-import-not-at-top
  config, run = _open_run()
  if config.model.mla.kv_lora_rank and config.model.attention != "dense":
    raise UsageError(f"generate: decoding Multi-head Latent Attention is built for dense "
                     f"attention only, and this run uses {config.model.attention!r}; "
                     "evaluate it with `eval` instead.")
  prompt, max_new, temperature, top_k, top_p = _generation_args(config)  # Before the restore.
  window = _window(config, "sample", run.sample_window()[0])
  index = _rag_index(run)
  context = None
  if index is not None:  # Passages, most relevant first, ahead of the prompt.
    hits = index.search(prompt, config.rag.top_k)
    augmented = retrieval.augment(run.tokenizer.encode(prompt), [p for p, _ in hits],
                                  run.tokenizer, budget_tokens=window[0] - window[1])
    context = augmented.ids
    for passage, score in hits[:augmented.num_passages]:
      print(f"retrieved {passage.doc_id}#{passage.index} (BM25 {score:.2f})", file=sys.stderr)
  params, _, _ = _trained_params(config, run)
  print(run.sample(params, prompt, max_new, temperature, top_k, _SEED.value, top_p,
                   window, context))


def _index() -> None:
  import time  # pylint: disable=g-import-not-at-top
  from dsv2_jax.infer import retrieval  # pylint: disable=g-import-not-at-top
  config, run = _open_run(need_checkpoint=False)
  if not _CORPUS.value:
    raise UsageError("index needs --corpus NAME:SPLIT or --corpus FOLDER "
                     "(e.g. --corpus wiki_excerpt:train).")
  start = time.perf_counter()
  docs = [doc for spec in _CORPUS.value
          for doc in retrieval.load_corpus(spec, config.data.data_dir, config.data.text_key)]
  passages = retrieval.chunk_documents(docs, run.tokenizer, config.rag.passage_tokens)
  index = retrieval.RetrievalIndex.build(passages, sources=_CORPUS.value,
                                         passage_tokens=config.rag.passage_tokens,
                                         tokenizer=config.data.tokenizer)
  path = retrieval.index_path(run.workdir, _INDEX_NAME.value)
  index.save(path)
  print(f"indexed {len(docs):,} documents as {len(index):,} passages of <= "
        f"{config.rag.passage_tokens} tokens in {time.perf_counter() - start:.1f} s: {path} "
        f"(use --rag {_INDEX_NAME.value})")


def _quantize() -> None:
  from dsv2_jax.quant import export  # pylint: disable=g-import-not-at-top
  workdir = _need_workdir()
  if not _OUT.value:
    raise UsageError("quantize needs --out DIR (the new workdir to write).")
  report = export.export(workdir, _OUT.value, _RULES.value, _BLOCK.value,
                         bool(_INT8_DOT.value))
  print(json.dumps(report, indent=2) if _JSON.value else export.format_report(report))


def _convert() -> None:
  from dsv2_jax.convert import hf_deepseek_v2  # pylint: disable=g-import-not-at-top
  workdir = _need_workdir()
  if not _FROM_HF.value:
    raise UsageError("convert needs --from_hf DIR (a transformers checkpoint directory).")
  summary = hf_deepseek_v2.convert(_FROM_HF.value, workdir)
  if _JSON.value:
    print(json.dumps(summary, indent=2))
  else:
    print(f"converted {summary['from_hf']} ({summary['parameters']:,} parameters) into "
          f"{summary['workdir']}")


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
  text = info.format_info(report)
  if _CONFIG.value is None:  # A run: also where its parameters came from.
    from dsv2_jax.train import stages  # pylint: disable=g-import-not-at-top
    report["stages"] = stages.lineage(_WORKDIR.value)
    text += "\n" + stages.format_lineage(report["stages"])
  print(json.dumps(report, indent=2) if _JSON.value else text)


def _plan() -> None:
  import math  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dsv2_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  if _LATENCY.value:
    _plan_latency()
    return
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


def _plan_latency() -> None:
  from dsv2_jax import latency  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None:
    raise UsageError("plan --latency needs --config FILE.")
  if _LATENCY.value not in latency.PRESETS:
    raise UsageError(f"--latency={_LATENCY.value!r} is not a hardware preset; choose one of "
                     f"{list(latency.PRESETS)}.")
  if _PROMPT_TOKENS.value < 1 or _NEW_TOKENS.value < 0:
    raise UsageError("--prompt_tokens must be >= 1 and --new_tokens >= 0.")
  config_lib.validate(_CONFIG.value)
  try:
    table = latency.article_table(_CONFIG.value.model, latency.PRESETS[_LATENCY.value],
                                  _PROMPT_TOKENS.value, _NEW_TOKENS.value)
  except ValueError as e:
    raise UsageError(f"plan --latency: {e}") from None
  print(json.dumps(table, indent=2) if _JSON.value else latency.format_table(table))


def _errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean bad input: reported in one line, exit status 2."""
  # pylint: disable=g-import-not-at-top
  from dsv2_jax.data.corpora import MissingCorpusError
  from dsv2_jax.data.sources import DatasetUnavailableError
  from dsv2_jax.parallel.sharding import MeshError
  from dsv2_jax.train.checkpoint import CheckpointError
  from dsv2_jax.train.stages import StageError
  from dsv2_jax.infer.retrieval import RetrievalError
  from dsv2_jax.infer.sliding_window import TextFileError
  from dsv2_jax.train.trainer import TrainingDiverged, WorkdirError
  from dsv2_jax.quant.export import QuantizeError
  from dsv2_jax.convert.hf_deepseek_v2 import ConvertError
  return (config_lib.ConfigError, UsageError, MissingCorpusError, DatasetUnavailableError,
          MeshError, CheckpointError, FileNotFoundError, WorkdirError, TrainingDiverged,
          StageError, RetrievalError, TextFileError, QuantizeError, ConvertError)


def _config_value(argv: list[str]) -> str | None:
  """The value of --config in argv (`--config X` or `--config=X`)."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return None


def _fields(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items"):
      out += _fields(value, f"{prefix}{key}.")
  return out


def _flag_error(argv: list[str], error: Exception) -> str:
  """One line saying which flag is wrong and how to fix it."""
  value = _config_value(argv)
  if value is not None:
    path, _, arg = value.partition(":")
    if not pathlib.Path(path).is_file():
      configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
      shipped = sorted(f"configs/{p.name}" for p in configs.glob("*.py"))
      return f"--config {value}: no such file {path!r}; use one of {shipped}."
    try:
      config = config_lib.from_file(path, arg or None)
    except Exception as e:  # pylint: disable=broad-except  # Any error of the user's file.
      where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
      reason = e.msg if isinstance(e, SyntaxError) else str(e).splitlines()[0] if str(e) else ""
      return (f"--config {value} could not be loaded: {type(e).__name__}{where}: {reason}. "
              "Fix the file or its ':args'.")
    if not isinstance(config, ml_collections.ConfigDict):
      return (f"--config {value}: get_config() returned a {type(config).__name__}, not an "
              "ml_collections.ConfigDict; start from dsv2_jax.config.default_config().")
    fields = _fields(config)
    for arg_ in argv:
      match = re.match(r"--config\.([\w.]+)", arg_)
      if match and match.group(1) not in fields:
        name = match.group(1)
        parent = name.rpartition(".")[0]
        leaf = name.rpartition(".")[2]
        siblings = [f.rpartition(".")[2] for f in fields if f.rpartition(".")[0] == parent]
        close = [f"{parent}.{f}" if parent else f
                 for f in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.7)]
        hint = f"did you mean {' or '.join(close)}?" if close else \
            "dsv2_jax/config.py lists every field."
        return f"--config.{name}: no such config field; {hint}"
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  message = re.sub(r"^flag (--\S+?)=", r"\1=", message)
  return f"{message} (check the flag's value and spelling; --helpfull lists every flag)."


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure reported in one line and exit status 2."""
  try:
    args = flags.FLAGS(argv)
    if _config_value(argv) is not None:
      _ = _CONFIG.value.to_dict()  # ml_collections defers a file's load error to here.
    return args
  except Exception as e:  # pylint: disable=broad-except  # absl, ml_collections, the file.
    print(f"error: {_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  commands = [a for a in argv[1:] if not a.startswith("-")]
  if len(commands) != 1 or commands[0] not in COMMANDS:
    print(f"error: give exactly one command out of {list(COMMANDS)}; got {commands}.",
          file=sys.stderr)
    sys.exit(2)
  logging.getLogger("absl").setLevel(logging.ERROR)
  # JAX logs each backend it probes and cannot start (e.g. 'tpu' on a CPU-only machine).
  logging.getLogger("jax").setLevel(logging.WARNING)
  logging.getLogger("bm25s").setLevel(logging.WARNING)  # Per-build progress lines.
  handler = {"train": _train, "eval": _eval, "generate": _generate, "index": _index,
             "quantize": _quantize, "info": _info, "plan": _plan,
             "convert": _convert}[commands[0]]
  try:
    if _DISTRIBUTED.value:
      from dsv2_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    handler()
  except _errors() as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)
