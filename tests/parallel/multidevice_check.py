"""Run in a fresh process with 8 simulated CPU devices (see test_sharding.py).

Trains 3 steps of a tiny model on the same batches under several meshes and prints,
as JSON, the losses per mesh and the per-device shard shapes of a few parameters.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv2_jax import config as config_lib  # noqa: E402
from dsv2_jax.model.transformer import build_model  # noqa: E402
from dsv2_jax.parallel import sharding  # noqa: E402
from dsv2_jax.train.optimizer import build_optimizer  # noqa: E402
from dsv2_jax.train.state import create_train_state  # noqa: E402
from dsv2_jax.train.step import jit_train_step  # noqa: E402

MESHES = {
    "single": dict(data=1),
    "dp8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}


def main():
  c = config_lib.default_config()
  c.model.update(d_model=32, num_layers=2, num_heads=4, ffn_hidden=64, max_seq_len=64)
  c.train.update(steps=10, warmup_steps=1, learning_rate=1e-2)
  model, tx = build_model(c.model), build_optimizer(c.train)
  rng = np.random.RandomState(0)
  batches = [{"inputs": rng.randint(0, 256, (8, 16)).astype(np.int32),
              "targets": rng.randint(0, 256, (8, 16)).astype(np.int32),
              "weights": np.ones((8, 16), np.float32)} for _ in range(3)]
  out = {"devices": jax.device_count(), "losses": {}, "shards": {}}
  for name, axes in MESHES.items():
    cfg = config_lib.default_config().mesh
    cfg.update({k: 1 for k in cfg.keys()})
    cfg.update(axes)
    devices = jax.devices()[:1] if name == "single" else jax.devices()
    mesh = sharding.make_mesh(cfg, devices)
    state, shardings = create_train_state(model, tx, 0, 16, mesh)
    step = jit_train_step(model, tx, mesh, shardings)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.put_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    out["losses"][name] = losses
    shard = lambda x: list(x.sharding.shard_shape(x.shape))  # noqa: E731
    params = state.params["layers"]
    out["shards"][name] = {
        "query": shard(params["attention"]["query"]["w"]),  # [L, D, N, H] = [2, 32, 4, 8]
        "up": shard(params["ffn"]["up"]["w"]),  # [L, D, F] = [2, 32, 64]
        "mu_up": shard(state.opt_state[1][0].mu["layers"]["ffn"]["up"]["w"]),
    }
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
