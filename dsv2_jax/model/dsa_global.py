"""DSA's global part: query blocks attend their selected tokens, with a custom VJP.

Block u's queries [uP, uP + P) attend the tokens of S_u (its selection) that are at
least `window` positions behind the query; closer ones belong to the local part.

Chunking. Consecutive blocks select nearly the same tokens: block u + 1 only adds
P newly eligible positions to block u's candidates. So J consecutive blocks share
one gathered key set: the M slots of the chunk's first block plus the (J - 1)P
positions admitted after it, M + (J - 1)P keys (the S axis of the chunk's logits), a
superset of every selection S_u in the chunk (budgets only grow). Membership of a key
in S_u is a comparison against the (score, position) of S_u's last slot
(`Selection.threshold`). One [J P, S] matmul per chunk replaces J small [P, M] ones;
J is chosen so that the extra keys stay within a quarter of the M slots
(`chunk_blocks`).

Memory. Forward and backward both loop over chunks and gather inside the loop:
O(T H + J P (M + J P)) memory. (Autodiff through a loop that reads the full K/V
would keep a full-size gradient per iteration.) The backward is flash attention's,
plus the cotangent of the log-sum-exp output that the merge with the local part
needs: ds = p (dp - rowsum(do o) + dlse).

Shapes (the repo alphabet; head-major, so per-chunk matmuls need no transposes):
q [B, K, G, Tp, H] f32, Tp = U P; k, v [B, K, Tp, H]; scores [B, Tp]; selection
idx/vals [B, U, M]; thresholds [B, U]; a chunk's J P queries attend its S gathered keys.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv2_jax.model.layers import MASK_VALUE

_MAX_CHUNK = 8


def chunk_blocks(slots: int, block: int, num_blocks: int) -> int:
  """Blocks per chunk J: extra keys (J - 1) P stay within a quarter of the M slots."""
  return int(max(1, min(_MAX_CHUNK, num_blocks, 1 + slots // (4 * block))))


def _pad_blocks(x: jax.Array, axis: int, count: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, count)
  return jnp.pad(x, pad, constant_values=value)


class _Chunk:
  """Keys, positions and mask of one chunk (shared by forward and backward)."""

  def __init__(self, c, k, v, scores, idx, vals, tau_val, tau_pos, window, block, chunk,
               first_block):
    b = k.shape[0]
    cp, extra = chunk * block, (chunk - 1) * block
    local_u0 = c * chunk  # Block index within this call's queries.
    u0 = first_block + local_u0  # Absolute block index.
    first_idx = jax.lax.dynamic_index_in_dim(idx, local_u0, axis=1, keepdims=False)  # [B, M]
    first_vals = jax.lax.dynamic_index_in_dim(vals, local_u0, axis=1, keepdims=False)
    # Positions admitted after block u0: [(u0 + 1)P - W, (u0 + J)P - W); k, v and
    # scores are padded on the left by `window`, so the slice starts at (u0 + 1)P.
    self.start = (u0 + 1) * block
    self.gather_idx = first_idx + window
    take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, self.start, extra, axis=axis)  # noqa: E731
    rows = lambda x: jnp.take_along_axis(x, self.gather_idx[:, None, :, None], axis=2)  # noqa: E731
    cols = lambda x: jnp.take_along_axis(x, self.gather_idx[:, None, None, :], axis=3)  # noqa: E731
    # k arrives transposed, [B, K, H, Tp], so that q k^T is a plain matmul.
    self.keys_t = jnp.concatenate([cols(k), take(k, 3)], axis=3)  # [B, K, H, S]
    self.values = jnp.concatenate([rows(v), take(v, 2)], axis=2)  # [B, K, S, H]
    new_pos = self.start - window + jnp.arange(extra)
    pos = jnp.concatenate([first_idx, jnp.broadcast_to(new_pos, (b, extra))], axis=1)
    key_scores = jnp.concatenate([first_vals, take(scores, 1)], axis=1)  # [B, S]
    # Membership of each key in each block's selection, then the per-query distance.
    blocks = u0 + jnp.arange(chunk)  # [J]
    last_eligible = (blocks + 1) * block - 1 - window
    tv = jax.lax.dynamic_slice_in_dim(tau_val, local_u0, chunk, axis=1)[:, :, None]  # [B,J,1]
    tpos = jax.lax.dynamic_slice_in_dim(tau_pos, local_u0, chunk, axis=1)[:, :, None]
    s, p = key_scores[:, None, :], pos[:, None, :]
    member = ((p <= last_eligible[None, :, None]) & (s > -jnp.inf)
              & ((s > tv) | ((s == tv) & (p <= tpos))))  # [B, J, S]
    tq = u0 * block + jnp.arange(cp)  # [J P]
    member = jnp.repeat(member, block, axis=1)  # [B, J P, S]
    self.allowed = (member & (p <= (tq - window)[None, :, None]))[:, None, None]  # [B,1,1,JP,S]
    self.cp = cp


def _logits(q_chunk, chunk: _Chunk):
  """q_chunk [B, K, G, J P, H] -> masked, scaled logits [B, K, G, J P, S]."""
  logits = jnp.einsum("BKGTH,BKHS->BKGTS", q_chunk, chunk.keys_t) / math.sqrt(q_chunk.shape[-1])
  return jnp.where(chunk.allowed, logits, MASK_VALUE)


def pad_keys(k: jax.Array, v: jax.Array, scores: jax.Array, window: int, right: int):
  """Once per call site: k, v, scores padded by `window` on the left (positions < 0) and
  `right` on the right; k transposed to [B, K, H, W + T + right] for q k^T matmuls."""
  kv_pad = ((0, 0), (0, 0), (window, right), (0, 0))
  scores = jnp.pad(scores, ((0, 0), (window, right)), constant_values=-jnp.inf)
  return jnp.pad(k, kv_pad).transpose(0, 1, 3, 2), jnp.pad(v, kv_pad), scores


def padding_right(num_blocks: int, block: int, chunk: int, first_block: int, length: int) -> int:
  """Right padding of k/v so that a call's last chunk can slice its admitted positions."""
  padded_blocks = num_blocks + (-num_blocks % chunk)
  return max(0, (first_block + padded_blocks) * block - length)


