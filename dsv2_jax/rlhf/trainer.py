"""`train_rlhf(config, workdir)`: PPO or DPO on a language model, resumable like training.

`python -m dsv2_jax train` lands here when `rlhf.algorithm` is 'ppo' or 'dpo'.

Runs involved (each a workdir; nothing is copied):
  policy     starts from `train.init_from` (an SFT or stage-1 run). Its model config
             becomes this run's `model` section (head 'lm_value' for PPO's shared value).
  reference  the same parent parameters, frozen: the KL anchor.
  reward     `rlhf.reward_from`, a `model.head='scalar'` run, frozen. Its score is
             centred at its own decision threshold (`evaluate_preference`'s
             `threshold`: the best-accuracy cut on its held-out texts), so a response
             "scores positive" when the reward model would call it preferred.
  value      PPO with rlhf.value='separate': a scalar-head copy of the reward model,
             trained (InstructGPT initialises the value function from the reward model).

Prompts: the first `rlhf.prompt_tokens` tokens of the prompt dataset's texts (training
split for rollouts, held-out split for evaluation; the Rotten Tomatoes snippets of
held-out movies by default: the positive-continuation task of the trl sentiment
example). Responses are `rlhf.response_tokens` sampled tokens, ending early at the
first end-of-document. The reward model reads prompt + response + end-of-document.

A checkpoint holds the policy, the value function, the optimizer state, beta, the RNG
and the prompt position, so a resumed run continues bit-identically. Metrics go to
metrics.jsonl / TensorBoard like training; eval.json and samples.txt at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dsv2_jax import config as config_lib
from dsv2_jax.data import sources
from dsv2_jax.data.tokenizer import get_tokenizer
from dsv2_jax.infer.generate import generate
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.rlhf import dpo, ppo
from dsv2_jax.train import stages
from dsv2_jax.train.checkpoint import Checkpointer
from dsv2_jax.train.metrics import MetricWriter
from dsv2_jax.train.optimizer import build_optimizer

# Fields whose change would make a resumed run a different experiment.
_RESUME_MUST_MATCH = ("seed", "model", "rlhf", "train.init_from", "train.steps",
                      "train.learning_rate")


class RLHFError(stages.StageError):
  """The policy, reward model or prompts do not fit together."""


@flax.struct.dataclass
class RLState:
  step: jax.Array
  policy: Any
  value: Any  # {} unless PPO with a separate value model.
  opt_state: Any
  kl_coef: jax.Array  # PPO's beta (DPO: unused, kept for one checkpoint format).
  rng: jax.Array


def _tokenizer_key(c: ml_collections.ConfigDict) -> tuple[str, str]:
  return c.data.tokenizer, c.data.tokenizer_model


def check_runs(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict,
                                                           ml_collections.ConfigDict, float]:
  """The policy's and the reward model's configs, and the reward threshold; RLHFError
  (one line) when they do not fit together or with the prompt budget."""
  h = config.rlhf
  _, policy = stages.parent_config(config.train.init_from)
  reward_dir, rm = stages.parent_config(h.reward_from)
  if rm.model.head != "scalar":
    raise RLHFError(f"rlhf.reward_from={h.reward_from} is a model.head={rm.model.head!r} run, "
                    "not a reward model: train one with configs/tiny.py:stage=reward.")
  if policy.model.head == "scalar":
    raise RLHFError(f"train.init_from={config.train.init_from} is a reward model; the policy "
                    "must be a language model (an SFT or stage-1 run).")
  if _tokenizer_key(policy) != _tokenizer_key(rm):
    raise RLHFError(f"the policy ({config.train.init_from}) and the reward model "
                    f"({h.reward_from}) use different tokenizers ({_tokenizer_key(policy)} vs "
                    f"{_tokenizer_key(rm)}): the reward model cannot read the policy's tokens.")
  length = h.prompt_tokens + h.response_tokens
  for name, c in (("policy", policy), ("reward model", rm)):
    if length + 1 > c.model.max_seq_len:
      raise RLHFError(f"rlhf.prompt_tokens + rlhf.response_tokens + 1 = {length + 1} exceeds "
                      f"the {name}'s model.max_seq_len={c.model.max_seq_len}: shorten them.")
  eval_path = reward_dir / "eval.json"
  if not eval_path.is_file():
    raise RLHFError(f"rlhf.reward_from={h.reward_from} has no eval.json: let its training "
                    "finish (its held-out evaluation sets the reward threshold).")
  threshold = json.loads(eval_path.read_text()).get("threshold")
  if threshold is None:
    raise RLHFError(f"{eval_path} has no 'threshold' (an older run): delete it and rerun the "
                    "reward model's train command; it resumes at its last step and "
                    "re-evaluates.")
  return policy, rm, float(threshold)


def prompt_tokens(config: ml_collections.ConfigDict, split: str, tokenizer) -> np.ndarray:
  """int32 [n, P]: the first P tokens of every text of `split` that has more than P."""
  h, d = config.rlhf, config.data
  source = sources.data_source(h.prompt_dataset, split, d.data_dir, d.download)
  out = []
  for i in range(len(source)):
    ids = tokenizer.encode(sources.as_text(source[i][h.prompt_key]))
    if len(ids) > h.prompt_tokens:
      out.append(ids[:h.prompt_tokens])
  if not out:
    raise RLHFError(f"no text of {h.prompt_dataset}:{split} is longer than rlhf.prompt_tokens="
                    f"{h.prompt_tokens}.")
  return np.stack(out).astype(np.int32)


class RLHF:
  """Models, frozen parameters and jitted pieces of one PPO / DPO run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.config, self.workdir = config, workdir
    h = self.h = config.rlhf
    policy_cfg, rm_cfg, self.threshold = check_runs(config)
    shared = h.algorithm == "ppo" and h.value == "shared"
    config.model = ml_collections.ConfigDict(policy_cfg.model.to_dict())
    config.model.head = "lm_value" if shared else "lm"
    config.data.tokenizer, config.data.tokenizer_model = _tokenizer_key(policy_cfg)
    self.tokenizer = get_tokenizer(*_tokenizer_key(policy_cfg))
    self.mesh = sharding.make_mesh(config.mesh)
    self.policy_model = build_model(config.model)
    lm_cfg = ml_collections.ConfigDict(config.model.to_dict())
    lm_cfg.head = "lm"
    self.lm_model = build_model(lm_cfg)  # Generation and the reference (ignores score_head).
    self.reward_model = build_model(rm_cfg.model)
    self.score_pooling = rm_cfg.data.score_pooling
    self.separate_value = h.algorithm == "ppo" and not shared
    self.tx = build_optimizer(config.train)
    self.kl = ppo.KLController(h.kl_target, h.kl_horizon)

    length = h.prompt_tokens + h.response_tokens + 1
    self.policy_shardings = self._shardings(self.policy_model, length)
    self.reward_shardings = self._shardings(self.reward_model, length)
    reference, _ = stages.init_params(config.train.init_from,
                                      self._abstract(self.lm_model, length),
                                      self._shardings(self.lm_model, length))
    reward, self.reward_record = stages.init_params(
        h.reward_from, self._abstract(self.reward_model, length), self.reward_shardings)
    self.frozen = {"reference": reference, "reward": reward}  # Never updated.

  def _shardings(self, model: nn.Module, length: int) -> Any:
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, length), jnp.int32))["params"])
    return sharding.logical_shardings(boxed, self.mesh)

  def _abstract(self, model: nn.Module, length: int) -> Any:
    """Shapes and dtypes of `model`'s parameters (what a restore needs; nothing computed)."""
    return nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]))

  def _fresh(self, model: nn.Module, length: int, seed: int) -> Any:
    shardings = self._shardings(model, length)
    init = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, length), jnp.int32))
                                           ["params"]), out_shardings=shardings)
    return init(jax.random.PRNGKey(seed))

  def initial_state(self) -> tuple[RLState, dict[str, Any]]:
    """A fresh state: policy (and value) from their parents, optimizer from scratch."""
    length = self.h.prompt_tokens + self.h.response_tokens + 1
    shared = self.config.model.head == "lm_value"  # Its new score head needs a real init.
    policy, record = stages.init_params(
        self.config.train.init_from,
        self._fresh(self.policy_model, length, self.config.seed) if shared
        else self._abstract(self.policy_model, length), self.policy_shardings)
    value = {}
    if self.separate_value:
      value, _ = stages.init_params(self.h.reward_from, self._abstract(self.reward_model, length),
                                    self.reward_shardings)
    params = {"policy": policy, "value": value}
    state = RLState(step=jnp.zeros((), jnp.int32), policy=policy, value=value,
                    opt_state=jax.jit(self.tx.init)(params),
                    kl_coef=jnp.asarray(self.h.kl_coef, jnp.float32),
                    rng=jax.random.PRNGKey(self.config.seed))
    # Scalars and optimizer counts replicated on the mesh, as a step returns them: the
    # steps then compile once per run.
    replicated = sharding.replicated(self.mesh)
    state = jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None),
                                                   jax.sharding.NamedSharding)
                         else jax.device_put(x, replicated), state)
    return state, record

  # --- pieces shared by PPO, DPO and evaluation ---------------------------------------

  def sample(self, params: Any, prompts: np.ndarray, key: jax.Array) -> jax.Array:
    """int32 [B, R] sampled continuations of `prompts` [B, P] (the policy's lm head)."""
    h = self.h
    return generate(self.lm_model, params, jnp.asarray(prompts), key,
                    max_new_tokens=h.response_tokens, temperature=h.temperature,
                    top_k=h.top_k, top_p=h.top_p, mesh=self.mesh)

  def response_logprobs(self, model: nn.Module, params: Any, prompts: jax.Array,
                        responses: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Per response token: log-prob [B, R], entropy [B, R] and, for 'lm_value', the value
    [B, R] of the state before it (else None)."""
    p = prompts.shape[1]
    seq = jnp.concatenate([prompts, responses], axis=1)[:, :-1]
    out = model.apply({"params": params}, seq)
    logits, values = out if isinstance(out, tuple) else (out, None)
    logits = logits[:, p - 1:]
    values = None if values is None else values[:, p - 1:]
    return ppo.token_logprobs(logits, responses), ppo.entropy(logits), values

  def score(self, reward: Any, prompts: jax.Array, responses: jax.Array) -> jax.Array:
    """[B] reward-model score of prompt + response (to its first eos) + eos, minus the
    reward model's threshold (> 0: it would call the text preferred)."""
    eos = self.tokenizer.eos_id
    mask = ppo.response_mask(responses, eos)
    n = jnp.sum(mask, axis=-1).astype(jnp.int32)  # Tokens up to and including an eos.
    ended = jnp.any(responses == eos, axis=-1)
    seq = jnp.concatenate([prompts, responses, jnp.full_like(responses[:, :1], eos)], axis=1)
    at = prompts.shape[1] + jnp.where(ended, n - 1, responses.shape[1])  # [B] the <eos>
    scores = self.reward_model.apply({"params": reward}, seq)  # [B, P + R + 1]
    if self.score_pooling == "mean":  # As the reward model was trained: over the text.
      text = jnp.arange(seq.shape[1])[None, :] <= at[:, None]  # [B, P + R + 1]
      return ppo.masked_mean_rows(scores, text) - self.threshold
    return jnp.take_along_axis(scores, at[:, None], axis=1)[:, 0] - self.threshold

  def evaluate(self, params: Any, prompts: np.ndarray, key: jax.Array) -> dict[str, Any]:
    """Held-out figures of the policy `params` on fixed prompts and a fixed key."""
    responses = self.sample(params, prompts, key)
    return self._eval_figures(params, self.frozen, jnp.asarray(prompts), responses)

  @functools.partial(jax.jit, static_argnums=0)
  def _eval_figures(self, params, frozen, prompts, responses):
    mask = ppo.response_mask(responses, self.tokenizer.eos_id)
    logp, ent, _ = self.response_logprobs(self.lm_model, params, prompts, responses)
    ref_logp, _, _ = self.response_logprobs(self.lm_model, frozen["reference"], prompts,
                                            responses)
    score = self.score(frozen["reward"], prompts, responses)
    num_bytes = jnp.sum(jnp.asarray(self.tokenizer.token_num_bytes)[responses] * mask)
    return {
        "reward": jnp.mean(score),
        "positive_share": jnp.mean((score > 0).astype(jnp.float32)),
        "kl_per_response": jnp.mean(jnp.sum((logp - ref_logp) * mask, axis=-1)),
        "response_tokens": jnp.mean(jnp.sum(mask, axis=-1)),
        "entropy": ppo.masked_mean(ent, mask),
        "reference_bits_per_byte": -jnp.sum(ref_logp * mask) / math.log(2)
                                   / jnp.maximum(num_bytes, 1.0),
        "responses": responses,
    }

  # --- PPO -------------------------------------------------------------------------------

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def ppo_step(self, state: RLState, frozen: dict[str, Any], prompts: jax.Array,
               responses: jax.Array) -> tuple[RLState, dict[str, jax.Array]]:
    """Scores one rollout, then `epochs` x `minibatches` clipped PPO updates.
    frozen: {'reference', 'reward'} parameters."""
    h = self.h
    mask = ppo.response_mask(responses, self.tokenizer.eos_id)
    old_logp, _, values = self.response_logprobs(self.policy_model, state.policy, prompts,
                                                 responses)
    if self.separate_value:
      values = self._values(state.value, prompts, responses)
    ref_logp, _, _ = self.response_logprobs(self.lm_model, frozen["reference"], prompts,
                                            responses)
    score = self.score(frozen["reward"], prompts, responses)
    rewards, kl = ppo.shaped_rewards(score, old_logp, ref_logp, mask, state.kl_coef)
    advantages, returns = ppo.gae(rewards, values, mask, h.gamma, h.lam)
    advantages = ppo.whiten(advantages, mask)
    rollout = dict(prompts=prompts, responses=responses, mask=mask, old_logp=old_logp,
                   old_values=values, advantages=advantages, returns=returns)
    b, m = prompts.shape[0], h.minibatches
    rng, perm_rng = jax.random.split(state.rng)

    def minibatch_loss(params, mb):
      logp, ent, v = self.response_logprobs(self.policy_model, params["policy"],
                                            mb["prompts"], mb["responses"])
      if self.separate_value:
        v = self._values(params["value"], mb["prompts"], mb["responses"])
      pg, stats = ppo.policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"],
                                  h.clip_ratio)
      vf = ppo.value_loss(v, mb["old_values"], mb["returns"], mb["mask"], h.clip_value)
      stats.update(policy_loss=pg, value_loss=vf, entropy=ppo.masked_mean(ent, mb["mask"]))
      return pg + h.value_coef * vf, stats

    def update(carry, key):
      params, opt_state = carry
      order = jax.random.permutation(key, b).reshape(m, b // m)

      def one(carry, idx):
        params, opt_state = carry
        mb = jax.tree.map(lambda x: x[idx], rollout)
        grads, stats = jax.grad(minibatch_loss, has_aux=True)(params, mb)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        stats["grad_norm"] = optax.global_norm(grads)
        return (optax.apply_updates(params, updates), opt_state), stats

      return jax.lax.scan(one, (params, opt_state), order)

    params = {"policy": state.policy, "value": state.value}
    (params, opt_state), stats = jax.lax.scan(update, (params, state.opt_state),
                                              jax.random.split(perm_rng, h.epochs))
    kl_per_response = jnp.mean(jnp.sum(kl, axis=-1))
    new_state = state.replace(step=state.step + 1, policy=params["policy"],
                              value=params["value"], opt_state=opt_state, rng=rng,
                              kl_coef=self.kl.update(state.kl_coef, kl_per_response, b))
    metrics = {k: jnp.mean(v) for k, v in stats.items()}
    metrics.update(reward=jnp.mean(score), kl_per_response=kl_per_response,
                   kl_coef=state.kl_coef, response_tokens=jnp.mean(jnp.sum(mask, axis=-1)))
    return new_state, metrics

  def _values(self, value_params, prompts, responses):
    """[B, R] values of the states before each response token (separate value model)."""
    seq = jnp.concatenate([prompts, responses], axis=1)[:, :-1]
    return self.reward_model.apply({"params": value_params}, seq)[:, prompts.shape[1] - 1:]

  # --- DPO -------------------------------------------------------------------------------

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def dpo_step(self, state: RLState, frozen: dict[str, Any], prompts: jax.Array,
               first: jax.Array, second: jax.Array) -> tuple[RLState, dict[str, jax.Array]]:
    """One DPO update on two reference samples per prompt, ranked by the reward model;
    pairs the reward model scores equal carry no weight."""
    s1, s2 = self.score(frozen["reward"], prompts, first), self.score(frozen["reward"],
                                                                      prompts, second)
    better = (s1 >= s2)[:, None]
    chosen, rejected = jnp.where(better, first, second), jnp.where(better, second, first)
    weight = (s1 != s2).astype(jnp.float32)

    def seq_logp(model, params, responses):
      logp, _, _ = self.response_logprobs(model, params, prompts, responses)
      return jnp.sum(logp * ppo.response_mask(responses, self.tokenizer.eos_id), axis=-1)

    ref_c, ref_r = (seq_logp(self.lm_model, frozen["reference"], chosen),
                    seq_logp(self.lm_model, frozen["reference"], rejected))

    def loss_fn(params):
      losses, margin = dpo.dpo_loss(seq_logp(self.policy_model, params["policy"], chosen),
                                    seq_logp(self.policy_model, params["policy"], rejected),
                                    ref_c, ref_r, self.h.dpo_beta)
      n = jnp.maximum(jnp.sum(weight), 1.0)
      return jnp.sum(losses * weight) / n, jnp.sum(margin * weight) / n

    params = {"policy": state.policy, "value": state.value}
    (loss, margin), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    new_state = state.replace(step=state.step + 1, policy=params["policy"],
                              opt_state=opt_state, rng=jax.random.split(state.rng)[0])
    return new_state, {"dpo_loss": loss, "margin": margin, "grad_norm": optax.global_norm(grads),
                       "reward": jnp.mean(jnp.maximum(s1, s2)),
                       "pairs": jnp.sum(weight)}


def _write_samples(path: pathlib.Path, tokenizer, prompts: np.ndarray, responses: np.ndarray,
                   n: int = 16) -> None:
  """The first n held-out prompts and their responses, one per line: 'prompt || response'."""
  cut = lambda r: r[:int(np.argmax(r == tokenizer.eos_id))] if np.any(  # noqa: E731
      r == tokenizer.eos_id) else r
  lines = [tokenizer.decode(p) + " || " + tokenizer.decode(cut(r)).replace("\n", " ")
           for p, r in zip(prompts[:n], responses[:n])]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_rlhf(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               stop_after: int | None = None) -> dict[str, Any]:
  """Runs PPO or DPO (config.rlhf.algorithm) in `workdir`, resuming if it can.

  Returns:
    The final held-out figures (also in eval.json), or {'stopped_at': step} when
    `stop_after` ends the run early (with a checkpoint).
  """
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top  (imports us)
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).expanduser().resolve()
  run = RLHF(config, workdir)  # Checks the runs, fills config.model from the policy run.
  trainer.prepare_workdir(workdir)  # Only once the runs fit: bad input writes nothing.
  checkpointer = Checkpointer(workdir / "checkpoints", config.train.max_checkpoints,
                              config.train.async_checkpointing)
  if checkpointer.latest_step() is not None and (workdir / "config.json").is_file():
    trainer.check_resumable(trainer.load_config(workdir), config, workdir, _RESUME_MUST_MATCH)
  (workdir / "config.json").write_text(config_lib.to_json(config))
  h, train_cfg = config.rlhf, config.train
  train_prompts = grain.MapDataset.source(
      prompt_tokens(config, config.data.train_split, run.tokenizer)
  ).seed(config.seed).shuffle().repeat(None)
  eval_prompts = prompt_tokens(config, config.data.eval_split, run.tokenizer)[:h.eval_prompts]
  eval_key = jax.random.PRNGKey(config.seed + 1)

  fresh, policy_record = run.initial_state()
  position = 0
  if checkpointer.latest_step() is None:
    state = fresh  # The policy's run is the parent; the reward model is recorded with it.
    stages.write_parent(workdir, {**policy_record, "reward_model": run.reward_record})
  else:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    _, state, data_state, _ = checkpointer.restore_latest(shardings, abstract)
    position = int(data_state["prompt_position"])
  del fresh
  start = int(state.step)
  writer = MetricWriter(workdir, resume_step=start)
  if start == 0:
    before = jax.device_get(run.evaluate(state.policy, eval_prompts, eval_key))
    writer.write(0, {k: v for k, v in before.items() if k != "responses"}, prefix="eval_")
    _write_samples(workdir / "samples_before.txt", run.tokenizer, eval_prompts,
                   before["responses"])
  last = train_cfg.steps if stop_after is None else min(stop_after, train_cfg.steps)
  bar = tqdm.tqdm(total=train_cfg.steps, initial=start, unit="step", dynamic_ncols=True)
  try:
    for step in range(start + 1, last + 1):
      prompts = np.stack([train_prompts[position + i] for i in range(h.batch_size)])
      position += h.batch_size
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
      prompts = jnp.asarray(prompts)
      if h.algorithm == "ppo":
        responses = run.sample(state.policy, prompts, key)
        state, metrics = run.ppo_step(state, run.frozen, prompts, responses)
      else:
        k1, k2 = jax.random.split(key)
        reference = run.frozen["reference"]
        state, metrics = run.dpo_step(state, run.frozen, prompts,
                                      run.sample(reference, prompts, k1),
                                      run.sample(reference, prompts, k2))
      metrics = jax.device_get(metrics)
      if step % train_cfg.log_every == 0 or step == last:
        writer.write(step, metrics)
        bar.set_postfix(reward=f"{float(metrics['reward']):+.3f}")
      if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step != train_cfg.steps:
        figures = run.evaluate(state.policy, eval_prompts, eval_key)
        writer.write(step, {k: v for k, v in figures.items() if k != "responses"},
                     prefix="eval_")
        bar.write(f"step {step}: held-out reward {float(figures['reward']):+.3f}  positive "
                  f"{float(figures['positive_share']):.1%}  KL {float(figures['kl_per_response']):.2f}")
      bar.update(1)
      every = train_cfg.checkpoint_every
      if step == last or (every and step % every == 0):
        checkpointer.save(step, state, {"prompt_position": position})
    checkpointer.wait()
  finally:
    bar.close()
    checkpointer.close()
  if last < train_cfg.steps:
    writer.close()
    return {"stopped_at": last}

  figures = jax.device_get(run.evaluate(state.policy, eval_prompts, eval_key))
  responses = figures.pop("responses")
  result = {k: float(v) for k, v in figures.items()}
  writer.write(train_cfg.steps, result, prefix="eval_")
  writer.close()
  (workdir / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  _write_samples(workdir / "samples.txt", run.tokenizer, eval_prompts, responses)
  logging.info("held-out: %s", result)
  return result
