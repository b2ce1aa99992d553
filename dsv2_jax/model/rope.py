"""Rotary position embedding (Su et al., 2021, "RoFormer") and its context extensions.

RoPE rotates the pair (x[..., i], x[..., i + H/2]) of a query or key at position m by
the angle m * theta_i, theta_i = b^(-2i/H) (b = `model.rope_max_wavelength`), so
q . k depends only on the relative position. Stage 2 (long-context adaptation) extends
a model pretrained on L = `model.rope_original_length` tokens s = `model.rope_scale`
fold by rescaling the frequencies (`model.rope_scaling`, one of `ROPE_SCALINGS`):

  none    theta_i (s must be 1).
  linear  position interpolation (Chen et al., 2023, "Extending context window of large
          language models via positional interpolation"): theta_i / s, i.e. positions / s.
  ntk     NTK-aware scaling (bloc97, 2023, reddit r/LocalLLaMA; the base change of Code
          Llama, Roziere et al., 2023): base b' = b s^(H / (H - 2)), which keeps the
          highest frequency and divides the lowest one by exactly s.
  yarn    YaRN (Peng et al., 2023, "YaRN: efficient context window extension of large
          language models"), NTK-by-parts: with r_i = L theta_i / (2 pi) the turns of
          pair i within L and gamma_i = clip((r_i - beta_slow) / (beta_fast - beta_slow),
          0, 1), theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i (fast pairs keep
          their frequency, slow ones interpolate), plus the attention temperature
          sqrt(1/t) = 0.1 ln s + 1 multiplied into both q and k (logits scale by its
          square), as in the paper's reference code and Hugging Face transformers. Those
          ramp over rounded dimension indices; the ramp here is the paper's, over r_i.

The per-pair scaling factors are computed in float64 numpy from the static config; the
base frequencies and the rotation stay in f32 exactly as before the extensions existed,
so 'none' (and any scaling with s = 1) is bit-identical to plain RoPE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")  # `model.rope_scaling`.


def _frequency_ratios(head_dim: int, max_wavelength: float, scaling: str, scale: float,
                      original_length: int, beta_fast: float,
                      beta_slow: float) -> np.ndarray | None:
  """float64 [H/2] factors theta'_i / theta_i of a scaling; None for 'none'."""
  half = head_dim // 2
  i = np.arange(half, dtype=np.float64)
  if scaling == "none":
    return None
  if scaling == "linear":
    return np.full(half, 1.0 / scale)
  if scaling == "ntk":
    # (b s^(H/(H-2)))^(-2i/H) = b^(-2i/H) s^(-2i/(H-2)): only the s part is new.
    if head_dim < 4:
      raise ValueError(f"NTK-aware RoPE scaling needs head_dim >= 4, got {head_dim}.")
    return scale ** (-2.0 * i / (head_dim - 2))
  if scaling == "yarn":
    if original_length <= 0:
      raise ValueError(f"YaRN needs the pretrained length (rope_original_length > 0), "
                       f"got {original_length}.")
    if not beta_fast > beta_slow:
      raise ValueError(f"YaRN needs beta_fast > beta_slow, got {beta_fast}, {beta_slow}.")
    inv_freq = max_wavelength ** (-i / half)  # [H/2] theta_i = b^(-2i/H)
    turns = original_length * inv_freq / (2 * math.pi)  # r_i = L / lambda_i
    gamma = np.clip((turns - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
    return (1.0 - gamma) / scale + gamma
  raise ValueError(f"rope scaling {scaling!r} is not one of {ROPE_SCALINGS}.")


def rope_frequencies(head_dim: int, max_wavelength: float = 10_000.0,
                     scaling: str = "none", scale: float = 1.0, original_length: int = 0,
                     beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> tuple[jax.Array, float]:
  """The rotation frequencies of a RoPE scaling and its attention factor.

  Args:
    head_dim: H (even).
    max_wavelength: the base b of plain RoPE.
    scaling: one of `ROPE_SCALINGS` (see the module docstring).
    scale: s >= 1, the context extension factor.
    original_length: L, the pretrained context length (yarn only).
    beta_fast: yarn: pairs with more turns than this within L keep their frequency.
    beta_slow: yarn: pairs with fewer turns than this are interpolated (divided by s).

  Returns:
    (f32 [H/2] inverse frequencies theta'_i in radians per position, the factor that
    multiplies the rotated q and k: 0.1 ln s + 1 for yarn, else 1).
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  if not scale >= 1.0:
    raise ValueError(f"rope scale must be >= 1, got {scale}.")
  half = head_dim // 2
  # The f32 base exactly as before (an f64 base rounds differently for some H, e.g.
  # 192), so plain RoPE stays bit-identical across this change.
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  ratios = _frequency_ratios(head_dim, max_wavelength, scaling, scale, original_length,
                             beta_fast, beta_slow)
  if ratios is not None:
    inv_freq = inv_freq * jnp.asarray(ratios, jnp.float32)
  factor = 0.1 * math.log(scale) + 1.0 if scaling == "yarn" else 1.0
  return inv_freq, factor


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               attention_factor: float = 1.0) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + H/2]) by positions * inv_freq[i].

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] integer token positions.
    inv_freq: [H/2] inverse frequencies (`rope_frequencies`).
    attention_factor: multiplies the result (YaRN's temperature; 1 = none).

  Returns:
    [B, T, N, H] in x's dtype (the rotation is computed in f32).
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if attention_factor != 1.0:  # Folded into the [B, T, H/2] tables: cheaper than x.
    sin, cos = sin * attention_factor, cos * attention_factor
  # As one multiply-add over the halves [x1, x2] and their swap [x2, x1]:
  # [x1, x2] * [cos, cos] + [x2, x1] * [-sin, sin]. A concatenate of the two rotated
  # halves ran 1.7x slower on XLA:CPU (results 11.4).
  cos2 = jnp.stack([cos, cos], axis=-2)[:, :, None]  # [B, T, 1, 2, H/2]
  sin2 = jnp.stack([-sin, sin], axis=-2)[:, :, None]
  # Materialised once: fused into the rotation, XLA:CPU evaluates sin and cos again for
  # every head.
  cos2, sin2 = jax.lax.optimization_barrier((cos2, sin2))
  halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
  out = (halves * cos2 + halves[..., ::-1, :] * sin2).reshape(x.shape)
  return out.astype(x.dtype)
