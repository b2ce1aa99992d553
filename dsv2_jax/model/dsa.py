"""Dynamic sparse attention (DSA): a causal local window plus score-selected global tokens.

The article's DSA (SPEC 1.1): `softmax(QK^T / sqrt(d) (.) M) V`, where each layer
builds its own mask M from a local window and a set of globally important tokens
chosen by an entropy-based score. `docs/dsa.md` states the semantics in full; in short,
with W = `window`, P = `block` (P <= W + 1), block u holding positions [uP, uP + P):

  local    query t attends keys (t - W, t]: its W most recent tokens, itself included.
  eligible block u may select among positions j <= (u + 1)P - 1 - W. Since P <= W + 1,
           these are all < uP: the selection never reads a score of the block's own
           positions or later, so it is causal.
  budget   block u selects M_u = min(budget((u + 1)P), #eligible) tokens with the highest
           scores: `fraction` p -> ceil(p L), `log` c -> ceil(c log2 L), `fixed` c -> c,
           where L = (u + 1)P is the sequence length up to the block's end.
  global   query t also attends the selected tokens j <= t - W (the rest are already in
           its window), so M_tj = [t - W < j <= t] or [j in S_u and j <= t - W].
  score    one scalar per token, from the layer's own activations (see `token_scores`).

With budget 0 this is sliding-window attention; selecting every eligible token gives
dense causal attention. The fast path (`dsa_attention`) never builds an n x n tensor:
the local part is blocked ([U, P, 2P] logits), the global part gathers M keys per block
inside a loop with its own VJP (`dsa_global.py`), and the two are merged exactly with
log-sum-exp. `dsa_reference` builds M explicitly and runs dense masked attention: the
test oracle, small n only.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] with N = K * R (grouped-query heads);
U blocks of P tokens; M selected tokens per block.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dsv2_jax.model import dsa_global

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SCORES = ("entropy", "low_entropy", "key_norm", "random")
BUDGETS = ("fraction", "log", "fixed")


class DSASpec(NamedTuple):
  """Static DSA hyper-parameters (hashable)."""

  window: int = 32  # W: local keys per query, itself included.
  block: int = 32  # P: queries sharing one global selection; P <= W + 1.
  budget: str = "fraction"  # One of BUDGETS.
  budget_value: float = 0.15  # p for fraction, c for log and fixed.
  score: str = "entropy"  # One of SCORES.
  seed: int = 0  # Seed of the `random` score.


def budget_at(spec: DSASpec, length):
  """Selected tokens allowed for a block ending at `length` tokens (int or int array).

  Capped at the block's eligible tokens, length - window. Python ints give a Python
  int (a static shape); arrays give an array.
  """
  xp = np if isinstance(length, (int, np.integer)) else jnp
  n = xp.asarray(length, xp.float32)
  if spec.budget == "fixed":
    m = xp.full_like(n, spec.budget_value)
  elif spec.budget == "fraction":
    m = xp.ceil(spec.budget_value * n)
  else:
    m = xp.ceil(spec.budget_value * xp.log2(xp.maximum(n, 1.0)))
  m = xp.clip(m, 0, xp.maximum(n - spec.window, 0)).astype(xp.int32)
  return int(m) if xp is np else m


def max_budget(spec: DSASpec, length: int) -> int:
  """Static number of selection slots for a sequence padded to `length`."""
  return budget_at(spec, length)


def num_blocks(spec: DSASpec, length: int) -> int:
  return -(-length // spec.block)


# --- scores ----------------------------------------------------------------------------

def random_scores(positions: jax.Array, seed: int) -> jax.Array:
  """A fixed pseudo-random score per position: [B, T] -> [B, T] in [0, 1)."""
  key = jax.random.PRNGKey(seed)
  flat = positions.reshape(-1)
  u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p)))(flat)
  return u.reshape(positions.shape)


def token_scores(spec: DSASpec, local_entropy: jax.Array, k: jax.Array,
                 positions: jax.Array) -> jax.Array:
  """Importance of each token as a global key, [B, T], higher is selected first.

  entropy      mean over heads of the entropy (nats) of the token's own local attention
               distribution: tokens whose attention spreads over their window.
  low_entropy  its negation: tokens with focused local attention.
  key_norm     mean over kv heads of ||k_j||.
  random       a content-independent pseudo-random score per position.
  No score is differentiated: selection is discrete, so none needs training.
  """
  if spec.score == "entropy":
    s = local_entropy
  elif spec.score == "low_entropy":
    s = -local_entropy
  elif spec.score == "key_norm":
    s = jnp.mean(jnp.linalg.norm(k.astype(jnp.float32), axis=-1), axis=-1)
  elif spec.score == "random":
    s = random_scores(positions, spec.seed)
  else:
    raise ValueError(f"unknown DSA score {spec.score!r}; choose one of {SCORES}.")
  return jax.lax.stop_gradient(s.astype(jnp.float32))


# --- selection ---------------------------------------------------------------------------

def _rank_valid(spec: DSASpec, values: jax.Array, num_blocks_: int) -> jax.Array:
  """valid[b, u, m] = slot m holds a real token and m < the block's budget."""
  ends = (jnp.arange(num_blocks_) + 1) * spec.block  # [U]
  budget = budget_at(spec, ends)  # [U]
  ranks = jnp.arange(values.shape[-1])
  return (values > -jnp.inf) & (ranks[None, None, :] < budget[None, :, None])


