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
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tqdm

from dsv2_jax import config as config_lib
from dsv2_jax.data import pipeline, sources
from dsv2_jax.data.tokenizer import Tokenizer, get_tokenizer
from dsv2_jax.infer.generate import generate
from dsv2_jax.model import flops
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train import evaluate as evaluate_lib
from dsv2_jax.train.checkpoint import Checkpointer
from dsv2_jax.train.metrics import MetricWriter
from dsv2_jax.train.optimizer import build_optimizer, learning_rate_schedule
from dsv2_jax.train.state import TrainState, abstract_state, create_train_state
from dsv2_jax.train.step import jit_train_step

# Sections whose change would make a resumed run a different experiment.
_RESUME_MUST_MATCH = ("seed", "model", "data.dataset", "data.seq_len", "data.batch_size",
                      "data.tokenizer", "data.tokenizer_model", "data.text_key",
                      "data.train_split")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def _check_resumable(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: pathlib.Path) -> None:
  changed = [f for f in _RESUME_MUST_MATCH if _get(saved, f) != _get(config, f)]
  if changed:
    raise config_lib.ConfigError(
        f"{workdir} holds a run with a different {', '.join(changed)}; resuming it with "
        "this config would not continue that run. Use a fresh --workdir, or restore those "
        f"values (see {workdir / 'config.json'}).")


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a dsv2_jax training workdir?")
  return config_lib.from_json(path.read_text())


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

  def initial_state(self) -> tuple[TrainState, Any, dict[str, Any] | None]:
    """The latest checkpoint if there is one, else a fresh state.

    Returns:
      (state, state_shardings, data_state or None).
    """
    seq_len = self.config.data.seq_len
    boxed = abstract_state(self.model, self.tx, seq_len)  # Shapes + logical axis names.
    abstract = nn.meta.unbox(boxed)
    shardings = sharding.logical_shardings(boxed, self.mesh)
    step = self.checkpointer.latest_step()
    if step is None:
      state, _ = create_train_state(self.model, self.tx, self.config.seed, seq_len, self.mesh,
                                    shardings)
      return state, shardings, None
    state, data_state = self.checkpointer.restore(step, shardings, abstract)
    logging.info("Restored step %d from %s", step, self.checkpointer.directory)
    return state, shardings, data_state

  def sample(self, params: Any, prompt: str, max_new_tokens: int, temperature: float,
             top_k: int, seed: int = 0) -> str:
    ids = self.tokenizer.encode(prompt)
    limit = self.config.model.max_seq_len
    if len(ids) + max_new_tokens > limit:
      raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                       f"exceeds model.max_seq_len={limit}.")
    # Host (numpy) inputs: replicated on every process of a multi-process run.
    tokens = generate(self.model, params, np.asarray(ids[None], np.int32),
                      np.asarray(jax.random.PRNGKey(seed)), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, mesh=self.mesh)
    return prompt + self.tokenizer.decode(np.asarray(tokens[0]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       stop_after: int | None = None) -> dict[str, float] | None:
  """Trains `config` in `workdir` (resuming if possible) and evaluates on held-out text.

  Args:
    config: a full config (see `dsv2_jax.config.default_config`).
    workdir: the run directory; created if missing.
    stop_after: stop (with a checkpoint) once this many steps are done, as if the job
      were preempted; the schedule still targets `train.steps`.

  Returns:
    The final held-out metrics, or None when stopped early by `stop_after`.
  """
  # 1) Validate and pin the config to the workdir.
  run = Run(config, workdir)
  workdir = run.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / "config.json"
  if config_path.exists() and run.checkpointer.latest_step() is not None:
    _check_resumable(load_config(workdir), config, workdir)
  lead = jax.process_index() == 0  # Of a multi-process run, only process 0 writes files.
  if lead:
    config_path.write_text(config_lib.to_json(config))
  train_cfg = config.train

  # 2) Data: this process's shard of the stream (an unknown dataset or split fails here).
  train_data = pipeline.train_dataset(config.data, run.tokenizer, config.seed,
                                      jax.process_index(), jax.process_count())
  sources.data_source(config.data.dataset, config.data.eval_split, config.data.data_dir,
                      config.data.download)

  # 3) State: the latest checkpoint, or a fresh init straight into its shardings; the
  #    data stream continues from the position saved with it.
  state, state_shardings, data_state = run.initial_state()
  start_step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, resume_step=start_step,  # Drops lines of lost steps.
                        enabled=lead)
  data_iter = iter(train_data)
  if data_state is not None:
    data_iter.set_state(data_state)

  # 4) Compile the steps once, with explicit shardings; the old state is donated.
  step_fn = jit_train_step(run.model, run.tx, run.mesh, state_shardings,
                           train_cfg.grad_accum_steps)
  eval_fn = evaluate_lib.make_eval_fn(run.model, run.tokenizer, run.mesh,
                                      state_shardings.params)
  schedule = learning_rate_schedule(train_cfg)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(config.model, config.data.seq_len)

  def run_eval(step: int, max_batches: int) -> dict[str, float]:
    result = evaluate_lib.evaluate(eval_fn, state.params, config, run.tokenizer, run.mesh,
                                   max_batches)
    writer.write(step, result, prefix="eval_")
    return result

  # 5) Train: host syncs only at log points; checkpoints carry the data position.
  last_stop = train_cfg.steps if stop_after is None else min(stop_after, train_cfg.steps)
  bar = tqdm.tqdm(total=train_cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  pending: list[dict[str, jax.Array]] = []
  window_start, window_steps = time.perf_counter(), 0
  for step in range(start_step + 1, last_stop + 1):
    batch = sharding.put_batch(next(data_iter), run.mesh)
    with jax.transfer_guard("disallow"):
      state, metrics = step_fn(state, batch)
    pending.append(metrics)
    window_steps += 1
    if step % train_cfg.log_every == 0 or step == last_stop:
      fetched = jax.device_get(pending)
      elapsed = time.perf_counter() - window_start
      tokens_per_s = window_steps * tokens_per_step / elapsed
      for offset, m in enumerate(fetched):
        s = step - len(fetched) + 1 + offset
        record = {"loss": m["loss"], "grad_norm": m["grad_norm"],
                  "learning_rate": float(schedule(s - 1)),
                  **{k: v for k, v in m.items() if k.startswith("moe/")}}
        if s == step:
          record.update(tokens_per_s=tokens_per_s,
                        model_tflops_per_s=tokens_per_s * flops_per_token / 1e12)
        writer.write(s, record)
      bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")
      bar.update(window_steps)
      pending, window_start, window_steps = [], time.perf_counter(), 0
    if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != train_cfg.steps:
      result = run_eval(step, config.eval.max_batches)
      bar.write(f"step {step}: eval loss {result['loss']:.4f}  "
                f"bits/byte {result['bits_per_byte']:.4f}")
      window_start = time.perf_counter()  # Keep eval time out of tokens/s.
    every = train_cfg.checkpoint_every
    if step == last_stop or (every and step % every == 0):
      run.checkpointer.save(step, state, data_iter.get_state())
  bar.close()
  run.checkpointer.close()

  if last_stop < train_cfg.steps:
    writer.close()
    return None

  # 6) Final held-out evaluation over the whole split, and a sample.
  result = run_eval(train_cfg.steps, 0)
  writer.close()
  if lead:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  s = config.sample
  if s.max_new_tokens > 0:  # Every process takes part in generation; process 0 writes.
    text = run.sample(state.params, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                      config.seed)
    if lead:
      (workdir / "sample.txt").write_text(text + "\n", encoding="utf-8")
  return result
