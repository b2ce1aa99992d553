"""The DSA test oracle: the mask built explicitly, then dense masked attention.

It states `dsa.py` (docs/dsa.md) the direct way, for small T only: each block's
selection is a top-k over its whole eligible prefix (`select_global_reference`),
each token's entropy comes from dense [T, S] logits (`reference_local_entropy`),
the mask is a bool [B, T, S] array (`dsa_mask`), and `attention.masked_attention`
runs softmax attention under it (`dsa_reference`). The fast path
(`dsa.dsa_attention`) must equal it in outputs and gradients; nothing else runs it.

Shapes follow the repo alphabet (see `dsv2_jax.model`): q [B, T, N, H],
k, v [B, S, K, H] with S = T here and N = K G.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv2_jax.model import dsa
from dsv2_jax.model.attention import masked_attention
from dsv2_jax.model.layers import MASK_VALUE


def select_global_reference(spec: dsa.DSASpec, scores: jax.Array, slots: int
                            ) -> dsa.Selection:
  """`dsa.select_global` by a direct top-k over each block's eligible prefix."""
  b, tp = scores.shape
  u_blocks = tp // spec.block
  last_eligible = (jnp.arange(u_blocks) + 1) * spec.block - 1 - spec.window  # [U]
  eligible = jnp.arange(tp)[None, :] <= last_eligible[:, None]  # [U, Tp]
  masked = jnp.where(eligible[None], scores[:, None, :], -jnp.inf)  # [B, U, Tp]
  vals, idx = jax.lax.top_k(masked, slots)
  idx = jnp.where(vals > -jnp.inf, idx, 0).astype(jnp.int32)
  return dsa.Selection(idx, vals, dsa.block_budgets(spec, u_blocks))


def dsa_mask(spec: dsa.DSASpec, scores: jax.Array) -> jax.Array:
  """The explicit mask, bool [B, T, S] (S = T): [b, t, j] = query t may attend key j."""
  b, t = scores.shape
  tp = dsa.num_blocks(spec, t) * spec.block
  padded = jnp.pad(scores, ((0, 0), (0, tp - t)), constant_values=-jnp.inf)
  slots = dsa.max_budget(spec, tp)
  qpos = jnp.arange(t)[:, None]
  kpos = jnp.arange(t)[None, :]
  local = (kpos <= qpos) & (kpos > qpos - spec.window)  # [T, S]
  mask = jnp.broadcast_to(local, (b, t, t))
  if slots > 0:
    selection = select_global_reference(spec, padded, slots)
    idx, valid = selection.idx, selection.valid()  # [B, U, M]
    chosen = jnp.zeros((b, tp // spec.block, tp), jnp.int32)
    chosen = jax.vmap(jax.vmap(lambda c, i, ok: c.at[i].add(ok.astype(jnp.int32))))(
        chosen, idx, valid) > 0  # [B, U, Tp]
    per_query = chosen[:, jnp.arange(t) // spec.block, :t]  # [B, T, S]
    mask = mask | (per_query & (kpos <= qpos - spec.window)[None])
  return mask


def reference_local_entropy(q: jax.Array, k: jax.Array, window: int) -> jax.Array:
  """Mean-over-heads entropy of each query's local attention, from dense logits -> [B, T]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) / math.sqrt(h)
  qpos, kpos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  local = (kpos <= qpos) & (kpos > qpos - window)
  logp = jax.nn.log_softmax(jnp.where(local, logits, MASK_VALUE), axis=-1)
  ent = -jnp.sum(jnp.where(local, jnp.exp(logp) * logp, 0.0), axis=-1)  # [B, K, G, T]
  return ent.mean(axis=(1, 2))


def dsa_reference(q: jax.Array, k: jax.Array, v: jax.Array, spec: dsa.DSASpec,
                  positions: jax.Array | None = None, scores: jax.Array | None = None
                  ) -> jax.Array:
  """Oracle: build the mask explicitly and run dense masked softmax attention.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with S = T.
    positions: int [B, T] (for the `random` score); defaults to 0..T-1.
    scores: optional [B, T] scores overriding `spec.score`.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  b, t = q.shape[:2]
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  if scores is None:
    scores = dsa.token_scores(spec, reference_local_entropy(q, k, spec.window), k, positions)
  return masked_attention(q, k, v, dsa_mask(spec, scores.astype(jnp.float32)))
