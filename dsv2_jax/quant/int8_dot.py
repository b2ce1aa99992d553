"""Matmuls with INT8 weights: weight-only (dequantize, then a float dot) or INT8 x INT8.

INT8 x INT8 -> INT32: each token's activations get one scale (s_x = max|x| / 127 over
the contracted axes) and are rounded to int8; the integer products accumulate in int32
(`lax.dot_general` with `preferred_element_type=int32`) and the result is rescaled in f32.
That rescaling is only exact where one scale covers the whole sum, so the block layout
decides the cost:

  - one weight scale per output channel ('channel', blocks K x 1) or per matrix: one
    integer GEMM [X, K] x [K, N], then y = acc * s_x * s_w[n] — what INT8 GEMM kernels do;
  - blocks of bk < K rows ('4x4'): the scale changes every bk products, so the sum splits
    into K / bk partial integer GEMMs [X, bk] x [bk, N] (int32 [K/bk, X, N]), each
    rescaled by its own block scales and added in f32: K / bk times the output traffic
    and no long integer accumulation. The article's 4x4 blocks suit storage and weight-
    only use; for integer GEMMs they cost what experiments/quantization.py measures.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv2_jax.quant import blocks


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [X, K] -> (int8 [X, K], f32 scale [X, 1]) with one symmetric scale per row."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def int8_matmul(x: jax.Array, t: blocks.QTensor) -> jax.Array:
  """x [X, K] (float) times the [K, N] matrix of the unstacked QTensor `t` -> f32 [X, N]."""
  xq, sx = quantize_rows(x)
  wq = blocks.to_matrix(t.qvalue, t.names)
  k, n = wq.shape
  bk, bn = t.block
  col_scale = jnp.repeat(t.scale, bn, axis=-1)[:, :n]  # [Kb, N]
  if bk >= k:  # One scale per output channel (or matrix): a single integer GEMM.
    acc = jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx * col_scale[0]
  groups = -(-k // bk)
  pad = groups * bk - k
  xg = jnp.pad(xq, ((0, 0), (0, pad))).reshape(-1, groups, bk).transpose(1, 0, 2)
  wg = jnp.pad(wq, ((0, pad), (0, 0))).reshape(groups, bk, n)
  acc = jax.lax.dot_general(xg, wg, (((2,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.int32)  # [Kb, X, N]
  return jnp.einsum("GXN,GN->XN", acc.astype(jnp.float32), col_scale) * sx


def einsum(equation: str, x: jax.Array, t: blocks.QTensor, dtype: jnp.dtype) -> jax.Array:
  """`einsum(equation, x, W)` for the weight W that `t` stores, in `dtype`.

  With `t.dot == 'int8'` and an unstacked weight whose contracted axes are exactly the
  ones `equation` contracts, INT8 x INT8 (`int8_matmul`); otherwise weight-only: W is
  dequantized right here, inside the layer that uses it, and the dot runs in `dtype`.
  """
  lhs, rest = equation.split(",")
  rhs, out = rest.split("->")
  contract, output = blocks.split_axes(t.names)
  usable = (t.dot == "int8" and len(rhs) == len(t.names)
            and {rhs[a] for a in contract} == (set(lhs) & set(rhs)) - set(out)
            and all(rhs[a] in out for a in output)
            # A weight axis the input also carries (MLA's absorbed 'BTNc,cNO') would make
            # the matmul compute every pair and keep the diagonal: weight-only instead.
            and not {rhs[a] for a in output} & set(lhs))
  if not usable:
    w = blocks.dequantize(t, dtype)
    return jnp.einsum(equation, x.astype(dtype), w,
                      preferred_element_type=jnp.float32).astype(dtype)
  k_letters = "".join(rhs[a] for a in contract)
  n_letters = "".join(rhs[a] for a in output)
  batch = "".join(c for c in lhs if c not in k_letters)
  xm = jnp.einsum(f"{lhs}->{batch}{k_letters}", x)  # A transpose (often none).
  batch_shape = xm.shape[:len(batch)]
  y = int8_matmul(xm.reshape(math.prod(batch_shape), -1), t)
  n_shape = [t.qvalue.shape[a] for a in output]
  y = y.reshape(*batch_shape, *n_shape)
  return jnp.einsum(f"{batch}{n_letters}->{out}", y).astype(dtype)
