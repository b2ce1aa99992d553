"""Mixed-precision einsums: f32 accumulation in both passes, bf16 dots in the backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import mixed_precision

SIZES = dict(X=12, D=8, F=6, N=2, H=4, E=3)


def operands(equation, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  lhs, rhs = equation.split("->")[0].split(",")
  return tuple(jnp.asarray(rng.randn(*(SIZES[i] for i in term)), dtype) for term in (lhs, rhs))


def test_transposable_needs_every_index_in_two_places():
  assert mixed_precision.transposable("XD,DF->XF")
  assert mixed_precision.transposable("EXD,EDF->EXF")  # a batch index in all three
  assert not mixed_precision.transposable("XD,DF->X")  # F summed on one side only
  assert not mixed_precision.transposable("XX,XD->D")  # repeated index
  assert not mixed_precision.transposable("...D,DF->...F")


@pytest.mark.parametrize("equation", [
    "XD,DF->XF", "XD,XNH->DNH", "XNH,NHD->XD", "EXD,EDF->EXF", "DX,XF->FD"])
def test_dot_is_the_einsum(equation):
  a, b = operands(equation)
  np.testing.assert_allclose(mixed_precision.dot(equation, a, b), jnp.einsum(equation, a, b),
                             rtol=1e-5, atol=1e-5)


def test_dot_rejects_an_index_summed_on_one_side():
  with pytest.raises(ValueError, match="XD,DF->X"):
    mixed_precision.dot("XD,DF->X", *operands("XD,DF->XF"))


@pytest.mark.parametrize("equation", ["XD,DF->XF", "XD,DNH->XNH", "XNH,NHD->XD", "EXD,EDF->EXF"])
def test_bf16_forward_is_exact_and_backward_dots_stay_bf16(equation):
  x, w = operands(equation)
  plain = lambda x, w: jnp.einsum(  # noqa: E731
      equation, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
      preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  ours = lambda x, w: mixed_precision.einsum(equation, x, w, jnp.bfloat16)  # noqa: E731
  np.testing.assert_array_equal(ours(x, w), plain(x, w))

  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2)  # noqa: E731
  dx, dw = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  rx, rw = jax.grad(loss(plain), argnums=(0, 1))(x, w)
  assert dx.dtype == x.dtype and dw.dtype == w.dtype == jnp.float32
  for a, b in ((dx, rx), (dw, rw)):  # Differ only by the cotangent's rounding to bf16.
    assert float(jnp.abs(a - b).max()) <= 0.02 * float(jnp.abs(b).max())

  # Every dot of the gradient takes bf16 operands (the plain einsum's backward does not).
  def dot_operand_dtypes(f):
    jaxpr = jax.make_jaxpr(jax.grad(loss(f), argnums=(0, 1)))(x, w)
    return {str(v.aval.dtype) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
            for v in e.invars}
  assert dot_operand_dtypes(ours) == {"bfloat16"}
  assert "float32" in dot_operand_dtypes(plain)


def test_f32_is_the_plain_einsum():
  x, w = operands("XD,DF->XF")
  f = lambda x, w: jnp.sum(mixed_precision.einsum("XD,DF->XF", x, w, jnp.float32) ** 2)  # noqa
  g = lambda x, w: jnp.sum(jnp.einsum("XD,DF->XF", x, w) ** 2)  # noqa: E731
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