def select_global(spec: DSASpec, scores: jax.Array, slots: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Per block, the `slots` eligible tokens with the highest scores (a running top-k).

  Args:
    scores: [B, Tp] f32, Tp a multiple of the block.
    slots: static M, the largest budget of any block.

  Returns:
    idx int32 [B, U, M] token positions (ordered by score) and valid bool [B, U, M].
  """
  b, tp = scores.shape
  p, w = spec.block, spec.window
  u_blocks = tp // p
  # Block u newly admits positions [uP - W, (u + 1)P - W): block u of `padded`.
  padded = jnp.pad(scores, ((0, 0), (w, 0)), constant_values=-jnp.inf)[:, :tp]
  new_vals = padded.reshape(b, u_blocks, p).transpose(1, 0, 2)  # [U, B, P]
  new_idx = (jnp.arange(tp) - w).reshape(u_blocks, p)  # [U, P]

  def step(carry, xs):
    vals, idx = carry  # [B, M]
    block_vals, block_idx = xs
    cand_vals = jnp.concatenate([vals, block_vals], axis=1)
    cand_idx = jnp.concatenate([idx, jnp.broadcast_to(block_idx, (b, p))], axis=1)
    top_vals, pos = jax.lax.top_k(cand_vals, slots)
    top_idx = jnp.take_along_axis(cand_idx, pos, axis=1)
    return (top_vals, top_idx), (top_vals, top_idx)

  init = (jnp.full((b, slots), -jnp.inf, jnp.float32), jnp.zeros((b, slots), jnp.int32))
  _, (vals, idx) = jax.lax.scan(step, init, (new_vals, new_idx))
  vals, idx = vals.transpose(1, 0, 2), idx.transpose(1, 0, 2)  # [B, U, M]
  valid = _rank_valid(spec, vals, u_blocks)
  return jnp.where(valid, idx, 0), valid


def select_global_reference(spec: DSASpec, scores: jax.Array, slots: int
                            ) -> tuple[jax.Array, jax.Array]:
  """The same selection by a direct top-k over each block's eligible prefix (oracle)."""
  b, tp = scores.shape
  u_blocks = tp // spec.block
  last_eligible = (jnp.arange(u_blocks) + 1) * spec.block - 1 - spec.window  # [U]
  eligible = jnp.arange(tp)[None, :] <= last_eligible[:, None]  # [U, Tp]
  masked = jnp.where(eligible[None], scores[:, None, :], -jnp.inf)  # [B, U, Tp]
  vals, idx = jax.lax.top_k(masked, slots)
  valid = _rank_valid(spec, vals, u_blocks)
  return jnp.where(valid, idx, 0).astype(jnp.int32), valid


# --- local part ---------------------------------------------------------------------------

def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Blocked sliding-window attention: query t over keys (t - window, t].

  Block u's queries read their own block and the ceil((window - 1) / block) blocks
  before it: [U, P, S] logits with S = P * (1 + that count). Inputs f32, T a multiple
  of `block`.

  Returns:
    out [B, T, N, H] (normalised), lse [B, T, N], entropy [B, T] (mean over heads, nats).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  r, p = n // kh, block
  u_blocks = t // p
  before = -(-(window - 1) // p)  # Earlier blocks a query's window can reach.
  span = (before + 1) * p
  qb = q.reshape(b, u_blocks, p, kh, r, h)

  def spans(x):  # [B, T, K, H] -> [B, U, S, K, H]: blocks u - before .. u.
    xb = jnp.pad(x.reshape(b, u_blocks, p, kh, h), ((0, 0), (before, 0), (0, 0), (0, 0), (0, 0)))
    return jnp.concatenate([xb[:, i:i + u_blocks] for i in range(before + 1)], axis=2)

  kl, vl = spans(k), spans(v)
  logits = jnp.einsum("BUPKRH,BUSKH->BUKRPS", qb, kl) / math.sqrt(h)
  rel = (before * p + jnp.arange(p))[:, None] - jnp.arange(span)[None, :]  # t - j, [P, S]
  key_pos = ((jnp.arange(u_blocks) - before) * p)[:, None] + jnp.arange(span)[None, :]
  mask = (rel >= 0)[None] & (rel < window)[None] & (key_pos >= 0)[:, None, :]  # [U, P, S]
  logits = jnp.where(mask[None, :, None, None], logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / l
  out = jnp.einsum("BUKRPS,BUSKH->BUPKRH", probs, vl).reshape(b, t, n, h)
  lse = (m + jnp.log(l))[..., 0]  # [B, U, K, R, P]
  ent = lse - jnp.sum(jax.lax.stop_gradient(probs) * jnp.where(
      mask[None, :, None, None], logits, 0.0), axis=-1)
  entropy = jax.lax.stop_gradient(ent).mean(axis=(2, 3)).reshape(b, t)
  lse = lse.transpose(0, 1, 4, 2, 3).reshape(b, t, n)
  return out, lse, entropy


# --- the fast path ------------------------------------------------------------------------

def _pad_to_blocks(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def dsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: DSASpec,
                  positions: jax.Array | None = None, scores: jax.Array | None = None,
                  return_scores: bool = False):
  """DSA without any n x n tensor. q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  Args:
    positions: int [B, T] (for the `random` score); defaults to 0..T-1.
    scores: optional [B, T] scores overriding `spec.score` (tests, custom scorers).
    return_scores: also return the [B, T] scores (the decode cache stores them).
  """
  b, t, n, h = q.shape
  dtype = q.dtype
  tp = num_blocks(spec, t) * spec.block
  qf, kf, vf = (_pad_to_blocks(x.astype(jnp.float32), tp) for x in (q, k, v))
  out_l, lse_l, entropy = local_attention(qf, kf, vf, spec.window, spec.block)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  if scores is None:
    scores = token_scores(spec, entropy[:, :t], k, positions)
  scores = checkpoint_name(scores, "dsa_scores")
  slots = max_budget(spec, tp)
  if slots > 0:
    padded_scores = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, tp - t)),
                            constant_values=-jnp.inf)
    idx, valid = select_global(spec, padded_scores, slots)
    idx = checkpoint_name(idx, "dsa_selection")
    out_g, lse_g = dsa_global.global_attention(qf, kf, vf, idx, valid, spec.window,
                                               spec.block)
    lse = jnp.logaddexp(lse_l, lse_g)
    out = (jnp.exp(lse_l - lse)[..., None] * out_l + jnp.exp(lse_g - lse)[..., None] * out_g)
  else:
    out = out_l
  out = out[:, :t].astype(dtype)
  return (out, scores) if return_scores else out


