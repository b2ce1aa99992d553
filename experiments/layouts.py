"""Every parallel layout against one device, on 8 simulated CPU devices (docs/parallel.md).

  python -m experiments.layouts CASES_JSON [--out FILE]

CASES_JSON is a list of [layout, model] pairs (names from LAYOUTS and MODELS). For each
model, the unsharded single-device run is the oracle: its gradients at init and its
losses over 3 training steps. Each case reports the largest relative loss difference,
the largest relative gradient difference (per parameter: max |g - g_ref| over
max |g_ref|), the MoE metrics' differences, the collectives in the compiled step and the
per-device shard shapes of a few parameters, e.g. (docs/results.md section 6.1):

  python -m experiments.layouts '[["fsdp8","dsa"],["dp2_tp4_accum2","dense"]]'

  python -m experiments.layouts --checkpoint MODEL LAYOUTS_JSON

trains 1 step under `fsdp8`, saves, restores under each layout (`single`: one device)
and reports the largest difference of the restored state from the saved one.

  python -m experiments.layouts --generate MODEL LAYOUTS_JSON

generates greedily from the same prompts under each layout and on one device.
The JSON goes to stdout, or to --out. tests/parallel/test_layouts.py runs these checks
(XLA's heavy passes are off: the models are tiny and compile time dominates).
"""

import argparse
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flax  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)  # Tiny models: compile fast.
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dsv2_jax import config as config_lib  # noqa: E402
from dsv2_jax.infer.generate import generate  # noqa: E402
from dsv2_jax.model.transformer import build_model  # noqa: E402
from dsv2_jax.parallel import sharding  # noqa: E402
from dsv2_jax.train.checkpoint import Checkpointer  # noqa: E402
from dsv2_jax.train.optimizer import build_optimizer  # noqa: E402
from dsv2_jax.train.state import abstract_state, create_train_state  # noqa: E402
from dsv2_jax.train.step import batch_grads, jit_train_step  # noqa: E402
from experiments import common  # noqa: E402

LAYOUTS = {
    "single": dict(data=1),
    "dp8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
    "dp2_tp4": dict(data=2, tensor=4),
    "dp2_ep4": dict(data=2, expert=4),
    "fsdp2_ep4": dict(fsdp=2, expert=4),  # ZeRO-3 and expert parallelism together.
    "pp4_dp2": dict(data=2, stage=4),
    "pp2_tp2_dp2": dict(data=2, tensor=2, stage=2),
    # Gradient accumulation (2 microbatches) on a mesh == the single-device whole batch.
    "dp2_tp4_accum2": dict(data=2, tensor=4, accum=2),
}
MODELS = {
    "dense": {},
    "dense_l4": dict(num_layers=4),  # Divides over 2 and 4 stages (3 does not).
    "dsa": dict(attention="dsa", dsa=dict(window=8, block=8, budget="fixed", budget_value=4)),
    "moe": dict(num_layers=2,  # Fewer than the others: MoE layers compile slowly.
                moe=dict(num_experts=8, top_k=2, gate_hidden=16, expert_hidden=32)),
    # The DeepSeek-V2 layout: MLA with low-rank queries, one dense layer, then DeepSeekMoE
    # (linear router, 2 of 4 groups, a shared expert, scaled weights).
    "v2": dict(num_layers=3,
               mla=dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8),
               moe=dict(num_experts=8, top_k=2, expert_hidden=16, router="linear",
                        num_shared_experts=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.0, first_dense_layers=1)),
}
ROWS, LENGTH, STEPS = 8, 32, 3
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def make_config(model: str, layout: str) -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.model.update(d_model=32, num_layers=3, num_heads=4, ffn_hidden=64, max_seq_len=LENGTH)
  c.model.update(MODELS[model])  # After the defaults above: may change num_layers.
  c.data.update(seq_len=LENGTH, batch_size=ROWS)
  c.train.update(steps=10, warmup_steps=1, learning_rate=1e-2)
  sizes = dict(LAYOUTS[layout])
  c.train.grad_accum_steps = sizes.pop("accum", 1)
  c.mesh = ml_collections.ConfigDict(sharding.parse_mesh(
      ",".join(f"{k}={v}" for k, v in sizes.items())))
  config_lib.validate(c)
  return c


def batches() -> list[dict[str, np.ndarray]]:
  rng = np.random.RandomState(0)
  # Real text would do as well; random tokens make every expert and head busy.
  return [{"inputs": rng.randint(0, 256, (ROWS, LENGTH)).astype(np.int32),
           "targets": rng.randint(0, 256, (ROWS, LENGTH)).astype(np.int32),
           "weights": (rng.rand(ROWS, LENGTH) > 0.1).astype(np.float32)}
          for _ in range(STEPS)]


def mesh_of(config: ml_collections.ConfigDict, layout: str) -> jax.sharding.Mesh:
  devices = jax.devices()[:1] if layout == "single" else jax.devices()
  return sharding.make_mesh(config.mesh, devices)


