"""Rematerialisation: `model.remat_policy` -> a `jax.checkpoint` policy for one layer.

Activations are tagged with `checkpoint_name` in the layers ('query', 'key',
'value', 'attention_out', 'ffn_gate', 'ffn_up', 'ffn_hidden'); a policy decides
which of them the backward pass keeps and which it recomputes.
"""

from __future__ import annotations

from typing import Callable

import jax

_POLICIES: dict[str, Callable | None] = {
    "none": None,  # No remat: every residual is stored.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole layer.
    "dots": jax.checkpoint_policies.checkpoint_dots,  # Keep matmul outputs only.
}


def names() -> tuple[str, ...]:
  return tuple(_POLICIES)


def policy(name: str) -> Callable | None:
  """The jax.checkpoint policy for `name`; None means do not rematerialise."""
  if name not in _POLICIES:
    raise ValueError(f"model.remat_policy={name!r} is unknown; choose one of {names()}.")
  return _POLICIES[name]
