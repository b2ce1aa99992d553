"""The gated activation's hand-written VJP against autodiff of act(gate) * up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import ffn


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_matches_autodiff(activation):
  act = ffn.ACTIVATIONS[activation]
  rng = np.random.RandomState(0)
  gate, up, g = (jnp.asarray(rng.randn(16, 8) * 3, jnp.float32) for _ in range(3))
  out, pull = jax.vjp(lambda a, b: ffn.gated(act, a, b), gate, up)
  ref, ref_pull = jax.vjp(lambda a, b: act(a) * b, gate, up)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  for a, b in zip(pull(g), ref_pull(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
