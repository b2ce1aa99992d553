"""Multi-head Latent Attention (MLA; DeepSeek-V2, Liu et al. 2024, sec. 2.1).

Keys and values of all heads come from one low-rank latent per token, and the position
signal rides on a separate RoPE key that all heads share:

  c_kv   = norm(x W_dkv)                  [X, c]     the joint KV latent (what decode caches)
  k_rope = RoPE(x W_kr)                   [B, T, r]  one decoupled RoPE key for all heads
  k_nope = c_kv W_uk                      [X, N, H]  per-head keys without RoPE
  v      = c_kv W_uv                      [X, N, O]  per-head values
  q      = x W_q  or  norm(x W_dq) W_uq   [X, N, H + r]  (low-rank queries: q_lora_rank)
  attention(q, [k_nope, k_rope], v) per head; the output projection reads N O.

Training and prefill run the expanded ("naive") form above through the configured kernel
(`model.attention`: dense or DSA). Decoding caches only c_kv and k_rope ((c + r) values
per token and layer, against 2 N H for multi-head attention) and absorbs the up-projections
as the paper describes: W_uk into the query (q_nope W_uk^T lives in latent space, so the
logits are q_lat . c_kv + q_rope . k_rope) and W_uv into the output (the probabilities
weight latents, then W_uv maps the mix to values). Both forms are the same function;
tests/model/test_mla.py checks decoding token by token against the full forward.

Shapes follow the repo alphabet (see `dsv2_jax.model`), with c, q, r, O for the widths
of the KV latent, the query latent, the RoPE part and a value head.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from dsv2_jax.model import dsa
from dsv2_jax.model.attention import dsa_spec, packed_segments
from dsv2_jax.model.dense_attention import causal_attention
from dsv2_jax.model.layers import MASK_VALUE, Einsum, Norm, dtype_of
from dsv2_jax.model.rope import apply_rope, config_frequencies, logit_scale


def _equal_widths(kernel, q, k, v, *args):
  """`kernel(q, k, v, *args)` for a kernel that needs values as wide as keys (DSA's): the
  narrower side is zero-padded (q and k rescaled so that q . k / sqrt(width) is unchanged)
  and the output cut back to the value width."""
  qk, vdim = q.shape[-1], v.shape[-1]
  pad = lambda a, n: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n)])  # noqa: E731
  if vdim < qk:
    return kernel(q, k, pad(v, qk - vdim), *args)[..., :vdim]
  if vdim > qk:
    q = (q * math.sqrt(vdim / qk)).astype(q.dtype)
    return kernel(pad(q, vdim - qk), pad(k, vdim - qk), v, *args)
  return kernel(q, k, v, *args)


class MultiHeadLatentAttention(nn.Module):
  """MLA: [X, D] tokens -> [X, D]; the `Attention` of a model with mla.kv_lora_rank > 0.

  Attributes:
    cfg: the `model` config section (frozen).
    decode: cache (c_kv, k_rope) and attend the new queries to the cache (absorbed).
    packed: rows hold several examples; attention stays within each (dense kernel).
  """

  cfg: ml_collections.FrozenConfigDict
  decode: bool = False
  packed: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [X, D] tokens of B sequences of length T, positions: int [B, T] -> [X, D]."""
    cfg, mla = self.cfg, self.cfg.mla
    b, t = positions.shape
    d, n = x.shape[-1], cfg.num_heads
    nope, rope, vdim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    dense = lambda shape, axes, name, fan_in=(0,): Einsum(  # noqa: E731
        shape, axes, fan_in, dtype, param_dtype, name=name)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name=name)  # noqa: E731

    if mla.q_lora_rank:
      q_latent = dense((d, mla.q_lora_rank), ("embed", "q_lora"), "query_down")("XD,Dq->Xq", x)
      q_latent = norm("query_norm")(q_latent)
      q_latent = checkpoint_name(q_latent, "query_latent")
      q = dense((mla.q_lora_rank, n, nope + rope), ("q_lora", "heads", "kv"), "query_up")(
          "Xq,qNH->XNH", q_latent)
    else:
      q = dense((d, n, nope + rope), ("embed", "heads", "kv"), "query")("XD,DNH->XNH", x)
    q = q.reshape(b, t, n, nope + rope)
    kv_latent = dense((d, mla.kv_lora_rank), ("embed", "kv_lora"), "kv_down")("XD,Dc->Xc", x)
    kv_latent = norm("kv_norm")(kv_latent)
    kv_latent = nn.with_logical_constraint(kv_latent, ("tokens", "act_kv_lora"))
    kv_latent = checkpoint_name(kv_latent, "kv_latent")  # [X, c]
    k_rope = dense((d, rope), ("embed", "kv"), "key_rope")("XD,Dr->Xr", x)
    key_up = dense((mla.kv_lora_rank, n, nope), ("kv_lora", "heads", "kv"), "key_up")
    value_up = dense((mla.kv_lora_rank, n, vdim), ("kv_lora", "heads", "kv"), "value_up")

    inv_freq, factor = config_frequencies(cfg, rope)
    q_nope = q[..., :nope]
    q_rope = apply_rope(q[..., nope:], positions, inv_freq, factor)
    k_rope = apply_rope(k_rope.reshape(b, t, 1, rope), positions, inv_freq, factor)
    k_rope = checkpoint_name(k_rope[:, :, 0], "key_rope")  # [B, T, r]
    # The softmax scale: 1 / sqrt(H + r) (the kernels' own), times YaRN's mscale term.
    scale = logit_scale(cfg)

    if self.decode:
      out = self._absorbed_decode(q_nope, q_rope, kv_latent.reshape(b, t, -1), k_rope,
                                  positions, key_up, value_up, scale)
    else:
      k_nope = key_up("Xc,cNH->XNH", kv_latent).reshape(b, t, n, nope)
      v = value_up("Xc,cNO->XNO", kv_latent).reshape(b, t, n, vdim)
      q = jnp.concatenate([q_nope, q_rope], axis=-1)
      if scale != 1.0:
        q = (q * scale).astype(q.dtype)
      k = jnp.concatenate(
          [k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, t, n, rope)).astype(k_nope.dtype)],
          axis=-1)
      q = checkpoint_name(nn.with_logical_constraint(
          q, ("batch", "length", "act_heads", "act_kv")), "query")
      k = checkpoint_name(nn.with_logical_constraint(
          k, ("batch", "length", "act_heads", "act_kv")), "key")
      v = checkpoint_name(nn.with_logical_constraint(
          v, ("batch", "length", "act_heads", "act_kv")), "value")
      spec = dsa_spec(cfg)
      if spec is None:
        out = causal_attention(q, k, v, packed_segments(positions) if self.packed else None)
      elif self.packed:
        raise ValueError(f"model.attention={cfg.attention!r} does not take packed rows: use "
                         "dense attention or data.packing='none'.")
      else:
        out = _equal_widths(dsa.dsa_attention, q, k, v, spec, positions)
    out = checkpoint_name(out, "attention_out").reshape(b * t, n, vdim)  # [X, N, O]
    return dense((n, vdim, d), ("heads", "kv", "embed"), "out", (0, 1))("XNO,NOD->XD", out)

  def _absorbed_decode(self, q_nope, q_rope, kv_latent, k_rope, positions, key_up,
                       value_up, scale):
    """Writes (c_kv, k_rope) at positions[0, 0]..+T; attends in latent space.

    q_nope [B, T, N, H], q_rope [B, T, N, r], kv_latent [B, T, c], k_rope [B, T, r]
    -> [B, T, N, O].
    """
    if dsa_spec(self.cfg) is not None:
      raise ValueError(f"model.attention={self.cfg.attention!r}: decoding with Multi-head "
                       "Latent Attention supports dense attention only; generate with "
                       "--config.model.attention=dense (the weights are the same).")
    initialized = self.has_variable("cache", "cached_latent")
    latent = self.variable("cache", "cached_latent", jnp.zeros, kv_latent.shape,
                           kv_latent.dtype)
    keys = self.variable("cache", "cached_key_rope", jnp.zeros, k_rope.shape, k_rope.dtype)
    start = positions[0, 0]
    if initialized:
      latent.value = jax.lax.dynamic_update_slice(latent.value, kv_latent, (0, start, 0))
      keys.value = jax.lax.dynamic_update_slice(keys.value, k_rope, (0, start, 0))
    # model.init(..., decode=True) only sizes the cache; its output is discarded.
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    cache_latent, cache_keys = f32(latent.value), f32(keys.value)  # [B, S, c], [B, S, r]
    q_latent = key_up("BTNH,cNH->BTNc", q_nope)  # W_uk absorbed into the query.
    head = q_nope.shape[-1] + q_rope.shape[-1]
    logits = (jnp.einsum("BTNc,BSc->BNTS", f32(q_latent), cache_latent)
              + jnp.einsum("BTNr,BSr->BNTS", f32(q_rope), cache_keys)) * (
                  scale / math.sqrt(head))
    slots = jnp.arange(cache_latent.shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    logits = jnp.where(mask[:, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out_latent = jnp.einsum("BNTS,BSc->BTNc", probs, cache_latent)
    return value_up("BTNc,cNO->BTNO", out_latent.astype(q_nope.dtype))  # W_uv absorbed.
