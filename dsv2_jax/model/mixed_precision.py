"""Mixed-precision matmuls: low-precision operands, f32 accumulation, both ways.

`model.dtype=bfloat16` (with f32 `param_dtype`) computes every weight matmul as
bf16 x bf16 -> f32 -> bf16. Written as `einsum(..., preferred_element_type=f32)` and
left to autodiff, the backward pass is slow on CPU: the cotangent of an f32 output is
f32, so JAX's transpose rule multiplies f32 by bf16 and XLA runs both gradient dots
in f32. (Asking for a bf16 output does not help either: XLA:CPU upcasts a
bf16 -> bf16 dot to f32, while its bf16 -> f32 dots run on AMX where present.)

`einsum` here fixes the backward pass with a custom VJP: the cotangent is cast to
the compute dtype and both gradient dots are again bf16 x bf16 -> f32. The weight
gradient stays f32 until it is cast to the parameter's dtype (f32 master weights).
The forward values are exactly those of the plain einsum; the gradients differ from
it only by rounding the cotangent to the compute dtype, the usual mixed-precision
trade (tests/model/test_mixed_precision.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _terms(equation: str) -> tuple[str, str, str]:
  """'lhs,rhs->out' -> (lhs, rhs, out)."""
  inputs, out = equation.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  return lhs, rhs, out


def transposable(equation: str) -> bool:
  """True when each index of 'lhs,rhs->out' occurs in exactly two or all three of the
  operands and the output, with no index repeated inside one: then the gradients are
  the einsums 'out,rhs->lhs' and 'lhs,out->rhs'."""
  terms = _terms(equation)
  if any(len(set(t)) != len(t) for t in terms):
    return False
  return all(sum(i in t for t in terms) >= 2 for i in set("".join(terms)))


def einsum(equation: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """`einsum(equation, x, w)` with operands in `dtype`, accumulated in f32, in `dtype`.

  For `dtype` f32, or an equation `transposable` rejects, this is the plain einsum.
  """
  if jnp.dtype(dtype) == jnp.float32 or not transposable(equation):
    out = jnp.einsum(equation, x.astype(dtype), w.astype(dtype),
                     preferred_element_type=jnp.float32)
    return out.astype(dtype)
  return _low_precision_einsum(equation, jnp.dtype(dtype), x, w)


def dot(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulated in f32, as one batched matmul [G, M, K] x [G, K, N] -> [G, M, N].

  Spelled out with explicit reshapes because XLA:CPU has no bf16 x bf16 -> f32 dot for
  some multi-axis contractions it is handed directly (e.g. 'XD,XNH->DNH'). The equation
  must be `transposable` (every index in two of the three terms, or all three).
  """
  if not transposable(equation):
    raise ValueError(f"mixed_precision.dot takes batch/contracted/free indices only: {equation!r}")
  lhs, rhs, out = _terms(equation)
  batch = [i for i in out if i in lhs and i in rhs]
  rows = [i for i in lhs if i not in batch and i in out]
  contracted = [i for i in lhs if i in rhs and i not in out]
  cols = [i for i in rhs if i not in batch and i in out]
  size = dict(zip(lhs, a.shape)) | dict(zip(rhs, b.shape))
  numel = lambda idx: math.prod(size[i] for i in idx)  # noqa: E731
  a_order = [lhs.index(i) for i in batch + rows + contracted]
  a3 = jnp.transpose(a, a_order).reshape(numel(batch), numel(rows), numel(contracted))
  if a_order != sorted(a_order) and a.dtype != jnp.float32:
    # Materialise the transposed operand: folded back into the dot (a weight gradient
    # x^T g contracts the lhs's rows), XLA:CPU has no bf16 x bf16 -> f32 kernel for it.
    a3 = jax.lax.optimization_barrier(a3)
  b3 = jnp.transpose(b, [rhs.index(i) for i in batch + contracted + cols]).reshape(
      numel(batch), numel(contracted), numel(cols))
  out3 = jax.lax.dot_general(a3, b3, (((2,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)
  grouped = batch + rows + cols
  result = out3.reshape([size[i] for i in grouped])
  return jnp.transpose(result, [grouped.index(i) for i in out])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(equation, dtype, x, w):
  return _forward(equation, dtype, x, w)[0]


def _forward(equation, dtype, x, w):
  xc, wc = x.astype(dtype), w.astype(dtype)
  # The residuals carry the primal dtypes as zero-size arrays (JAX types, not numpy).
  like = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return dot(equation, xc, wc).astype(dtype), (xc, wc, like)


def _backward(equation, dtype, residuals, g):
  xc, wc, (x_like, w_like) = residuals
  lhs, rhs, out = _terms(equation)
  g = g.astype(dtype)
  dx = dot(f"{out},{rhs}->{lhs}", g, wc)
  dw = dot(f"{lhs},{out}->{rhs}", xc, g)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_low_precision_einsum.defvjp(_forward, _backward)
