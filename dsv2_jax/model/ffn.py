"""Position-wise feed-forward block: SwiGLU by default (Shazeer, 2020), or GeGLU/GELU/ReLU."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from dsv2_jax.model.layers import Einsum, dtype_of

ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu, "gelu": nn.gelu, "relu": nn.relu}


def is_gated(activation: str) -> bool:
  return activation.endswith("glu")


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
      hidden = act(gate) * up  # [X, F]
    else:
      hidden = act(up)
    hidden = nn.with_logical_constraint(hidden, ("tokens", "act_mlp"))
    hidden = checkpoint_name(hidden, "ffn_hidden")
    out = dense((f, d), ("mlp", "embed"), "down")("XF,FD->XD", hidden)
    return checkpoint_name(out, "ffn_down")
