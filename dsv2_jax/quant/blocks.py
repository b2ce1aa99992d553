"""Symmetric INT8 weights with one scale per block of each weight's matrix view.

A weight of any rank is read as a stack of matrices [S..., K, N]: its leading stacking
axes (`layers`, `expert`, `stage`, named in `STACK_AXES`) index the matrices, K merges
the axes the matmul contracts and N the output axes (`matrix_axes` reads which from the
logical axis names). Each [K, N] matrix is cut into blocks of `Layout` (bk, bn); every
block gets its own scale s = max|w| / 127 and values q = round(w / s) in [-127, 127]
(symmetric: the block's largest weight is exact, and -128 is never used). `qwix.quantize`
does the quantizing; its int8 default divides by 127.5 and lets round-half-even clip the
largest weight to 127 (off by s / 2), so `CALIBRATION` widens its range by 127.5 / 127.
Shapes that blocks do not divide are zero-padded up to whole blocks, quantized, and
cropped back: the last row or column of blocks is then simply narrower.

Layouts: '4x4' (the article's blocks), any 'RxC', 'channel' = (K, 1) (one scale per
output channel, what integer GEMMs want), 'tensor' = (K, N) (one per matrix).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import qwix

STACK_AXES = ("layers", "expert", "stage")  # Leading axes that index separate matrices.
_LAYOUT = re.compile(r"^(\d+)x(\d+)$")
CALIBRATION = f"absmax,{127.5 / 127!r}"  # qwix's bound is 127.5: this makes s = max|w| / 127.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Block shape (rows along K, cols along N) of one scale; 0 spans the whole axis."""

  rows: int
  cols: int

  @classmethod
  def parse(cls, text: str, field: str = "block") -> Layout:
    """'RxC' (e.g. '4x4'), 'channel' or 'tensor'; ValueError naming `field` and the
    choices."""
    if text == "channel":
      return cls(0, 1)
    if text == "tensor":
      return cls(0, 0)
    match = _LAYOUT.match(text)
    if not match or min(int(match[1]), int(match[2])) <= 0:
      raise ValueError(f"{field}={text!r} is not a block shape: use RxC with positive R and C "
                       "(e.g. 4x4), 'channel' or 'tensor'.")
    return cls(int(match[1]), int(match[2]))

  def block(self, k: int, n: int) -> tuple[int, int]:
    return (self.rows or k, self.cols or n)

  def __str__(self) -> str:
    return {(0, 1): "channel", (0, 0): "tensor"}.get((self.rows, self.cols),
                                                     f"{self.rows}x{self.cols}")


