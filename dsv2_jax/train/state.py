"""The train state and its sharded creation.

Order (nothing is allocated before its sharding is known):
`jax.eval_shape(init)` -> logical partition specs -> mesh shardings ->
`jax.jit(init, out_shardings=...)`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dsv2_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's parameter tree.
    opt_state: the optimizer's state tree.
    rng: uint32 [2] PRNG key, split once per step (dropout).
    skipped_steps: int32 scalar, steps whose update was not applied because the loss,
      gradient or new parameters were not finite (`train.step.train_step`).
    consecutive_skips: int32 scalar, skipped steps since the last applied one.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array
  consecutive_skips: jax.Array


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  def init(rng: jax.Array) -> TrainState:
    param_rng, train_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(param_rng, tokens)["params"]  # Boxed with logical axis names.
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=train_rng,
                      skipped_steps=zero, consecutive_skips=zero)
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int
                   ) -> TrainState:
  """Shapes, dtypes and logical axis boxes of the state; nothing allocated."""
  init = _init_fn(model, tx, seq_len)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                    mesh: Mesh) -> TrainState:
  return sharding.logical_shardings(abstract_state(model, tx, seq_len), mesh)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       seq_len: int, mesh: Mesh, shardings: TrainState | None = None
                       ) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings (computed if not given).

  Returns:
    (state, shardings): the unboxed state and the matching NamedSharding tree.
  """
  if shardings is None:
    shardings = state_shardings(model, tx, seq_len, mesh)
  init = _init_fn(model, tx, seq_len)
  state = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(
      jax.random.PRNGKey(seed))
  return state, shardings
