"""`train_and_evaluate(config, workdir)`: the training loop, top to bottom.

A workdir holds everything about one run:
  config.json       the validated config (a resumed run must match it)
  checkpoints/      orbax steps: train state + data-iterator position
  metrics.jsonl     one JSON line per log / eval point
  tensorboard/      the same scalars as TensorBoard events
  eval.json         final held-out figures (loss, perplexity, bits_per_byte, tokens)
  sample.txt        a sample generated after training

Running again on the same workdir resumes from the latest checkpoint and continues
bit-identically (same params, optimizer state, RNG and data position).

What can go wrong, and what happens (docs/reliability.md):
  - a non-finite loss or gradient: the step is skipped (`train_step`); after
    `train.max_skipped_steps` in a row the run stops with `TrainingDiverged`, its
    checkpoints all finite;
  - SIGTERM / SIGINT (preemption, Ctrl-C): a checkpoint at the current step, then the
    run returns `Stopped`; rerunning continues bit-identically;
  - an unreadable latest checkpoint: the newest step that restores is used and the bad
    one is moved to `unreadable_checkpoints/` (kept, never deleted);
  - a failed checkpoint write: `CheckpointError`, earlier steps intact. Every exit path
    waits for the checkpoint in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import signal
import threading
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from dsv2_jax import config as config_lib
from dsv2_jax.data import chat, pipeline, sources
from dsv2_jax.data.tokenizer import Tokenizer, get_tokenizer
from dsv2_jax.infer.generate import generate
from dsv2_jax.model import flops
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.quant import qat as qat_lib
from dsv2_jax.train import evaluate as evaluate_lib
from dsv2_jax.train import stages
from dsv2_jax.train.checkpoint import Checkpointer
from dsv2_jax.train.metrics import MetricWriter
from dsv2_jax.train.optimizer import build_optimizer, learning_rate_schedule
from dsv2_jax.train.state import TrainState, abstract_state, create_train_state
from dsv2_jax.train.step import jit_train_step

# Sections whose change would make a resumed run a different experiment.
_RESUME_MUST_MATCH = ("seed", "model", "data.dataset", "data.seq_len", "data.batch_size",
                      "data.tokenizer", "data.tokenizer_model", "data.text_key", "data.packing",
                      "data.passkey_fraction", "data.passkey_answer_weight", "data.format",
                      "data.prompt_key", "data.response_key", "data.label_key",
                      "data.score_pooling",
                      "data.train_split", "train.init_from")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                    workdir: pathlib.Path, fields: tuple[str, ...] = _RESUME_MUST_MATCH
                    ) -> None:
  """ConfigError unless `config` agrees with the `saved` one on every dotted field."""
  changed = [f for f in fields if _get(saved, f) != _get(config, f)]
  if changed:
    raise config_lib.ConfigError(
        f"{workdir} holds a run with a different {', '.join(changed)}; resuming it with "
        "this config would not continue that run. Use a fresh --workdir, or restore those "
        f"values (see {workdir / 'config.json'}).")


class WorkdirError(ValueError):
  """The workdir cannot be created or written."""


class TrainingDiverged(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class Stopped:
  """A run that stopped before `train.steps` with a checkpoint at `step`.

  reason: 'stop_after' (the --stop_after flag), 'SIGTERM' or 'SIGINT'.
  """

  step: int
  reason: str


UNREADABLE_DIR = "unreadable_checkpoints"  # Where training moves unreadable steps.


def prepare_workdir(workdir: pathlib.Path) -> None:
  """Creates `workdir` and checks that files can be written there."""
  probe = workdir / ".write_test"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written ({type(e).__name__}: "
                       f"{e.strerror or e}): choose a directory you can write to.") from None


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a dsv2_jax training workdir?")
  return config_lib.from_json(path.read_text())


def inference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as eval and generate use it: a PPO policy's shared value head is not needed
  (its language model is read, `Run.trained_params`)."""
  if config.rlhf.algorithm != "none" and config.model.head == "lm_value":
    config.model.head = "lm"
  return config


