"""Causal multi-head attention with RoPE, grouped-query heads and a decode KV cache.

`model.attention` (one of `ATTENTIONS`) picks the kernel behind the projections:
'dense' is `dense_attention.causal_attention` (causal softmax attention that skips the
masked blocks, tested against XLA's `jax.nn.dot_product_attention`); 'dsa' is dynamic sparse attention
(`dsa.py`, tested against its oracle `dsa_reference.py`, which runs `masked_attention`
here); 'sliding_window' is DSA with a global budget of 0. Decoding writes keys/values
(and, for DSA, each token's importance score) into the 'cache' collection and attends
the new queries to the cache under the same mask as a full forward pass.

Shapes follow the repo alphabet (see `dsv2_jax.model`): q [B, T, N, H],
k/v [B, S, K, H], N = K G; the decode cache holds them head-major, [B, K, S, H].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from dsv2_jax.model import dsa
from dsv2_jax.model.dense_attention import causal_attention
from dsv2_jax.model.layers import MASK_VALUE, Einsum, dtype_of
from dsv2_jax.model.rope import apply_rope, config_frequencies, logit_scale

ATTENTIONS = ("dense", "sliding_window", "dsa")  # `model.attention`.


def packed_segments(positions: jax.Array) -> jax.Array:
  """int [B, T] example ids of a packed row: every position 0 starts a new example."""
  return jnp.cumsum(positions == 0, axis=1)


def dsa_spec(cfg: ml_collections.ConfigDict) -> dsa.DSASpec | None:
  """The DSA hyper-parameters of a `model` config; None for dense attention."""
  if cfg.attention == "dense":
    return None
  d = cfg.dsa
  if cfg.attention == "sliding_window":
    return dsa.DSASpec(window=d.window, block=d.block, budget="fixed", budget_value=0)
  return dsa.DSASpec(window=d.window, block=d.block, budget=d.budget,
                     budget_value=d.budget_value, score=d.score, seed=d.seed)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     heads_major: bool = False) -> jax.Array:
  """Softmax attention under an explicit mask, in f32.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H], or [B, K, S, H] with `heads_major` (the decode
      cache's layout: each head's keys contiguous, read without a transpose).
    mask: bool [B, T, S], True where a query may attend.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  kv = "BKSH" if heads_major else "BSKH"
  kh = k.shape[1 if heads_major else 2]
  qg = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)  # [B, T, K, G, H]
  logits = jnp.einsum(f"BTKGH,{kv}->BKGTS", qg, k.astype(jnp.float32)) / jnp.sqrt(h)
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)  # [B, K, G, T, S]
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum(f"BKGTS,{kv}->BTKGH", probs, v.astype(jnp.float32))
  return out.reshape(b, t, n, h).astype(q.dtype)


class Attention(nn.Module):
  """Projections + RoPE + attention kernel + output projection.

  Attributes:
    cfg: the `model` config section (frozen).
    decode: write k/v into the cache and attend over it (generation).
    packed: rows hold several examples (positions restart at 0 for each); attention
      stays within an example. Dense attention only.
  """

  cfg: ml_collections.FrozenConfigDict
  decode: bool = False
  packed: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [X, D] tokens of B sequences of length T, positions: int [B, T] -> [X, D]."""
    cfg = self.cfg
    b, t = positions.shape
    d = x.shape[-1]
    n = cfg.num_heads
    k_heads = cfg.num_kv_heads or n
    h = cfg.head_dim or d // n
    dense = lambda shape, axes, name, fan_in=(0,): Einsum(  # noqa: E731
        shape, axes, fan_in, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)

    q = dense((d, n, h), ("embed", "heads", "kv"), "query")("XD,DNH->XNH", x)
    k = dense((d, k_heads, h), ("embed", "kv_heads", "kv"), "key")("XD,DKH->XKH", x)
    v = dense((d, k_heads, h), ("embed", "kv_heads", "kv"), "value")("XD,DKH->XKH", x)
    q = q.reshape(b, t, n, h)  # [B, T, N, H]
    k = k.reshape(b, t, k_heads, h)  # [B, T, K, H]
    v = v.reshape(b, t, k_heads, h)
    if cfg.position == "rope":
      inv_freq, factor = config_frequencies(cfg, h)
      q = apply_rope(q, positions, inv_freq, factor)
      k = apply_rope(k, positions, inv_freq, factor)
      scale = logit_scale(cfg)
      if scale != 1.0:  # YaRN's mscale_all_dim: on q, so every kernel sees it.
        q = (q * scale).astype(q.dtype)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", "act_kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "act_kv"))
    q = checkpoint_name(q, "query")
    k = checkpoint_name(k, "key")
    v = checkpoint_name(v, "value")

    spec = dsa_spec(cfg)
    if self.decode:
      out = self._cached_attention(q, k, v, positions, spec)
    elif spec is None:
      segments = packed_segments(positions) if self.packed else None
      out = causal_attention(q, k, v, segments)  # [B, T, N, H]
    elif self.packed:
      raise ValueError(f"model.attention={cfg.attention!r} does not take packed rows: use "
                       "dense attention or data.packing='none'.")
    else:
      out = dsa.dsa_attention(q, k, v, spec, positions)
    out = checkpoint_name(out, "attention_out").reshape(b * t, n, h)  # [X, N, H]
    return dense((n, h, d), ("heads", "kv", "embed"), "out", (0, 1))("XNH,NHD->XD", out)

  def _cached_attention(self, q, k, v, positions, spec):
    """Writes k/v at positions[0, 0]..+T and attends q to the cache under the mask."""
    initialized = self.has_variable("cache", "cached_key")
    # Head-major [B, K, S, H]: attention reads each head's keys contiguously, so a decode
    # step does not transpose the whole cache (results 8.5, 11.3).
    heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [B, T, K, H] <-> [B, K, T, H]
    shape = (k.shape[0], k.shape[2], k.shape[1], k.shape[3])
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    if spec is not None:
      cached_s = self.variable("cache", "cached_scores",
                               lambda: jnp.full(k.shape[:2], -jnp.inf, jnp.float32))
    if not initialized:  # model.init(..., decode=True) only sizes the cache.
      return causal_attention(q, k, v)
    start = positions[0, 0]
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, heads_major(k),
                                                  (0, 0, start, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, heads_major(v),
                                                  (0, 0, start, 0))
    slots = jnp.arange(cached_k.value.shape[2])  # [S]
    if spec is None:
      mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    else:
      # New tokens' scores first: a query's selection may read earlier new tokens.
      entropy = dsa.cached_local_entropy(q, heads_major(cached_k.value), positions,
                                         spec.window)
      scores = dsa.token_scores(spec, entropy, k, positions)
      cached_s.value = jax.lax.dynamic_update_slice(cached_s.value, scores, (0, start))
      mask = dsa.cached_mask(spec, cached_s.value, positions)
    return masked_attention(q, cached_k.value, cached_v.value, mask, heads_major=True)
