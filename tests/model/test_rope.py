"""RoPE and its context extensions (linear, NTK-aware, YaRN) against direct formulas.

The oracles are written out here in float64 numpy: a per-position 2x2 rotation loop,
and each scaling's frequencies from its paper's definition.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import rope
from dsv2_jax.model.transformer import build_model
from tests.helpers import init, small_model_config

BASE = 10_000.0


def rotate_loop(x: np.ndarray, positions: np.ndarray, theta: np.ndarray) -> np.ndarray:
  """Oracle: rotates pair (i, i + H/2) of x [B, T, N, H] by the 2x2 matrix of pos * theta_i."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for bi in range(x.shape[0]):
    for ti in range(x.shape[1]):
      for i in range(half):
        a = float(positions[bi, ti]) * theta[i]
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pair = np.stack([x[bi, ti, :, i], x[bi, ti, :, i + half]])  # [2, N]
        out[bi, ti, :, i], out[bi, ti, :, i + half] = rot @ pair
  return out


def plain_theta(h: int, base: float = BASE) -> np.ndarray:
  return np.array([base ** (-2.0 * i / h) for i in range(h // 2)])


def sample(b=2, t=5, n=3, h=8, seed=0, max_pos=50):
  rng = np.random.RandomState(seed)
  x = rng.randn(b, t, n, h).astype(np.float32)
  positions = rng.randint(0, max_pos, (b, t)).astype(np.int32)
  return x, positions


def rope_np(x, positions, **kw) -> np.ndarray:
  inv_freq, factor = rope.rope_frequencies(x.shape[-1], BASE, **kw)
  return np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv_freq, factor),
                    np.float64)


def test_none_is_the_classic_pair_rotation():
  x, pos = sample()
  np.testing.assert_allclose(rope_np(x, pos), rotate_loop(x, pos, plain_theta(8)),
                             rtol=1e-5, atol=1e-5)


def test_none_is_bit_identical_to_the_f32_implementation_it_replaced():
  # The pre-extension code, verbatim: frequencies and angles in f32 on device. H = 192 is
  # a head dim where an f64-computed base would round differently.
  def legacy(x, positions, max_wavelength=BASE, scale=1.0):
    half = x.shape[-1] // 2
    inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

  for h in (8, 192):
    x, pos = sample(h=h, max_pos=4000)
    x = jnp.asarray(x, jnp.bfloat16)
    for kw in (dict(), dict(scaling="linear", scale=1.0), dict(scaling="ntk", scale=1.0)):
      inv_freq, factor = rope.rope_frequencies(h, BASE, **kw)
      new = jax.jit(lambda x, p, f=inv_freq, a=factor: rope.apply_rope(x, p, f, a))(x, pos)
      old = jax.jit(legacy)(x, pos)
      assert new.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old, np.float32))


def test_none_dot_products_depend_only_on_relative_position():
  h = 16
  rng = np.random.RandomState(1)
  q, k = rng.randn(2, 1, 1, 1, h).astype(np.float32)

  def dot(m, n):
    qm = rope_np(q, np.array([[m]]))
    kn = rope_np(k, np.array([[n]]))
    return float(np.sum(qm * kn))

  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  np.testing.assert_allclose(dot(0, 0), float(np.sum(q.astype(np.float64) * k)), rtol=1e-5)
  assert abs(dot(7, 3) - dot(7, 4)) > 1e-3  # The offset does matter.


