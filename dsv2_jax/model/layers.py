"""Basic layers: a weight contracted by an einsum, normalisation, and the embedder.

Every parameter is created with `nn.with_logical_partitioning`, so the model only
names axes; `dsv2_jax.parallel.sharding` maps the names to a mesh. Also the choices of
`model.dtype` / `model.param_dtype` (`DTYPES`) and `model.norm` (`NORMS`), and the
logit value every attention kernel uses for a masked key (`MASK_VALUE`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv2_jax.model import mixed_precision
from dsv2_jax.quant import int8_dot
from dsv2_jax.quant.blocks import QTensor, dequantize

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("rmsnorm", "layernorm")  # `Norm.kind`.
# Large finite negative for masked attention logits: -inf gives NaN gradients on empty rows.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dtype_of(name: str) -> jnp.dtype:
  return DTYPES[name]


def weight(w: jax.Array | QTensor, dtype: jnp.dtype) -> jax.Array:
  """A parameter as a float array in `dtype`: an INT8 `QTensor` (an exported run, see
  dsv2_jax/quant) is dequantized here, where the layer uses it."""
  return dequantize(w, dtype) if isinstance(w, QTensor) else w.astype(dtype)


def matmul_einsum(equation: str, x: jax.Array, w: jax.Array | QTensor, dtype: jnp.dtype
                  ) -> jax.Array:
  """einsum in `dtype` whose products accumulate in f32 (bf16 x bf16 -> f32 -> bf16), in
  the backward pass too (`mixed_precision.einsum`). An INT8 weight runs weight-only or as INT8 x INT8 dots (`quant.int8_dot.einsum`)."""
  if isinstance(w, QTensor):
    return int8_dot.einsum(equation, x, w, dtype)
  return mixed_precision.einsum(equation, x, w, dtype)


class Einsum(nn.Module):
  """A weight of `shape` with logical `axes`, applied as `einsum(equation, x, w)`.

  The equation is written at the call site (e.g. 'XD,DNH->XNH'), so each weight
  sits next to its contraction. `fan_in_axes` are the weight axes contracted with
  the input; the init is truncated-normal with variance 1 / fan_in.
  """

  shape: Sequence[int]
  axes: Sequence[str | None]
  fan_in_axes: Sequence[int] = (0,)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    out_axes = tuple(i for i in range(len(self.shape)) if i not in self.fan_in_axes)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(self.fan_in_axes), out_axis=out_axes)
    w = self.param("w", nn.with_logical_partitioning(init, tuple(self.axes)),
                   tuple(self.shape), self.param_dtype)
    return matmul_einsum(equation, x, w, self.dtype)


class Norm(nn.Module):
  """RMSNorm (Zhang & Sennrich, 2019) or LayerNorm over the last axis, computed in f32."""

  kind: str = "rmsnorm"  # One of NORMS.
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * scale.astype(jnp.float32)
    if self.kind == "layernorm":
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        (d,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Embedder(nn.Module):
  """Token embedding table [V, D]; `decode` is the tied output head."""

  vocab_size: int
  d_model: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
        (self.vocab_size, self.d_model), self.param_dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens: int [...] -> [..., D]."""
    if isinstance(self.embedding, QTensor):
      return jnp.take(weight(self.embedding, self.dtype), tokens, axis=0)
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """x: [X, D] -> logits [X, V]."""
    return matmul_einsum("XD,VD->XV", x, self.embedding, self.dtype)
