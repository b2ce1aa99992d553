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
          square), as in the paper's reference code and Hugging Face transformers.
          `yarn_ramp` picks the ramp: 'turns' (the default) is the paper's, linear in r_i;
          'dims' is the reference code's (DeepSeek-V2, Hugging Face), linear over the pair
          index i between the rounded indices where r_i = beta_fast and r_i = beta_slow.
          DeepSeek-V2 sets the temperature with two constants (`yarn_mscale`,
          `yarn_mscale_all_dim`; m(s, c) = 0.1 c ln s + 1): q and k are multiplied by
          m(s, mscale) / m(s, mscale_all_dim) and the logits by m(s, mscale_all_dim)^2
          (`logit_scale`); the defaults (1, 0) give the paper's (0.1 ln s + 1)^2.

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
YARN_RAMPS = ("turns", "dims")  # `model.yarn_ramp`.


def yarn_mscale(scale: float, constant: float) -> float:
  """YaRN's m(s, c) = 0.1 c ln s + 1 (1 for s <= 1 or c = 0)."""
  return 0.1 * constant * math.log(scale) + 1.0 if scale > 1 and constant else 1.0


def _dims_ramp(head_dim: int, max_wavelength: float, original_length: int,
               beta_fast: float, beta_slow: float) -> np.ndarray:
  """The reference code's YaRN ramp: 0 for pairs below the (floored) index where
  r_i = beta_fast, 1 above the (ceiled) index where r_i = beta_slow, linear between."""
  def index(turns):  # The fractional pair index i with r_i = turns.
    return head_dim * math.log(original_length / (turns * 2 * math.pi)) / (
        2 * math.log(max_wavelength))
  low = max(math.floor(index(beta_fast)), 0)
  high = min(math.ceil(index(beta_slow)), head_dim - 1)
  if low == high:
    high += 0.001  # As the reference code: no division by zero.
  i = np.arange(head_dim // 2, dtype=np.float64)
  return np.clip((i - low) / (high - low), 0.0, 1.0)


def _frequency_ratios(head_dim: int, max_wavelength: float, scaling: str, scale: float,
                      original_length: int, beta_fast: float, beta_slow: float,
                      ramp: str = "turns") -> np.ndarray | None:
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
    if ramp == "dims":
      gamma = 1.0 - _dims_ramp(head_dim, max_wavelength, original_length, beta_fast,
                               beta_slow)
    elif ramp == "turns":
      inv_freq = max_wavelength ** (-i / half)  # [H/2] theta_i = b^(-2i/H)
      turns = original_length * inv_freq / (2 * math.pi)  # r_i = L / lambda_i
      gamma = np.clip((turns - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
    else:
      raise ValueError(f"yarn ramp {ramp!r} is not one of {YARN_RAMPS}.")
    return (1.0 - gamma) / scale + gamma
  raise ValueError(f"rope scaling {scaling!r} is not one of {ROPE_SCALINGS}.")


def rope_frequencies(head_dim: int, max_wavelength: float = 10_000.0,
                     scaling: str = "none", scale: float = 1.0, original_length: int = 0,
                     beta_fast: float = 32.0,
                     beta_slow: float = 1.0, ramp: str = "turns", mscale: float = 1.0,
                     mscale_all_dim: float = 0.0) -> tuple[jax.Array, float]:
  """The rotation frequencies of a RoPE scaling and its attention factor.

  Args:
    head_dim: H (even).
    max_wavelength: the base b of plain RoPE.
    scaling: one of `ROPE_SCALINGS` (see the module docstring).
    scale: s >= 1, the context extension factor.
    original_length: L, the pretrained context length (yarn only).
    beta_fast: yarn: pairs with more turns than this within L keep their frequency.
    beta_slow: yarn: pairs with fewer turns than this are interpolated (divided by s).
    ramp: yarn: one of `YARN_RAMPS` (see the module docstring).
    mscale, mscale_all_dim: yarn: the temperature constants (see the module docstring).

  Returns:
    (f32 [H/2] inverse frequencies theta'_i in radians per position, the factor that
    multiplies the rotated q and k: m(s, mscale) / m(s, mscale_all_dim) for yarn, by
    default 0.1 ln s + 1; else 1).
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
                             beta_fast, beta_slow, ramp)
  if ratios is not None:
    inv_freq = inv_freq * jnp.asarray(ratios, jnp.float32)
  factor = 1.0
  if scaling == "yarn":
    factor = yarn_mscale(scale, mscale) / yarn_mscale(scale, mscale_all_dim)
  return inv_freq, factor


def config_frequencies(cfg, head_dim: int) -> tuple[jax.Array, float]:
  """`rope_frequencies` of a `model` config section for rotated width `head_dim`."""
  return rope_frequencies(head_dim, cfg.rope_max_wavelength, cfg.rope_scaling,
                          cfg.rope_scale, cfg.rope_original_length, cfg.yarn_beta_fast,
                          cfg.yarn_beta_slow, cfg.yarn_ramp, cfg.yarn_mscale,
                          cfg.yarn_mscale_all_dim)


def logit_scale(cfg) -> float:
  """The factor on the attention logits beyond 1/sqrt(head dim): m(s, mscale_all_dim)^2
  for yarn (DeepSeek-V2's softmax scale), else 1."""
  if cfg.position != "rope" or cfg.rope_scaling != "yarn":
    return 1.0
  return yarn_mscale(cfg.rope_scale, cfg.yarn_mscale_all_dim) ** 2


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
