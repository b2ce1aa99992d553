"""PPO / DPO runs end to end (`train_rlhf` via `train_and_evaluate`) on tiny parents.

Checked: a run stopped and resumed reaches bit-identical checkpoints (policy, value,
optimizer state, beta, RNG) and metrics as a straight run, for PPO and DPO; PPO with a
shared value head starts from the parent's trunk, and eval / generate read its policy;
every mismatch between the policy, the reward model and the prompt budget is one line
before any checkpoint is written,
and through the CLI an exit status 2. Oracles: checkpoints read back raw with orbax (no
model built), the parents' own checkpoints, PRNGKey(seed). Also: ppo_step compiles once
per run, and a bad input or an unwritable workdir leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from dsv2_jax import config as config_lib
from dsv2_jax.rlhf import ppo
from dsv2_jax.rlhf import trainer as rlhf_trainer
from dsv2_jax.train import stages, trainer
from tests.helpers import REPO, tiny_config


_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """Every run builds a new `RLHF`, whose jitted methods (`self` static) trace and compile
  afresh; with XLA's persistent cache a repeated compile is a file read (18 s -> 6 s per
  PPO run). Restored after this module."""
  saved = {k: getattr(jax.config, k) for k in _CACHE_FLAGS}
  jax.config.update(_CACHE_FLAGS[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(_CACHE_FLAGS[1], 0.0)
  jax.config.update(_CACHE_FLAGS[2], 0)
  compilation_cache.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def parents(tmp_path_factory, data_dir):
  """(language model, reward model) workdirs: 3 steps of text, then 2 of review pairs."""
  root = tmp_path_factory.mktemp("rlhf_parents")
  lm, rm = root / "lm", root / "reward"
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  c.data.dataset = "wiki_excerpt"
  c.train.update(steps=3, checkpoint_every=0)
  trainer.train_and_evaluate(c, lm)
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  c.model.head = "scalar"
  c.data.update(dataset="rotten_tomatoes", format="preference", packing="none")
  c.train.update(init_from=str(lm), steps=2, checkpoint_every=0)
  trainer.train_and_evaluate(c, rm)
  return lm, rm


def rlhf_config(data_dir, lm, rm, algorithm="ppo", **rlhf):
  """Batches of 4 prompts of 8 tokens, 8-token responses, a checkpoint every step. The
  prompts are openings of wiki_excerpt's 95 + 11 articles: the default Rotten Tomatoes
  prompts take ~1 s per run just to tokenize all 11k reviews (same code path)."""
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  c.data.dataset = "wiki_excerpt"
  c.train.update(init_from=str(lm), steps=3, warmup_steps=0, learning_rate=1e-3, log_every=1,
                 checkpoint_every=1, max_checkpoints=10)
  c.rlhf.update({**dict(algorithm=algorithm, reward_from=str(rm), batch_size=4, minibatches=2,
                        epochs=2, prompt_tokens=8, response_tokens=8, eval_prompts=8,
                        prompt_dataset="wiki_excerpt"), **rlhf})
  return c


def checkpoint(workdir, step=None):
  """(step, state tree) of a checkpoint (the latest by default) read back raw from disk:
  no model or RLHF object is built, so nothing of the code under test shapes the oracle."""
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  step = steps[-1] if step is None else step
  with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as c:
    warnings.filterwarnings("ignore", "Sharding info not provided")  # Host arrays suffice.
    tree = c.restore(workdir / "checkpoints" / str(step) / "state")
  data = json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())
  return step, jax.device_get(tree), data


def assert_trees_equal(a, b):
  paths_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  paths_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(paths_a, paths_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def metric_lines(workdir):
  return (workdir / "metrics.jsonl").read_text().splitlines()


def parent_params(workdir):
  return checkpoint(workdir)[1]["params"]


def without(tree, *names):
  return {k: v for k, v in tree.items() if k not in names}


def eval_lines(workdir, step):
  return [x for x in map(json.loads, metric_lines(workdir))
          if x["step"] == step and "eval_reward" in x]


@pytest.mark.parametrize("algorithm,steps,interrupt", [("ppo", 3, "stop_after"),
                                                       ("dpo", 2, "copy")])
def test_resumed_run_equals_a_straight_run(tmp_path, data_dir, parents, algorithm, steps,
                                           interrupt):
  """PPO: stopped by stop_after=1, then rerun. DPO (cheaper, one run less): a copy of the
  straight run cut back to its step-1 checkpoint (the resumed run also drops the metrics
  lines after step 1), then rerun."""
  lm, rm = parents
  c = rlhf_config(data_dir, lm, rm, algorithm)
  c.train.steps = steps
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  result = trainer.train_and_evaluate(c, straight)
  if interrupt == "stop_after":
    stopped = trainer.train_and_evaluate(c, resumed, stop_after=1)
    assert stopped.step == 1 and not (resumed / "eval.json").exists()
    assert [json.loads(x)["step"] for x in metric_lines(resumed)] == [0, 1]
  else:
    shutil.copytree(straight, resumed)
    for step in range(2, steps + 1):
      shutil.rmtree(resumed / "checkpoints" / str(step))
    for name in ("eval.json", "samples.txt"):
      (resumed / name).unlink()
  assert trainer.train_and_evaluate(c, resumed) == result
  step_a, a, data_a = checkpoint(straight)
  step_b, b, data_b = checkpoint(resumed)
  assert step_a == step_b == int(a["step"]) == steps
  assert data_a == data_b == {"prompt_position": steps * c.rlhf.batch_size}
  assert_trees_equal(a, b)  # policy, value, opt_state, kl_coef, rng, step
  assert metric_lines(straight) == metric_lines(resumed)
  assert (straight / "eval.json").read_text() == (resumed / "eval.json").read_text()
  assert (straight / "samples.txt").read_text() == (resumed / "samples.txt").read_text()
  # The comparison can fail: training moved the policy (from the parent) and the RNG.
  start = parent_params(lm)
  assert jax.tree.structure(a["policy"]) == jax.tree.structure(start)
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(a["policy"]), jax.tree.leaves(start)))
  assert not np.array_equal(a["rng"], jax.random.PRNGKey(c.seed))
  # Step 0 evaluates the parent itself: no KL from the reference.
  assert eval_lines(straight, 0)[0]["eval_kl_per_response"] == 0.0
  if algorithm == "ppo":  # The separate value model starts from the reward model.
    reward = parent_params(rm)
    assert jax.tree.structure(a["value"]) == jax.tree.structure(reward)
    assert not np.array_equal(a["value"]["score_head"]["w"], reward["score_head"]["w"])
    assert float(a["kl_coef"]) != c.rlhf.kl_coef  # The adaptive controller moved beta.
  else:
    assert not a.get("value") and float(a["kl_coef"]) == np.float32(c.rlhf.kl_coef)


def test_shared_value_head_starts_from_the_parent_trunk(tmp_path, data_dir, parents):
  lm, rm = parents
  workdir = tmp_path / "shared"
  c = rlhf_config(data_dir, lm, rm, value="shared")
  c.train.steps = 1
  result = trainer.train_and_evaluate(c, workdir)
  assert np.isfinite(result["reward"])
  _, after, _ = checkpoint(workdir)
  assert not after.get("value") and set(after["policy"]) == {"embedder", "layers", "final_norm",
                                                              "head", "score_head"}
  # Step 0: the policy trunk and LM head are the parent's, the score head fresh.
  run = rlhf_trainer.RLHF(trainer.load_config(workdir), workdir)
  start = jax.device_get(run.initial_state()[0].policy)
  assert_trees_equal(without(start, "score_head"), parent_params(lm))
  assert eval_lines(workdir, 0)[0]["eval_kl_per_response"] == 0.0
  assert not np.array_equal(start["score_head"]["w"], after["policy"]["score_head"]["w"])
  record = json.loads((workdir / stages.PARENT_FILE).read_text())
  assert record["new_head"] == ["score_head"] and record["path"] == str(lm.resolve())
  assert record["reward_model"]["path"] == str(rm.resolve())
  # eval / generate read the policy's language model (the value head is left out).
  inference = trainer.Run(trainer.inference_config(trainer.load_config(workdir)), workdir)
  params, _, step = inference.trained_params()
  assert step == 1 and inference.config.model.head == "lm"
  assert_trees_equal(jax.device_get(params), without(after["policy"], "score_head"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv2_jax", "generate", "--workdir", str(workdir),
                         "--prompt", "The", "--max_new_tokens", "4"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("The"), proc.stderr[-2000:]


def test_ppo_step_traces_once_per_run(tmp_path, data_dir, parents, monkeypatch):
  calls = []
  shaped_rewards = ppo.shaped_rewards
  monkeypatch.setattr(ppo, "shaped_rewards", lambda *a: calls.append(1) or shaped_rewards(*a))
  run = rlhf_trainer.RLHF(rlhf_config(data_dir, *parents), tmp_path)
  state, _ = run.initial_state()
  prompts = jnp.asarray(np.arange(32).reshape(4, 8) + 65, jnp.int32)
  for step in range(3):
    state, _ = run.ppo_step(state, run.frozen, prompts, run.sample(state.policy, prompts,
                                                                   jax.random.PRNGKey(step)))
  assert int(state.step) == 3
  assert len(calls) == 1  # One trace (shaped_rewards runs once per trace of ppo_step).


def _retokenized(tmp_path, rm):
  copy = tmp_path / "reward_copy"
  shutil.copytree(rm, copy)
  c = json.loads((copy / "config.json").read_text())
  c["data"]["tokenizer_model"] = "other.model"
  (copy / "config.json").write_text(json.dumps(c))
  return copy


def _no_threshold(tmp_path, rm):
  copy = tmp_path / "reward_copy"
  shutil.copytree(rm, copy)
  result = json.loads((copy / "eval.json").read_text())
  del result["threshold"]
  (copy / "eval.json").write_text(json.dumps(result))
  return copy


BAD_RUNS = [
    ("reward is a language model", lambda tmp, lm, rm: (lm, lm, {}),
     r"rlhf.reward_from=\S+/lm is a model.head='lm' run, not a reward model"),
    ("policy is the reward model", lambda tmp, lm, rm: (rm, rm, {}),
     r"train.init_from=\S+/reward is a reward model"),
    ("other tokenizer", lambda tmp, lm, rm: (lm, _retokenized(tmp, rm), {}),
     r"use different tokenizers \(\('byte', ''\) vs \('byte', 'other.model'\)\)"),
    ("too long", lambda tmp, lm, rm: (lm, rm, dict(prompt_tokens=100, response_tokens=28)),
     r"rlhf.prompt_tokens \+ rlhf.response_tokens \+ 1 = 129 exceeds the policy's "
     r"model.max_seq_len=128"),
    ("no threshold", lambda tmp, lm, rm: (lm, _no_threshold(tmp, rm), {}),
     r"eval.json has no 'threshold'"),
]


@pytest.mark.parametrize("name,make,message", BAD_RUNS, ids=[b[0] for b in BAD_RUNS])
def test_runs_that_do_not_fit_are_one_line(tmp_path, data_dir, parents, name, make, message):
  del name
  init_from, reward_from, fields = make(tmp_path, *parents)
  c = rlhf_config(data_dir, init_from, reward_from, **fields)
  with pytest.raises(rlhf_trainer.RLHFError, match=message) as e:
    trainer.train_and_evaluate(c, tmp_path / "run")
  assert isinstance(e.value, stages.StageError) and "\n" not in str(e.value)
  assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("fields,message", [
    (dict(init_from=""), r"set --init_from \(train.init_from\)"),
    (dict(reward_from=""), "needs a reward model: set rlhf.reward_from"),
    (dict(minibatches=3), "rlhf.minibatches=3 must divide rlhf.batch_size=4"),
])
def test_config_validation(tmp_path, data_dir, fields, message):
  c = rlhf_config(data_dir, tmp_path / "lm", tmp_path / "rm")
  if "init_from" in fields:
    c.train.init_from = fields.pop("init_from")
  c.rlhf.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    trainer.train_and_evaluate(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_runs_that_do_not_fit_write_nothing(tmp_path, data_dir, parents):
  lm, _ = parents
  with pytest.raises(rlhf_trainer.RLHFError, match="not a reward model"):
    trainer.train_and_evaluate(rlhf_config(data_dir, lm, lm), tmp_path / "run")
  assert not (tmp_path / "run").exists()  # As the CLI promises for every bad input.


def cli_train(workdir, init_from, reward_from):
  """`python -m dsv2_jax train` of configs/tiny.py:stage=ppo (its model comes from init_from)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "dsv2_jax", "train", "--workdir", str(workdir),
          "--config", str(REPO / "configs" / "tiny.py") + ":stage=ppo",
          "--init_from", str(init_from), "--reward_from", str(reward_from)]
  return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_cli_reward_from_a_language_model_exits_2(tmp_path, parents):
  lm, _ = parents
  proc = cli_train(tmp_path / "run", lm, lm)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
  assert "is a model.head='lm' run, not a reward model" in proc.stderr
  assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_cli_unwritable_workdir_exits_2(tmp_path, parents):
  (tmp_path / "file").write_text("")
  proc = cli_train(tmp_path / "file" / "run", *parents)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and "cannot be written" in proc.stderr, proc.stderr
