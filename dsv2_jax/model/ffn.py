"""Position-wise feed-forward block: SwiGLU by default (Shazeer, 2020), or GeGLU/GELU/ReLU."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from dsv2_jax.model.layers import Einsum, dtype_of

ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu, "gelu": nn.gelu, "relu": nn.relu}


def is_gated(activation: str) -> bool:
  return activation.endswith("glu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act: Callable[[jax.Array], jax.Array], gate: jax.Array, up: jax.Array
          ) -> jax.Array:
  """act(gate) * up, whose backward pass recomputes act(gate) from the saved gate.

  Left to autodiff, XLA:CPU writes act(gate), its pieces (e.g. SiLU's sigmoid) and the
  product as separate full-size arrays; here the forward pass is one elementwise loop
  that keeps only its inputs, and the backward pass one more (results 11.4).
  """
  return _gated_forward(act, gate, up)[0]


def _gated_forward(act, gate, up):
  return act(gate) * up, (gate, up)


def _gated_backward(act, saved, g):
  gate, up = saved
  activated, act_vjp = jax.vjp(act, gate)
  return act_vjp(g * up)[0], g * activated


gated.defvjp(_gated_forward, _gated_backward)


class FeedForward(nn.Module):
  """x -> down(act(gate(x)) * up(x)) for gated activations, else down(act(up(x)))."""

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [X, D] tokens -> [X, D]."""
    cfg = self.cfg
    d, f = x.shape[-1], cfg.ffn_hidden
    dense = lambda shape, axes, name: Einsum(  # noqa: E731
        shape, axes, (0,), dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
    act = ACTIVATIONS[cfg.activation]
    up = dense((d, f), ("embed", "mlp"), "up")("XD,DF->XF", x)
    up = checkpoint_name(up, "ffn_up")
    if is_gated(cfg.activation):
      gate = dense((d, f), ("embed", "mlp"), "gate")("XD,DF->XF", x)
      gate = checkpoint_name(gate, "ffn_gate")
      hidden = gated(act, gate, up)  # [X, F]
    else:
      hidden = act(up)
    hidden = nn.with_logical_constraint(hidden, ("tokens", "act_mlp"))
    hidden = checkpoint_name(hidden, "ffn_hidden")
    out = dense((f, d), ("mlp", "embed"), "down")("XF,FD->XD", hidden)
    return checkpoint_name(out, "ffn_down")