@pytest.mark.parametrize("s", [2.0, 4.0, 7.5])
def test_linear_equals_plain_rope_at_fractional_positions(s):
  x, pos = sample(h=16, seed=2)
  frac = pos.astype(np.float64) / s  # Position interpolation: m -> m / s.
  np.testing.assert_allclose(rope_np(x, pos, scaling="linear", scale=s),
                             rotate_loop(x, frac, plain_theta(16)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h", [8, 64])
def test_ntk_frequencies_are_plain_rope_with_a_larger_base(h):
  s = 8.0
  inv_freq, factor = rope.rope_frequencies(h, BASE, "ntk", s)
  base = BASE * s ** (h / (h - 2))
  np.testing.assert_allclose(np.asarray(inv_freq), plain_theta(h, base), rtol=1e-6)
  plain = plain_theta(h)
  assert float(inv_freq[0]) == 1.0  # The highest frequency is kept ...
  np.testing.assert_allclose(float(inv_freq[-1]), plain[-1] / s, rtol=1e-6)  # lowest / s.
  assert factor == 1.0


def yarn_theta_by_hand(h, base, s, length, beta_fast, beta_slow):
  """YaRN's NTK-by-parts, pair by pair, with each regime's branch written out."""
  out = []
  for i in range(h // 2):
    theta = base ** (-2.0 * i / h)
    turns = length / (2 * math.pi / theta)  # r = L / wavelength
    if turns > beta_fast:
      out.append(theta)
    elif turns < beta_slow:
      out.append(theta / s)
    else:
      g = (turns - beta_slow) / (beta_fast - beta_slow)
      out.append((1 - g) * theta / s + g * theta)
  return np.array(out)


def test_yarn_frequencies_and_attention_factor():
  h, s, length = 16, 16.0, 1024
  inv_freq, factor = rope.rope_frequencies(h, BASE, "yarn", s, length, 32.0, 1.0)
  inv_freq = np.asarray(inv_freq, np.float64)
  plain = plain_theta(h)
  # r_i = 1024 * 10000^(-i/8) / (2 pi) = 163, 51.5 | 16.3, 5.15, 1.63 | 0.52, 0.16, 0.05.
  np.testing.assert_allclose(inv_freq[:2], plain[:2], rtol=1e-6)  # Extrapolated.
  np.testing.assert_allclose(inv_freq[5:], plain[5:] / s, rtol=1e-6)  # Interpolated.
  gamma2 = (1024 * 0.1 / (2 * math.pi) - 1) / 31  # Pair 2: theta = 10000^(-1/4) = 0.1.
  np.testing.assert_allclose(inv_freq[2], (1 - gamma2) * 0.1 / s + gamma2 * 0.1, rtol=1e-6)
  assert plain[4] / s < inv_freq[4] < inv_freq[3] / 2 < plain[3]  # Blended, strictly.
  np.testing.assert_allclose(inv_freq, yarn_theta_by_hand(h, BASE, s, length, 32.0, 1.0),
                             rtol=1e-6)
  np.testing.assert_allclose(factor, 0.1 * math.log(16) + 1, rtol=1e-12)
  # The brief's small case, L = 128: no pair is fast enough to keep its frequency.
  inv_freq, _ = rope.rope_frequencies(h, BASE, "yarn", s, 128, 32.0, 1.0)
  np.testing.assert_allclose(np.asarray(inv_freq), yarn_theta_by_hand(h, BASE, s, 128, 32.0,
                                                                      1.0), rtol=1e-6)


def test_yarn_scales_rotated_queries_and_keys_by_its_temperature():
  h, s, length = 16, 4.0, 256
  x, pos = sample(h=h, seed=3, max_pos=1000)
  mscale = 0.1 * math.log(s) + 1
  want = mscale * rotate_loop(x, pos, yarn_theta_by_hand(h, BASE, s, length, 32.0, 1.0))
  got = rope_np(x, pos, scaling="yarn", scale=s, original_length=length)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)


def test_yarn_with_scale_one_is_plain_rope():
  x, pos = sample(h=16, seed=4, max_pos=3000)
  np.testing.assert_array_equal(rope_np(x, pos, scaling="yarn", scale=1.0, original_length=64),
                                rope_np(x, pos))


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match="rope scaling"):
    rope.rope_frequencies(8, BASE, "bogus")
  with pytest.raises(ValueError, match="original_length"):
    rope.rope_frequencies(8, BASE, "yarn", 2.0)
  with pytest.raises(ValueError, match=">= 1"):
    rope.rope_frequencies(8, BASE, "linear", 0.5)


def test_model_forward_unscaled_extensions_match_and_scaled_ones_differ():
  _, params, tokens = init(small_model_config(), t=16)

  def logits(**kw):  # The scalings add no parameters: all share the plain model's.
    return np.asarray(build_model(small_model_config(**kw)).apply({"params": params}, tokens))

  plain = logits()
  np.testing.assert_array_equal(logits(rope_scaling="linear", rope_scale=1.0), plain)
  np.testing.assert_array_equal(
      logits(rope_scaling="yarn", rope_scale=1.0, rope_original_length=64), plain)
  for kw in (dict(rope_scaling="linear", rope_scale=4.0),
             dict(rope_scaling="yarn", rope_scale=4.0, rope_original_length=16)):
    scaled = logits(**kw)
    assert np.isfinite(scaled).all()
    assert np.abs(scaled - plain).max() > 1e-3, kw


def test_model_yarn_decode_with_cache_equals_full_forward():
  cfg = small_model_config(rope_scaling="yarn", rope_scale=4.0, rope_original_length=16)
  model, params, tokens = init(cfg, t=12)
  full = model.apply({"params": params}, tokens)
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 12), jnp.int32), decode=True)["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  first, mutated = model.apply({"params": params, "cache": cache}, tokens[:, :7], decode=True,
                               mutable=["cache"])
  rest, _ = model.apply({"params": params, "cache": mutated["cache"]}, tokens[:, 7:],
                        decode=True, mutable=["cache"])
  np.testing.assert_allclose(np.concatenate([first, rest], 1), full, rtol=1e-4, atol=1e-4)