def run(model_name: str, layout: str) -> dict:
  """Gradients at init and losses over STEPS steps of one model under one layout."""
  config = make_config(model_name, layout)
  mesh = mesh_of(config, layout)
  model, tx = build_model(config.model), build_optimizer(config.train)
  state, shardings = create_train_state(model, tx, 0, LENGTH, mesh)
  data = batches()
  accum = config.train.grad_accum_steps
  grad_fn = jax.jit(
      sharding.with_activation_rules(
          lambda p, b: batch_grads(p, b, state.rng, model=model, accum_steps=accum)[0], mesh),
      in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
      out_shardings=shardings.params)
  grads = jax.device_get(grad_fn(state.params, sharding.put_batch(data[0], mesh)))
  step = jit_train_step(model, tx, mesh, shardings, accum).lower(
      state, sharding.put_batch(data[0], mesh)).compile()
  hlo = step.as_text()
  collectives = {op: hlo.count(f" {op}(") for op in COLLECTIVES}
  losses = []
  for batch in data:
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  flat = flax.traverse_util.flatten_dict(state.params, sep="/")
  shards = {k: list(v.sharding.shard_shape(v.shape)) for k, v in flat.items()
            if k.endswith(("query/w", "ffn/up/w", "moe/w_in", "embedder/embedding",
                           "key_up/w", "kv_down/w", "query_up/w"))}
  return {"losses": losses, "grads": grads, "shards": shards, "collectives": collectives,
          "metrics": {k: float(v) for k, v in metrics.items()}}


def compare(case: dict, ref: dict) -> dict:
  loss_rel = max(abs(a - b) / abs(b) for a, b in zip(case["losses"], ref["losses"]))
  grad_rel = {}
  ref_flat = flax.traverse_util.flatten_dict(ref["grads"], sep="/")
  for key, g in flax.traverse_util.flatten_dict(case["grads"], sep="/").items():
    r = np.asarray(ref_flat[key])
    grad_rel[key] = float(np.max(np.abs(np.asarray(g) - r)) / max(np.max(np.abs(r)), 1e-30))
  worst = max(grad_rel, key=grad_rel.get)
  metric_rel = {k: abs(v - ref["metrics"][k]) / max(abs(ref["metrics"][k]), 1e-30)
                for k, v in case["metrics"].items() if k != "moe/executed_rows"}
  return {"loss_rel": loss_rel, "grad_rel": grad_rel[worst], "worst_grad": worst,
          "metric_rel": metric_rel, "losses": case["losses"], "ref_losses": ref["losses"],
          "shards": case["shards"], "collectives": case["collectives"]}


def check_layouts(cases: list[list[str]]) -> dict:
  out, refs = {}, {}
  for layout, model_name in cases:
    if model_name not in refs:
      refs[model_name] = run(model_name, "single")
    out[f"{layout}/{model_name}"] = compare(run(model_name, layout), refs[model_name])
  return out


def check_checkpoint(model_name: str, layouts: list[str]) -> dict:
  """Trains 1 step under fsdp8, saves, restores under each layout; max |param diff|."""
  config = make_config(model_name, "fsdp8")
  mesh = mesh_of(config, "fsdp8")
  model, tx = build_model(config.model), build_optimizer(config.train)
  state, shardings = create_train_state(model, tx, 0, LENGTH, mesh)
  state, _ = jit_train_step(model, tx, mesh, shardings)(
      state, sharding.put_batch(batches()[0], mesh))
  saved = jax.device_get(state)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    writer = Checkpointer(tmp, 1, use_async=False)
    writer.save(1, state, {"position": 7})
    writer.close()
    for layout in layouts:
      target_mesh = mesh_of(make_config(model_name, layout), layout)
      boxed = abstract_state(model, tx, LENGTH)
      target = sharding.logical_shardings(boxed, target_mesh)
      restored, data_state = Checkpointer(tmp, 1, use_async=False).restore(
          1, target, flax.linen.meta.unbox(boxed))
      diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                           jax.device_get(restored), saved)
      leaf = restored.params["layers"]["attention"]["query"]["w"]  # [L, D, N, H]
      out[layout] = {"max_abs_diff": max(jax.tree.leaves(diffs)),
                     "data_state": data_state,
                     "devices": len(leaf.sharding.device_set),
                     "query_shard": list(leaf.sharding.shard_shape(leaf.shape))}
  return out


def check_generation(model_name: str, layouts: list[str]) -> dict:
  """Greedy generation under each layout next to one device's: tokens and collectives."""
  prompts = jnp.asarray(np.random.RandomState(1).randint(0, 256, (ROWS, 8)), jnp.int32)
  out, ref = {}, None
  for layout in ["single"] + layouts:
    config = make_config(model_name, layout)
    mesh = mesh_of(config, layout)
    model, tx = build_model(config.model), build_optimizer(config.train)
    state, _ = create_train_state(model, tx, 0, LENGTH, mesh)  # Same seed: same params.
    kwargs = dict(max_new_tokens=6, temperature=0.0, top_k=0,
                  mesh=None if layout == "single" else mesh)
    rng = jax.random.PRNGKey(0)
    tokens = np.asarray(generate(model, state.params, prompts, rng, **kwargs)).tolist()
    if ref is None:
      ref = tokens
      continue
    hlo = generate.lower(model, state.params, prompts, rng, **kwargs).compile().as_text()
    out[layout] = {"equal": tokens == ref, "tokens": tokens, "ref_tokens": ref,
                   "collectives": {op: hlo.count(f" {op}(") for op in COLLECTIVES}}
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("cases", help="JSON list of [layout, model] pairs; with --checkpoint "
                      "or --generate, a JSON list of layouts.")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--checkpoint", metavar="MODEL", help="Save under fsdp8, restore under "
                     "each layout.")
  group.add_argument("--generate", metavar="MODEL", help="Greedy generation per layout.")
  parser.add_argument("--out", default="-", help="JSON file ('-': stdout).")
  args = parser.parse_args(argv)
  if args.generate:
    cases = check_generation(args.generate, json.loads(args.cases))
  elif args.checkpoint:
    cases = check_checkpoint(args.checkpoint, json.loads(args.cases))
  else:
    cases = check_layouts(json.loads(args.cases))
  common.write({"command": common.command("experiments.layouts", argv),
                "devices": jax.device_count(), "cases": cases}, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