def _prepare(q, idx, vals, tau_val, tau_pos, block, chunk):
  """Pads the query blocks (and their selection rows) to a multiple of the chunk."""
  u_blocks = q.shape[3] // block
  extra_blocks = -u_blocks % chunk
  q = jnp.pad(q, ((0, 0),) * 3 + ((0, extra_blocks * block), (0, 0)))
  idx, vals = _pad_blocks(idx, 1, extra_blocks), _pad_blocks(vals, 1, extra_blocks, -jnp.inf)
  tau_val = _pad_blocks(tau_val, 1, extra_blocks, jnp.inf)
  tau_pos = _pad_blocks(tau_pos, 1, extra_blocks)
  return q, idx, vals, tau_val, tau_pos


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def global_attention(q, k, v, scores, idx, vals, tau_val, tau_pos, window: int, block: int,
                     chunk: int, first_block: int = 0):
  """Global attention of the query blocks [first_block, first_block + U).

  Args:
    q: [B, K, G, U P, H] those blocks' queries; k, v, scores: from `pad_keys` (k
      transposed, everything shifted by `window`, right padding from `padding_right`);
    idx, vals: [B, U, M]; tau_val, tau_pos: [B, U] (see `Selection`).

  Returns:
    (out [B, K, G, U P, H], lse [B, K, G, U P]); rows with no allowed key: out 0, lse MASK.
  """
  return _forward(q, k, v, scores, idx, vals, tau_val, tau_pos, window, block, chunk,
                  first_block)[0]


