"""Rotary position embedding (Su et al., 2021, "RoFormer") with position interpolation.

Position interpolation (Chen et al., 2023) divides positions by `scale`, so a model
trained on length T attends over T * scale positions inside its trained range;
stage 2 (long-context adaptation) sets `model.rope_scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0,
               scale: float = 1.0) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + H/2]) by position-dependent angles.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] integer token positions.
    max_wavelength: the longest rotation period.
    scale: position interpolation factor (>= 1).

  Returns:
    [B, T, N, H] in x's dtype (the rotation is computed in f32).
  """
  half = x.shape[-1] // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