def split_axes(names: tuple[str | None, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(contracted, output) axes of a matrix part (stacking axes removed), see matrix_axes."""
  axes = tuple(range(len(names)))
  if len(axes) < 2:
    raise ValueError(f"a weight with matrix axes {names} has no matrix to quantize.")
  if names[0] in ("embed", "q_lora", "kv_lora"):  # Input width first: 'XD,DNH', 'Xc,cNH'.
    return axes[:1], axes[1:]
  if names == ("vocab", "embed"):
    return axes[1:], axes[:1]
  return axes[:-1], axes[-1:]


def num_stack_axes(names: Sequence[str | None]) -> int:
  """How many leading axes of a weight named `names` index separate matrices."""
  s = 0
  while s < len(names) - 2 and names[s] in STACK_AXES:
    s += 1
  return s


def matrix_axes(names: Sequence[str | None]) -> tuple[tuple[int, ...], tuple[int, ...],
                                                     tuple[int, ...]]:
  """(stack, contracted, output) axis indices of a weight with logical axis `names`.

  Leading STACK_AXES index matrices (at least two axes are left). Of the rest: a weight
  whose first axis is 'embed' contracts it (projections out of the residual stream: q,
  k, v, FFN up/gate, experts' w_in, router, an untied head); the embedding table
  ('vocab', 'embed') contracts 'embed' too (the tied head computes x @ table.T); any
  other weight contracts all but its last axis (projections back into the stream:
  attention out, FFN down, experts' w_out, the router's output layer).
  """
  names = tuple(names)
  s = num_stack_axes(names)
  contract, output = split_axes(names[s:])
  return (tuple(range(s)), tuple(a + s for a in contract), tuple(a + s for a in output))


@flax.struct.dataclass
class QTensor:
  """An INT8 weight: `qvalue` in the weight's own shape and layout, `scale` [S..., Kb, Nb]
  (f32, one per block of the matrix view). `names` are the logical names of the matrix
  axes only, so slicing off leading stack axes (as `nn.scan` does per layer) keeps the
  tensor valid. `dot` is how a matmul uses it: 'dequantize' (weight-only) or 'int8'
  (INT8 x INT8 -> INT32, `quant.int8_dot`)."""

  qvalue: jax.Array
  scale: jax.Array
  names: tuple[str | None, ...] = flax.struct.field(pytree_node=False)
  block: tuple[int, int] = flax.struct.field(pytree_node=False)
  dot: str = flax.struct.field(pytree_node=False, default="dequantize")

  @property
  def shape(self) -> tuple[int, ...]:
    return self.qvalue.shape

  @property
  def nbytes(self) -> int:
    return (self.qvalue.size * self.qvalue.dtype.itemsize
            + self.scale.size * self.scale.dtype.itemsize)


def _matrix_order(ndim: int, names: Sequence[str | None]) -> tuple[int, ...]:
  """Axis order that puts stack axes, then contracted, then output axes."""
  s = ndim - len(names)
  contract, output = split_axes(tuple(names))
  return tuple(range(s)) + tuple(a + s for a in contract + output)


def to_matrix(w: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """[S..., K, N] view of `w` whose trailing axes are named `names` (a transpose only
  for the embedding table)."""
  s = w.ndim - len(names)
  contract, _ = split_axes(tuple(names))
  m = jnp.transpose(w, _matrix_order(w.ndim, names))
  return m.reshape(*m.shape[:s], math.prod(w.shape[a + s] for a in contract), -1)


def from_matrix(m: jax.Array, shape: Sequence[int], names: Sequence[str | None]
                ) -> jax.Array:
  order = _matrix_order(len(shape), names)
  m = m.reshape([shape[a] for a in order])
  return jnp.transpose(m, [order.index(a) for a in range(len(shape))])


def _padded(m: jax.Array, block: tuple[int, int]) -> jax.Array:
  k, n = m.shape[-2:]
  pad = [(0, 0)] * (m.ndim - 2) + [(0, -k % block[0]), (0, -n % block[1])]
  return jnp.pad(m, pad)


def quantize(w: jax.Array, names: Sequence[str | None], layout: Layout) -> QTensor:
  """INT8 blocks of `w` (f32/bf16, logical axis `names`, stack axes included)."""
  matrix_names = tuple(names)[num_stack_axes(names):]
  m = to_matrix(w.astype(jnp.float32), matrix_names)
  k, n = m.shape[-2:]
  block = layout.block(k, n)
  s = m.ndim - 2
  q = qwix.quantize(_padded(m, block), jnp.int8, channelwise_axes=tuple(range(s)),
                    tiled_axes={s: block[0], s + 1: block[1]}, calibration_method=CALIBRATION)
  qvalue = from_matrix(q.qvalue[..., :k, :n], w.shape, matrix_names)
  return QTensor(qvalue, q.scale.astype(jnp.float32), matrix_names, block)


def dequantize(t: QTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The weight `t` stands for, in `dtype` (products in f32, then cast)."""
  m = to_matrix(t.qvalue, t.names)
  k, n = m.shape[-2:]
  scale = jnp.repeat(jnp.repeat(t.scale, t.block[0], axis=-2), t.block[1], axis=-1)
  w = m.astype(jnp.float32) * scale[..., :k, :n]  # Each element's block scale.
  return from_matrix(w, t.qvalue.shape, t.names).astype(dtype)


def round_trip(w: jax.Array, names: Sequence[str | None], layout: Layout) -> jax.Array:
  """Round(W): `w` quantized and dequantized, in w's dtype (no gradient defined)."""
  return dequantize(quantize(w, names, layout), w.dtype)


def fake_quantize(w: jax.Array, names: Sequence[str | None], layout: Layout) -> jax.Array:
  """Round(W) forward (exactly: sg(Round(W)) + (W - sg(W)) adds an exact 0), identity
  backward (the straight-through estimator)."""
  return straight_through(w, round_trip(w, names, layout))


def straight_through(w: jax.Array, rounded: jax.Array) -> jax.Array:
  """`rounded` in the forward pass, the gradient of `w` in the backward pass."""
  return jax.lax.stop_gradient(rounded) + (w - jax.lax.stop_gradient(w))


def rounding_error(w: jax.Array, names: Sequence[str | None], layout: Layout) -> jax.Array:
  """||Round(W) - W||^2 in weight units, summed over the elements of `w` (f32). Round(W)
  is held constant (its true derivative is 0 almost everywhere), so the gradient,
  2 (W - Round(W)), pulls each weight toward its grid point."""
  target = jax.lax.stop_gradient(round_trip(w, names, layout)).astype(jnp.float32)
  return jnp.sum(jnp.square(w.astype(jnp.float32) - target))
