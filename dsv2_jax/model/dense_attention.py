"""Dense causal attention with a hand-written backward pass that skips masked blocks.

The kernel behind `model.attention='dense'`. Its oracle is XLA's
`jax.nn.dot_product_attention` (tests/model/test_dense_attention.py checks outputs and
gradients against it). What it does differently, and why (docs/results.md section 11.4):

- **Query chunks.** Queries are cut into C chunks; chunk i scores only the keys up to its
  own end, so the work above the causal diagonal that a dense n x n kernel computes and
  masks away is mostly skipped: (C + 1) / 2C of the full score matrix, 62% at C = 4.
- **A hand-written VJP.** Autodiff of softmax attention reduces dP * P over the key axis
  (an n x n reduction) and keeps a mask select in the backward pass; the flash-attention
  identity dS = P * (dP - rowsum(dO * O)) reduces over the head dimension instead, and
  the saved probabilities are reused.
- **Head-major matmuls** [B, K, G, T, H], f32 softmax, operands in the compute dtype
  with f32 accumulation in both passes (`mixed_precision.dot`), so a bf16 model runs
  every attention matmul on the bf16 units (AMX where the CPU has it).

Shapes follow the repo alphabet: q [B, T, N, H]; k, v [B, T, K, H]; N = K G. Values may
be narrower or wider than queries and keys (v [B, T, K, O], Multi-head Latent Attention).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv2_jax.model.layers import MASK_VALUE
from dsv2_jax.model.mixed_precision import dot

MIN_CHUNK = 64  # Smaller query chunks make matmuls too thin to pay for the skipped work.
MAX_CHUNKS = 8  # Past 8 chunks the saving ((C + 1) / 2C of the scores) is within 6% of 1/2.


def query_chunk(length: int) -> int:
  """Queries per chunk for a sequence of `length`: at least MIN_CHUNK, at most MAX_CHUNKS
  chunks (T = 256 -> 64, T = 1,024 -> 128, T = 16,384 -> 2,048)."""
  return max(MIN_CHUNK, -(-length // MAX_CHUNKS))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segments: jax.Array | None = None,
                     chunk: int | None = None) -> jax.Array:
  """Causal softmax attention. q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H].

  Args:
    segments: int [B, T] example ids of packed rows; a query attends only within its own.
    chunk: queries per chunk (default `query_chunk(T)`).
  """
  b, t = q.shape[:2]
  if segments is None:
    segments = jnp.zeros((b, t), jnp.int32)
  chunk = min(t, chunk or query_chunk(t))
  return _attention(chunk, q, k, v, segments)


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
  """(start, end) of each query chunk; chunk i scores the keys [0, end)."""
  return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _heads_major(x: jax.Array, kv_heads: int) -> jax.Array:
  """Queries (or their cotangent) [B, T, N, H] -> [B, K, G, T, H]."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _tokens_major(x: jax.Array) -> jax.Array:
  """[B, K, G, T, H] -> [B, T, N, H]: the inverse of `_heads_major`."""
  b, k, g, t, h = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _probabilities(qh, kh, segments, start, end):
  """Softmax over keys [0, end) of the queries [start, end), f32 [B, K, G, t, end]."""
  scale = 1.0 / math.sqrt(qh.shape[-1])
  logits = dot("BKGTH,BKSH->BKGTS", qh[:, :, :, start:end], kh[:, :, :end]) * scale
  rows = jnp.arange(start, end)[:, None]
  mask = rows >= jnp.arange(end)[None, :]  # [t, end]
  mask = mask & (segments[:, start:end, None] == segments[:, None, :end])  # [B, t, end]
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


def _forward(chunk, q, k, v, segments):
  qh = _heads_major(q, k.shape[2])
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
  probs, outs = [], []
  for start, end in chunk_bounds(q.shape[1], chunk):
    # Kept in the compute dtype: the backward's dV matmul takes them as they are.
    p = _probabilities(qh, kh, segments, start, end).astype(vh.dtype)
    outs.append(dot("BKGTS,BKSH->BKGTH", p, vh[:, :, :end]))
    probs.append(p)
  out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, H] f32
  return _tokens_major(out).astype(q.dtype), (qh, kh, vh, out, probs, segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(chunk, q, k, v, segments):
  return _forward(chunk, q, k, v, segments)[0]


def _backward(chunk, saved, g):
  qh, kh, vh, out, probs, segments = saved
  t, h = g.shape[1], qh.shape[-1]
  scale = 1.0 / math.sqrt(h)
  gh = _heads_major(g, kh.shape[1])
  row_dot = jnp.sum(gh.astype(jnp.float32) * out, axis=-1)  # rowsum(dO * O) [B, K, G, T]
  gh = gh.astype(qh.dtype)
  dq = []
  dk_t = jnp.zeros(kh.shape[:2] + (h, t), jnp.float32)  # [B, K, H, S]: keys last
  dv_t = jnp.zeros(vh.shape[:2] + (vh.shape[-1], t), jnp.float32)
  for (start, end), p in zip(chunk_bounds(t, chunk), probs):
    g_i = gh[:, :, :, start:end]
    # Written with the [t, S] matrix as the untransposed right operand.
    dv_t = dv_t.at[..., :end].add(dot("BKGTH,BKGTS->BKHS", g_i, p))
    dp = dot("BKGTH,BKSH->BKGTS", g_i, vh[:, :, :end])
    ds = (p.astype(jnp.float32) * (dp - row_dot[..., start:end, None]) * scale
          ).astype(qh.dtype)
    dq.append(dot("BKGTS,BKSH->BKGTH", ds, kh[:, :, :end]))
    dk_t = dk_t.at[..., :end].add(dot("BKGTH,BKGTS->BKHS", qh[:, :, :, start:end], ds))
  dq = _tokens_major(jnp.concatenate(dq, axis=3))
  dk = dk_t.transpose(0, 3, 1, 2)  # [B, S, K, H]
  dv = dv_t.transpose(0, 3, 1, 2)
  return dq.astype(g.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attention.defvjp(_forward, _backward)