def _forward(q, k, v, scores, idx, vals, tau_val, tau_pos, window, block, chunk, first_block):
  tq = q.shape[3]
  qp, idx_p, vals_p, tv, tpos = _prepare(q, idx, vals, tau_val, tau_pos, block, chunk)
  size = chunk * block

  def body(c, carry):
    out, lse = carry
    ch = _Chunk(c, k, v, scores, idx_p, vals_p, tv, tpos, window, block, chunk, first_block)
    q_chunk = jax.lax.dynamic_slice_in_dim(qp, c * size, size, axis=3)
    logits = _logits(q_chunk, ch)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)  # Masked logits underflow to 0 unless the row is empty.
    empty = m <= MASK_VALUE / 2  # [B, K, G, J P, 1]
    l = jnp.where(empty, 1.0, jnp.sum(e, axis=-1, keepdims=True))
    o = jnp.where(empty, 0.0, jnp.einsum("BKGTS,BKSH->BKGTH", e, ch.values) / l)
    row_lse = jnp.where(empty, MASK_VALUE, m + jnp.log(l))[..., 0]
    out = jax.lax.dynamic_update_slice_in_dim(out, o, c * size, axis=3)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, row_lse, c * size, axis=3)
    return out, lse

  init = (jnp.zeros_like(qp), jnp.zeros(qp.shape[:4], qp.dtype))
  out, lse = jax.lax.fori_loop(0, qp.shape[3] // size, body, init)
  out, lse = out[..., :tq, :], lse[..., :tq]
  return (out, lse), (q, k, v, scores, idx, vals, tau_val, tau_pos, out, lse)


def _backward(window, block, chunk, first_block, residuals, cotangents):
  q, k, v, scores, idx, vals, tau_val, tau_pos, out, lse = residuals
  d_out, d_lse = cotangents
  b, tq = q.shape[0], q.shape[3]
  delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G, U P]
  qp, idx_p, vals_p, tv, tpos = _prepare(q, idx, vals, tau_val, tau_pos, block, chunk)
  rows = qp.shape[3] - tq
  pad_rows = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, rows),) + ((0, 0),) * (x.ndim - 4))  # noqa: E731
  d_out, lse, delta, d_lse = pad_rows(d_out), pad_rows(lse), pad_rows(delta), pad_rows(d_lse)
  batch = jnp.arange(b)[:, None]
  m = idx.shape[-1]
  size = chunk * block
  scale = 1.0 / math.sqrt(q.shape[-1])

  def body(c, carry):
    dq, dk, dv = carry  # dk, dv: [B, K, W + T + right, H], laid out like v.
    ch = _Chunk(c, k, v, scores, idx_p, vals_p, tv, tpos, window, block, chunk, first_block)
    piece = lambda x: jax.lax.dynamic_slice_in_dim(x, c * size, size, axis=3)  # noqa: E731
    q_chunk, do_chunk = piece(qp), piece(d_out)
    logits = _logits(q_chunk, ch)
    p = jnp.exp(logits - piece(lse)[..., None])  # 0 where masked (rows are never empty
    p = jnp.where(ch.allowed, p, 0.0)            # of mass unless lse is MASK).
    dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_chunk, ch.values)
    ds = p * (dp - piece(delta)[..., None] + piece(d_lse)[..., None]) * scale
    dq_c = jnp.einsum("BKGTS,BKHS->BKGTH", ds, ch.keys_t)
    dkeys = jnp.einsum("BKGTS,BKGTH->BSKH", ds, q_chunk)  # Rows first for the scatter.
    dvals = jnp.einsum("BKGTS,BKGTH->BSKH", p, do_chunk)
    dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_c, c * size, axis=3)
    dk = dk.at[batch, :, ch.gather_idx].add(dkeys[:, :m])  # [B, M] rows of [B, K, Tp', H]
    dv = dv.at[batch, :, ch.gather_idx].add(dvals[:, :m])
    add_slice = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, jax.lax.dynamic_slice_in_dim(acc, ch.start, x.shape[2], 2) + x, ch.start, 2)
    dk = add_slice(dk, jnp.moveaxis(dkeys[:, m:], 1, 2))
    dv = add_slice(dv, jnp.moveaxis(dvals[:, m:], 1, 2))
    return dq, dk, dv

  init = (jnp.zeros_like(qp), jnp.zeros_like(v), jnp.zeros_like(v))
  dq, dk, dv = jax.lax.fori_loop(0, qp.shape[3] // size, body, init)
  return dq[..., :tq, :], jnp.swapaxes(dk, 2, 3), dv, None, None, None, None, None


global_attention.defvjp(_forward, _backward)