class Run:
  """The pieces of a run that training, eval and generation all need."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    config_lib.validate(config)
    self.config = config
    self.workdir = pathlib.Path(workdir).expanduser().resolve()
    self.tokenizer: Tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_model)
    if config.model.vocab_size < self.tokenizer.vocab_size:
      raise config_lib.ConfigError(
          f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
          f"vocabulary ({self.tokenizer.vocab_size}): raise model.vocab_size.")
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_layout(config, dict(self.mesh.shape))
    self.model = build_model(config.model)
    self.tx = build_optimizer(config.train)
    self.checkpointer = Checkpointer(self.workdir / "checkpoints", config.train.max_checkpoints,
                                     config.train.async_checkpointing)
    # quant.rules: the run's quantization plan. Training under it is QAT; a workdir
    # written by `quantize` (quant.exported) stores the INT8 weights themselves.
    self.quant = None
    if config.quant.rules:
      boxed = abstract_state(self.model, self.tx, config.data.seq_len).params
      try:
        self.quant = qat_lib.from_config(config, boxed)
      except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    self.qat = None if config.quant.exported else self.quant
    if self.qat is not None and config.quant.engine == "qwix":  # The library baseline.
      from dsv2_jax.quant import qwix_baseline  # pylint: disable=g-import-not-at-top
      self.model = qwix_baseline.wrap(self.model, qat_lib.rules_lib.parse(
          config.quant.rules, config.quant.block))
      self.qat = None  # The wrapped model rounds its own weights.
    if self.qat is not None:
      self._rounded = jax.jit(self.qat.weights)

  def deployed(self, params: Any) -> Any:
    """`params` as the model is evaluated and used: a QAT run's weights rounded as
    `quant.rules` stores them (what `quantize` exports), else unchanged."""
    return params if self.qat is None else self._rounded(params)

  def initial_state(self, set_aside_unreadable: bool = False
                    ) -> tuple[TrainState, Any, dict[str, Any] | None]:
    """The newest checkpoint that restores if there is one, else a fresh state.

    Unreadable newer steps are skipped with a warning and left in place; with
    `set_aside_unreadable` (training, which will write those step numbers again) they
    are moved to `<workdir>/unreadable_checkpoints/` instead, never deleted.

    Returns:
      (state, state_shardings, data_state or None).

    Raises:
      CheckpointError: there are checkpoints and none restores.
    """
    seq_len = self.config.data.seq_len
    boxed = abstract_state(self.model, self.tx, seq_len)  # Shapes + logical axis names.
    abstract = nn.meta.unbox(boxed)
    shardings = sharding.logical_shardings(boxed, self.mesh)
    if self.checkpointer.latest_step() is None:
      state, _ = create_train_state(self.model, self.tx, self.config.seed, seq_len, self.mesh,
                                    shardings)
      return state, shardings, None
    step, state, data_state, unreadable = self.checkpointer.restore_latest(shardings, abstract)
    if set_aside_unreadable and jax.process_index() == 0:
      for bad in unreadable:
        moved = self.checkpointer.set_aside(bad, self.workdir / UNREADABLE_DIR)
        logging.warning("Moved unreadable checkpoint step %d to %s (kept for inspection).",
                        bad, moved)
    logging.info("Restored step %d from %s", step, self.checkpointer.directory)
    return state, shardings, data_state

  def trained_params(self, rounded: bool = True) -> tuple[Any, Any, int]:
    """(params, param_shardings, step) of the newest checkpoint, for eval and generate
    (`deployed` unless not `rounded`: a QAT run's weights come back rounded).

    A PPO / DPO run's checkpoint holds an RLState: its policy is read (params only),
    without a shared value head (build this Run with `model.head='lm'`, see
    `inference_config`).
    """
    if self.config.quant.exported:
      return self._exported_params()
    if self.config.rlhf.algorithm == "none":
      state, shardings, _ = self.initial_state()
      params = self.deployed(state.params) if rounded else state.params
      return params, shardings.params, int(state.step)
    boxed = abstract_state(self.model, self.tx, self.config.data.seq_len).params
    shardings = sharding.logical_shardings(boxed, self.mesh)
    params, record = stages.init_params(str(self.workdir), nn.meta.unbox(boxed), shardings)
    return params, shardings, record["step"]

  def keep_experts(self, params: Any, keep: int, dataset: str, batches: int = 16
                   ) -> tuple[Any, Any]:
    """`params` with only the `keep` experts per MoE layer that `batches` batches of
    `dataset`'s train split pick most (`infer.expert_selection`), and their shardings.
    This Run's model and config.model become the smaller model's."""
    from dsv2_jax.infer import expert_selection  # pylint: disable=g-import-not-at-top
    data = ml_collections.ConfigDict(self.config.data.to_dict())
    data.update(dataset=dataset, eval_split="train")
    profiled = pipeline.eval_batches(data, self.tokenizer, self.config.eval.batch_size,
                                     batches)
    boxed = abstract_state(self.model, self.tx, self.config.data.seq_len).params
    self.model, params = expert_selection.select(self.model, params, boxed, profiled, keep)
    self.config.model = ml_collections.ConfigDict(self.model.cfg.to_dict())
    shardings = sharding.logical_shardings(
        abstract_state(self.model, self.tx, self.config.data.seq_len).params, self.mesh)
    return jax.device_put(params, shardings), shardings

  def _exported_params(self) -> tuple[Any, Any, int]:
    """The INT8 / low-precision weights a `quantize` workdir stores (quant.exported)."""
    from dsv2_jax.quant import export  # pylint: disable=g-import-not-at-top
    boxed = abstract_state(self.model, self.tx, self.config.data.seq_len).params
    return export.restore(self.checkpointer, self.quant, boxed, self.mesh,
                          self.config.quant.int8_dot)

  def sample_window(self) -> tuple[int, int]:
    """(window, stride) of generation: sample.window or model.max_seq_len, and
    sample.stride or window // 4. Past the window, generation rolls (infer/generate.py)."""
    s = self.config.sample
    window = s.window or self.config.model.max_seq_len
    return window, s.stride or max(1, window // 4)

  def sample(self, params: Any, prompt: str, max_new_tokens: int, temperature: float,
             top_k: int, seed: int = 0, top_p: float = 1.0,
             window: tuple[int, int] | None = None, context: np.ndarray | None = None) -> str:
    """`prompt` followed by `max_new_tokens` sampled tokens, decoded.

    Args:
      window: (window, stride) of the rolling window; default `sample_window()`.
      context: token ids to feed instead of the encoded prompt (e.g. retrieved passages
        ahead of it); the returned text still starts with `prompt`.

    A chat model (`data.format='chat'`) gets `prompt` as a user turn and answers in an
    assistant turn; the text returned is the prompt, a newline and the response.
    """
    is_chat = self.config.data.format == "chat"
    if context is None:
      context = (chat.generation_prompt(self.tokenizer, prompt) if is_chat
                 else self.tokenizer.encode(prompt))
    ids = context
    window, stride = window or self.sample_window()
    # Host (numpy) inputs: replicated on every process of a multi-process run.
    tokens = generate(self.model, params, np.asarray(ids[None], np.int32),
                      np.asarray(jax.random.PRNGKey(seed)), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, window=window,
                      stride=stride, mesh=self.mesh)
    if is_chat:
      return prompt + "\n" + chat.response_text(self.tokenizer, np.asarray(tokens[0]))
    return prompt + self.tokenizer.decode(np.asarray(tokens[0]))


class StopRequests:
  """Turns SIGTERM / SIGINT into a request to checkpoint and stop at the next step.

  Single process: Python handlers for both signals, installed while the context is
  active (main thread only); a second SIGINT interrupts at once, as usual. Multi-process
  runs use JAX's preemption service instead (SIGTERM on any host; all hosts agree on
  the step, `multihost_utils.reached_preemption_sync_point`).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.reason: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.reason = signal.Signals(signum).name
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Twice: stop now.

  @contextlib.contextmanager
  def installed(self) -> Iterator["StopRequests"]:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    try:
      yield self
    finally:
      for s, handler in self._previous.items():
        signal.signal(s, handler)

  def requested(self, step: int) -> str | None:
    """The reason to stop after `step`, or None. Call at every step on every process."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.reason = "SIGTERM"
    return self.reason


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  """bool scalar: every element of every leaf is finite (checked before each save)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged_message(step: int, config: ml_collections.ConfigDict, latest: int | None) -> str:
  n = config.train.max_skipped_steps
  kept = (f"the latest checkpoint, step {latest}, holds finite parameters"
          if latest is not None else "no checkpoint was written")
  return (f"training diverged: steps {step - n + 1}-{step} each had a non-finite loss or "
          f"gradient (train.max_skipped_steps={n} in a row); none was applied and "
          f"{kept}. Lower train.learning_rate (now {config.train.learning_rate:g}) or raise "
          "train.warmup_steps / train.grad_clip_norm, then rerun (it resumes) or use a "
          "fresh --workdir.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       stop_after: int | None = None) -> dict[str, float] | Stopped:
  """Trains `config` in `workdir` (resuming if possible) and evaluates on held-out text.

  Args:
    config: a full config (see `dsv2_jax.config.default_config`).
    workdir: the run directory; created if missing.
    stop_after: stop (with a checkpoint) once this many steps are done, as if the job
      were preempted; the schedule still targets `train.steps`.

  Returns:
    The final held-out metrics, or `Stopped` when stopped early (by `stop_after` or a
    SIGTERM / SIGINT), with a checkpoint at the step it names.

  Raises:
    TrainingDiverged: `train.max_skipped_steps` consecutive non-finite steps.
    CheckpointError: no checkpoint restores, or one cannot be written.
  """
  if config.rlhf.algorithm != "none":  # Stage 3 preference optimisation: its own loop.
    from dsv2_jax.rlhf import trainer as rlhf_trainer  # pylint: disable=g-import-not-at-top
    result = rlhf_trainer.train_rlhf(config, workdir, stop_after)
    return Stopped(result["stopped_at"], "stop_after") if "stopped_at" in result else result

  # 1) Validate and pin the config to the workdir.
  config_lib.validate(config)
  if config.train.init_from and not (pathlib.Path(workdir).expanduser() / "checkpoints").is_dir():
    stages.check_parent(config.train.init_from, config.model)  # Before anything is written.
  lead = jax.process_index() == 0  # Of a multi-process run, only process 0 writes files.
  if lead:
    prepare_workdir(pathlib.Path(workdir).expanduser().resolve())
  run = Run(config, workdir)
  workdir = run.workdir
  s = config.sample
  config_path = workdir / "config.json"
  if config_path.exists() and run.checkpointer.latest_step() is not None:
    check_resumable(load_config(workdir), config, workdir)
  fresh = run.checkpointer.latest_step() is None
  if lead:
    config_path.write_text(config_lib.to_json(config))
  train_cfg = config.train

  # 2) Data: this process's shard of the stream (an unknown dataset or split fails here).
  train_data = pipeline.train_dataset(config.data, run.tokenizer, config.seed,
                                      jax.process_index(), jax.process_count())
  sources.data_source(config.data.dataset, config.data.eval_split, config.data.data_dir,
                      config.data.download)

  # 3) State: the newest checkpoint that restores, or a fresh init straight into its
  #    shardings; the data stream continues from the position saved with it.
  state, state_shardings, data_state = run.initial_state(set_aside_unreadable=True)
  if fresh and config.train.init_from:  # A later stage: the parent's parameters, new optimizer.
    params, parent = stages.init_params(train_cfg.init_from, state.params,
                                        state_shardings.params)
    opt_state = jax.jit(run.tx.init, out_shardings=state_shardings.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
    if lead:
      stages.write_parent(workdir, parent)
  start_step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, resume_step=start_step,  # Drops lines of lost steps.
                        enabled=lead)
  data_iter = iter(train_data)
  if data_state is not None:
    data_iter.set_state(data_state)

  # 4) Compile the steps once, with explicit shardings; the old state is donated.
  step_fn = jit_train_step(run.model, run.tx, run.mesh, state_shardings,
                           train_cfg.grad_accum_steps, qat=run.qat)
  eval_fn = evaluate_lib.make_eval_fn(run.model, run.tokenizer, run.mesh,
                                      state_shardings.params)
  schedule = learning_rate_schedule(train_cfg)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(config.model, config.data.seq_len)

  def run_eval(step: int, max_batches: int) -> dict[str, float]:
    result = evaluate_lib.evaluate(eval_fn, run.deployed(state.params), config, run.tokenizer,
                                   run.mesh, max_batches)
    writer.write(step, result, prefix="eval_")
    return result

  def save(step: int) -> None:
    if not bool(jax.device_get(_all_finite(state.params))):  # Never write non-finite.
      run.checkpointer.wait()
      raise TrainingDiverged(f"parameters are not finite at step {step}, so it was not "
                             f"checkpointed (latest: step {run.checkpointer.latest_step()}). "
                             "Lower train.learning_rate, then rerun (it resumes).")
    run.checkpointer.save(step, state, data_iter.get_state())

  # 5) Train: one step in flight; host syncs only for the divergence check of the step
  #    before, and at log points. Checkpoints carry the data position.
  last_stop = train_cfg.steps if stop_after is None else min(stop_after, train_cfg.steps)
  bar = tqdm.tqdm(total=train_cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                  disable=not lead)
  pending: list[dict[str, jax.Array]] = []
  window_start, window_steps = time.perf_counter(), 0
  stop = StopRequests()
  stopped = None

  def log(step: int) -> None:
    """Writes the pending steps' metrics (the last one is `step`)."""
    nonlocal pending, window_start, window_steps
    fetched = jax.device_get(pending)
    elapsed = time.perf_counter() - window_start
    tokens_per_s = window_steps * tokens_per_step / elapsed
    for offset, m in enumerate(fetched):
      s = step - len(fetched) + 1 + offset
      applied_before = s - 1 - (m["skipped_steps"] - (m["consecutive_skips"] > 0))
      record = {"loss": m["loss"], "grad_norm": m["grad_norm"],
                "learning_rate": float(schedule(applied_before)),  # Skips do not count.
                "skipped_steps": m["skipped_steps"],
                **{k: v for k, v in m.items() if k.startswith(("moe/", "quant/"))}}
      if s == step:
        record.update(tokens_per_s=tokens_per_s,
                      model_tflops_per_s=tokens_per_s * flops_per_token / 1e12)
      writer.write(s, record)
    postfix = dict(loss=f"{float(fetched[-1]['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")
    if int(fetched[-1]["skipped_steps"]):
      postfix["skipped"] = int(fetched[-1]["skipped_steps"])
    bar.set_postfix(postfix)
    bar.update(window_steps)
    pending, window_start, window_steps = [], time.perf_counter(), 0

  def check_divergence(checked: int, metrics: dict[str, jax.Array], latest: int) -> None:
    """Stops if step `checked` (its `metrics`) ended a run of max_skipped_steps skips;
    `latest` is the newest step dispatched."""
    if int(jax.device_get(metrics["consecutive_skips"])) >= train_cfg.max_skipped_steps:
      log(latest)  # Record what was computed, non-finite losses included.
      run.checkpointer.wait()
      raise TrainingDiverged(_diverged_message(checked, config, run.checkpointer.latest_step()))

  try:
    with stop.installed():
      for step in range(start_step + 1, last_stop + 1):
        batch = sharding.put_batch(next(data_iter), run.mesh)
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch)
        pending.append(metrics)
        window_steps += 1
        if len(pending) > 1:  # One step in flight: check the one before it.
          check_divergence(step - 1, pending[-2], step)
        if step % train_cfg.log_every == 0 or step == last_stop:
          check_divergence(step, pending[-1], step)
          log(step)
        if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != train_cfg.steps:
          result = run_eval(step, config.eval.max_batches)
          bar.write(f"step {step}: eval {evaluate_lib.summary(result)}")
          window_start = time.perf_counter()  # Keep eval time out of tokens/s.
        every = train_cfg.checkpoint_every
        reason = stop.requested(step)
        if step == last_stop or (every and step % every == 0) or reason:
          save(step)
        if reason:
          if pending:
            log(step)
          stopped = Stopped(step, reason)
          break
    run.checkpointer.wait()  # The last save must be complete (and may have failed).
  except BaseException:
    writer.close()
    raise
  finally:
    bar.close()
    run.checkpointer.close()  # Waits for a save in flight on every exit path.

  if stopped is None and last_stop < train_cfg.steps:
    stopped = Stopped(max(start_step, last_stop), "stop_after")
  if stopped is not None:
    writer.close()
    return stopped

  # 6) Final held-out evaluation over the whole split, and a sample.
  result = run_eval(train_cfg.steps, config.eval.final_max_batches)
  writer.close()
  if lead:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  if s.max_new_tokens > 0 and config.model.head == "lm":  # Every process generates.
    text = run.sample(run.deployed(state.params), s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                      config.seed, s.top_p)
    if lead:
      (workdir / "sample.txt").write_text(text + "\n", encoding="utf-8")
  return result