# --- the reference ------------------------------------------------------------------------

def dsa_mask(spec: DSASpec, scores: jax.Array) -> jax.Array:
  """The explicit mask M, bool [B, T, T]: M[b, t, j] = query t may attend key j."""
  b, t = scores.shape
  tp = num_blocks(spec, t) * spec.block
  padded = jnp.pad(scores, ((0, 0), (0, tp - t)), constant_values=-jnp.inf)
  slots = max_budget(spec, tp)
  qpos = jnp.arange(t)[:, None]
  kpos = jnp.arange(t)[None, :]
  local = (kpos <= qpos) & (kpos > qpos - spec.window)  # [T, T]
  mask = jnp.broadcast_to(local, (b, t, t))
  if slots > 0:
    idx, valid = select_global_reference(spec, padded, slots)  # [B, U, M]
    chosen = jnp.zeros((b, tp // spec.block, tp), jnp.int32)
    chosen = jax.vmap(jax.vmap(lambda c, i, ok: c.at[i].add(ok.astype(jnp.int32))))(
        chosen, idx, valid) > 0  # [B, U, Tp]
    per_query = chosen[:, jnp.arange(t) // spec.block, :t]  # [B, T, T]
    mask = mask | (per_query & (kpos <= qpos - spec.window)[None])
  return mask


def reference_local_entropy(q: jax.Array, k: jax.Array, window: int) -> jax.Array:
  """Mean-over-heads entropy of each query's local attention, from dense logits."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKRH,BSKH->BKRTS", qg, k.astype(jnp.float32)) / math.sqrt(h)
  qpos, kpos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  local = (kpos <= qpos) & (kpos > qpos - window)
  logp = jax.nn.log_softmax(jnp.where(local, logits, MASK_VALUE), axis=-1)
  ent = -jnp.sum(jnp.where(local, jnp.exp(logp) * logp, 0.0), axis=-1)  # [B, K, R, T]
  return ent.mean(axis=(1, 2))


def dsa_reference(q: jax.Array, k: jax.Array, v: jax.Array, spec: DSASpec,
                  positions: jax.Array | None = None, scores: jax.Array | None = None
                  ) -> jax.Array:
  """Oracle: build M explicitly and run dense masked softmax attention (small T only)."""
  from dsv2_jax.model.attention import masked_attention  # pylint: disable=g-import-not-at-top
  b, t = q.shape[:2]
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  if scores is None:
    scores = token_scores(spec, reference_local_entropy(q, k, spec.window), k, positions)
  return masked_attention(q, k, v, dsa_mask(spec, scores.astype(jnp.float32)))


# --- decoding with a KV cache -------------------------------------------------------------

def cached_local_entropy(q: jax.Array, keys: jax.Array, positions: jax.Array,
                         window: int) -> jax.Array:
  """Entropy of each new query's local attention over the cache -> [B, T]."""
  b, t, n, h = q.shape
  kh = keys.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKRH,BSKH->BKRTS", qg, keys.astype(jnp.float32)) / math.sqrt(h)
  slots = jnp.arange(keys.shape[1])[None, None, :]
  pos = positions[:, :, None]
  local = ((slots <= pos) & (slots > pos - window))[:, None, None]  # [B, 1, 1, T, S]
  logp = jax.nn.log_softmax(jnp.where(local, logits, MASK_VALUE), axis=-1)
  ent = -jnp.sum(jnp.where(local, jnp.exp(logp) * logp, 0.0), axis=-1)  # [B, K, R, T]
  return ent.mean(axis=(1, 2))


def cached_mask(spec: DSASpec, scores: jax.Array, positions: jax.Array) -> jax.Array:
  """M for new queries at `positions` [B, T] over a cache of S slots -> bool [B, T, S].

  `scores` [B, S] must already hold the scores of every position up to the queries.
  """
  b, s = scores.shape
  slots_ = max_budget(spec, num_blocks(spec, s) * spec.block)
  j = jnp.arange(s)[None, None, :]
  pos = positions[:, :, None]
  mask = (j <= pos) & (j > pos - spec.window)
  if slots_ > 0:
    block_end = (positions // spec.block + 1) * spec.block  # [B, T]
    eligible = j <= (block_end - 1 - spec.window)[:, :, None]
    vals, idx = jax.lax.top_k(jnp.where(eligible, scores[:, None, :], -jnp.inf), slots_)
    valid = (vals > -jnp.inf) & (jnp.arange(slots_) < budget_at(spec, block_end)[..., None])
    chosen = jnp.zeros(mask.shape, jnp.int32)
    chosen = jax.vmap(jax.vmap(lambda c, i, ok: c.at[i].add(ok.astype(jnp.int32))))(
        chosen, idx, valid) > 0
    mask = mask | (chosen & (j <= pos - spec.window))
  return mask
