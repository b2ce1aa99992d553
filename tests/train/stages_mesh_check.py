"""Run by test_stages.py in a process with 4 simulated devices: init_from across meshes.

Trains a parent with FSDP over 4 devices, restores its parameters into a child laid out
data 2 x tensor 2 (`stages.init_params`), and prints {"devices", "equal"} as JSON.
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np

from dsv2_jax.parallel import sharding
from dsv2_jax.train import stages, trainer
from dsv2_jax.train.state import abstract_state
from tests.helpers import tiny_config


def main(root: pathlib.Path) -> None:
  parent = tiny_config(str(root / "tfds"))
  parent.sample.max_new_tokens = 0
  parent.mesh.update(data=1, fsdp=4)
  trainer.train_and_evaluate(parent, root / "parent")
  child = tiny_config(str(root / "tfds"))
  child.mesh.update(data=2, tensor=2)
  run = trainer.Run(child, root / "child")
  boxed = abstract_state(run.model, run.tx, child.data.seq_len)
  shardings = sharding.logical_shardings(boxed, run.mesh)
  params, _ = stages.init_params(str(root / "parent"), nn.meta.unbox(boxed).params,
                                 shardings.params)
  assert all(p.sharding == s for p, s in zip(jax.tree.leaves(params),
                                              jax.tree.leaves(shardings.params)))
  want = trainer.Run(trainer.load_config(root / "parent"), root / "parent").initial_state()[0]
  equal = all(np.array_equal(a, b) for a, b in
              zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(want.params))))
  print(json.dumps({"devices": jax.device_count(), "equal": equal}))


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
