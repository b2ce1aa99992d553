"""DSA's global part: each query block attends its M selected keys, with a custom VJP.

Block u's queries [uP, uP + P) attend the keys at `idx[:, u]` that are valid and at
least `window` positions behind the query (closer ones belong to the local part).
Forward and backward both loop over blocks and gather the M keys inside the loop, so
memory stays O(T * H + P * M) instead of O(T * M * H): autodiff through a loop that
reads the full K/V would keep a full-size gradient per iteration. The backward is
the flash-attention one with an extra cotangent for the log-sum-exp output, which
the merge with the local part needs:
  ds = p * (dp - rowsum(do * o) + dlse).
Shapes: q [B, Tp, N, H] f32 with Tp = U * P; k, v [B, Tp, K, H]; idx, valid [B, U, M].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, Tp, ...] -> [U, B, P, ...]."""
  b, tp = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, tp // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
  """[U, B, P, ...] -> [B, U * P, ...]."""
  u, b, p = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, u * p, *x.shape[3:])


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, Tp, K, H], idx [B, M] -> [B, M, K, H]."""
  return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)


def _block_logits(qb, ks, idx_u, valid_u, u, window, block):
  """Scaled, masked logits [B, K, R, P, M] of one block, and the mask."""
  b, p, n, h = qb.shape
  kh = ks.shape[2]
  q5 = qb.reshape(b, p, kh, n // kh, h)
  logits = jnp.einsum("BPKRH,BMKH->BKRPM", q5, ks) / math.sqrt(h)
  tq = u * block + jnp.arange(p)  # [P]
  allowed = valid_u[:, None, :] & (idx_u[:, None, :] <= tq[None, :, None] - window)  # [B,P,M]
  allowed = allowed[:, None, None]  # [B, 1, 1, P, M]
  return jnp.where(allowed, logits, MASK_VALUE), allowed


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def global_attention(q, k, v, idx, valid, window: int, block: int):
  """Returns (out [B, Tp, N, H], lse [B, Tp, N]); rows with no key get lse = MASK, out 0."""
  return _forward(q, k, v, idx, valid, window, block)[0]


def _forward(q, k, v, idx, valid, window, block):
  b, tp, n, h = q.shape

  def body(_, xs):
    qb, idx_u, valid_u, u = xs
    ks, vs = _gather(k, idx_u), _gather(v, idx_u)
    logits, allowed = _block_logits(qb, ks, idx_u, valid_u, u, window, block)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(allowed, jnp.exp(logits - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("BKRPM,BMKH->BPKRH", e, vs) / jnp.moveaxis(jnp.maximum(l, 1e-30), 3, 1)
    lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), MASK_VALUE)[..., 0]
    lse = jnp.moveaxis(lse, 3, 1).reshape(b, block, n)  # [B, P, N]
    return None, (out.reshape(b, block, n, h), lse)

  u_blocks = tp // block
  xs = (_blocks(q, block), jnp.moveaxis(idx, 1, 0), jnp.moveaxis(valid, 1, 0),
        jnp.arange(u_blocks))
  _, (out, lse) = jax.lax.scan(body, None, xs)
  out, lse = _unblocks(out), _unblocks(lse)
  return (out, lse), (q, k, v, idx, valid, out, lse)


def _backward(window, block, residuals, cotangents):
  q, k, v, idx, valid, out, lse = residuals
  d_out, d_lse = cotangents
  b, tp, n, h = q.shape
  kh = k.shape[2]
  delta = jnp.sum(d_out * out, axis=-1)  # [B, Tp, N]
  batch = jnp.arange(b)[:, None]

  def to_heads(x):  # [B, P, N] -> [B, K, R, P, 1]
    return jnp.moveaxis(x.reshape(b, block, kh, n // kh), 1, 3)[..., None]

  def body(carry, xs):
    dk, dv = carry
    qb, dob, lse_b, delta_b, dlse_b, idx_u, valid_u, u = xs
    ks, vs = _gather(k, idx_u), _gather(v, idx_u)
    logits, allowed = _block_logits(qb, ks, idx_u, valid_u, u, window, block)
    p = jnp.where(allowed, jnp.exp(logits - to_heads(lse_b)), 0.0)  # [B, K, R, P, M]
    do5 = dob.reshape(b, block, kh, n // kh, h)
    q5 = qb.reshape(b, block, kh, n // kh, h)
    dp = jnp.einsum("BPKRH,BMKH->BKRPM", do5, vs)
    ds = p * (dp - to_heads(delta_b) + to_heads(dlse_b)) / math.sqrt(h)
    dq_b = jnp.einsum("BKRPM,BMKH->BPKRH", ds, ks).reshape(b, block, n, h)
    dks = jnp.einsum("BKRPM,BPKRH->BMKH", ds, q5)
    dvs = jnp.einsum("BKRPM,BPKRH->BMKH", p, do5)
    dk = dk.at[batch, idx_u].add(dks)
    dv = dv.at[batch, idx_u].add(dvs)
    return (dk, dv), dq_b

  u_blocks = tp // block
  xs = (_blocks(q, block), _blocks(d_out, block), _blocks(lse, block), _blocks(delta, block),
        _blocks(d_lse, block), jnp.moveaxis(idx, 1, 0), jnp.moveaxis(valid, 1, 0),
        jnp.arange(u_blocks))
  (dk, dv), dq = jax.lax.scan(body, (jnp.zeros_like(k), jnp.zeros_like(v)), xs)
  return _unblocks(dq), dk, dv, None, None


global_attention.defvjp(_forward, _backward)
