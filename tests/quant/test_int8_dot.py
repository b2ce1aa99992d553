"""INT8 x INT8 -> INT32 dots (dsv2_jax/quant/int8_dot.py) against dequantized f32.

Stated error: activations are rounded per token with s_x = max|x| / 127, so each output
differs from x @ W' (W' the dequantized weight) by at most s_x / 2 * sum_k |W'[k, n]|;
and the integer path equals x' @ W' (x' the rounded activations) up to f32 summation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import layers
from dsv2_jax.quant import blocks, int8_dot


def rand(shape, seed):
  return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("equation,x_shape,w_shape,names", [
    ("XD,DF->XF", (5, 12), (12, 20), ("embed", "mlp")),
    ("XF,FD->XD", (5, 18), (18, 8), ("mlp", "embed")),  # K not a multiple of 4.
    ("XNH,NHD->XD", (3, 2, 6), (2, 6, 8), ("heads", "kv", "embed")),
    ("XD,DNH->XNH", (3, 8), (8, 2, 6), ("embed", "heads", "kv")),
    ("XD,VD->XV", (4, 8), (10, 8), ("vocab", "embed")),  # The tied head.
])
@pytest.mark.parametrize("layout", ["4x4", "channel", "tensor"])
def test_int8_dot_against_dequantized_f32(equation, x_shape, w_shape, names, layout):
  x, w = rand(x_shape, 0), rand(w_shape, 1)
  t = blocks.quantize(jnp.asarray(w), names, blocks.Layout.parse(layout)).replace(dot="int8")
  got = np.asarray(layers.matmul_einsum(equation, jnp.asarray(x), t, jnp.float32))
  w_deq = np.asarray(blocks.dequantize(t), np.float64)
  exact = np.einsum(equation, x.astype(np.float64), w_deq)
  # x' as the integer path rounds it, in the [X, K] view.
  lhs, rest = equation.split(",")
  rhs, out = rest.split("->")
  k_letters = "".join(c for c in rhs if c in lhs and c not in out)
  batch = "".join(c for c in lhs if c not in k_letters)
  xm = np.einsum(f"{lhs}->{batch}{k_letters}", x).reshape(-1, np.prod(
      [x.shape[lhs.index(c)] for c in k_letters]))
  sx = np.abs(xm).max(-1, keepdims=True) / 127
  x_round = (np.round(xm / sx) * sx).reshape(np.einsum(f"{lhs}->{batch}{k_letters}", x).shape)
  rounded = np.einsum(f"{batch}{k_letters},{rhs}->{out}", x_round, w_deq)
  np.testing.assert_allclose(got, rounded, rtol=1e-5, atol=1e-5)
  bound = np.einsum(f"{batch}{k_letters},{rhs}->{out}",
                    np.broadcast_to(sx.reshape(*x_round.shape[:len(batch)], *[1] * len(
                        k_letters)), x_round.shape) / 2, np.abs(w_deq))
  assert np.all(np.abs(got - exact) <= bound + 1e-5)
  assert np.abs(got - exact).max() > 0  # The activations really were rounded.


def test_weight_only_is_the_dequantized_matmul():
  x, w = rand((4, 12), 2), rand((12, 8), 3)
  t = blocks.quantize(jnp.asarray(w), ("embed", "mlp"), blocks.Layout(4, 4))
  got = layers.matmul_einsum("XD,DF->XF", jnp.asarray(x), t, jnp.float32)
  want = jnp.einsum("XD,DF->XF", jnp.asarray(x), blocks.dequantize(t))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_integer_accumulation_is_exact():
  """int8_matmul's per-block int32 sums equal NumPy's int64 sums of the same integers."""
  x, w = rand((3, 16), 4), rand((16, 4), 5)
  t = blocks.quantize(jnp.asarray(w), ("embed", "mlp"), blocks.Layout.parse("channel"))
  xq, sx = int8_dot.quantize_rows(jnp.asarray(x))
  acc = np.asarray(xq, np.int64) @ np.asarray(t.qvalue, np.int64)
  want = acc * np.asarray(sx) * np.asarray(t.scale)[0]
  np.testing.assert_allclose(np.asarray(int8_dot.int8_matmul(jnp.asarray(x), t)), want,
                             rtol=1e-6)
