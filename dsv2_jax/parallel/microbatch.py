"""Microbatches, shared by gradient accumulation and the pipeline schedule.

`split` takes rows i, i + n, i + 2n, ... into microbatch i. The batch axis is sharded
in contiguous blocks over the data-parallel devices, so every device keeps its own rows
of every microbatch and nothing moves between devices. `merge` undoes `split`.

Statistics sown per microbatch are combined by `reduce_stats`: integer leaves are
counts and add up; float leaves are means over equal-sized microbatches and average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def split(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [Y, B / Y, ...] with Y = n microbatches: microbatch i holds rows i, i + n, ..."""
  return x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1)


def merge(x: jax.Array) -> jax.Array:
  """[Y, B / Y, ...] -> [B, ...]: the inverse of `split`."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def reduce_stats(tree: Any, axis: int = 0) -> Any:
  """Combines per-microbatch statistics along `axis`: sums integers, averages floats."""
  def reduce(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.sum(x, axis=axis).astype(x.dtype)
    return jnp.mean(x, axis=axis)
  return jax.tree.map(reduce, tree)
