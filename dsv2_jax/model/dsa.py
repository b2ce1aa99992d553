"""Dynamic sparse attention (DSA): a causal local window plus score-selected global tokens.

The article's DSA (SPEC 1.1): `softmax(QK^T / sqrt(d) (.) mask) V`, where each layer
builds its own mask from a local window and a set of globally important tokens
chosen by an entropy-based score. `docs/dsa.md` states the semantics in full; in short,
with W = `window`, P = `block` (P <= W + 1), block u holding positions [uP, uP + P):

  local    query t attends keys (t - W, t]: its W most recent tokens, itself included.
  eligible block u may select among positions j <= (u + 1)P - 1 - W. Since P <= W + 1,
           these are all < uP: the selection never reads a score of the block's own
           positions or later, so it is causal.
  budget   block u selects M_u = min(budget(n_u), #eligible) tokens with the highest
           scores: `fraction` p -> ceil(p n_u), `log` c -> ceil(c log2 n_u), `fixed`
           c -> c, where n_u = (u + 1)P is the sequence length up to the block's end.
  global   query t also attends the selected tokens j <= t - W (the rest are already in
           its window), so mask[t, j] = [t - W < j <= t] or [j in S_u and j <= t - W].
  score    one scalar per token, from the layer's own activations (see `token_scores`).

With budget 0 this is sliding-window attention; selecting every eligible token gives
dense causal attention. The fast path (`dsa_attention`) never builds a [T, S] tensor:
the local part is blocked ([U, P, 2P] logits), the global part gathers M keys per block
inside a loop with its own VJP (`dsa_global.py`), and the two are merged exactly with
log-sum-exp. The test oracle, `dsa_reference.py`, builds the mask explicitly and runs
dense masked attention (small T only).

Shapes (the repo alphabet, see `dsv2_jax.model`): q [B, T, N, H]; k, v [B, T, K, H]
with N = K G (grouped-query heads); U blocks of P tokens, Tp = U P; M selection slots
per block.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dsv2_jax.model import dsa_global
from dsv2_jax.model.layers import MASK_VALUE

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

class Selection(NamedTuple):
  """Each block's `slots` best eligible tokens, best first, and its budget.

  Block u's selected set S_u is the first budget[u] slots. Ties in score rank lower
  positions first, so S_u = {eligible j : (s_j, -j) >= (s, -position) of its last slot},
  which lets the global kernel test membership without a search.
  """

  idx: jax.Array  # int32 [B, U, M] positions (0 in empty slots).
  vals: jax.Array  # f32 [B, U, M] scores (-inf in empty slots).
  budget: jax.Array  # int32 [U].

  def valid(self) -> jax.Array:
    """bool [B, U, M]: the slot holds a token of S_u."""
    ranks = jnp.arange(self.vals.shape[-1])
    return (self.vals > -jnp.inf) & (ranks[None, None, :] < self.budget[None, :, None])

  def threshold(self) -> tuple[jax.Array, jax.Array]:
    """(score, position) of each block's last selected slot, [B, U] each.

    Blocks with budget 0 get score +inf (nothing qualifies).
    """
    last = jnp.maximum(self.budget - 1, 0)[None, :, None]  # [1, U, 1]
    val = jnp.take_along_axis(self.vals, jnp.broadcast_to(last, self.vals.shape[:2] + (1,)),
                              axis=2)[..., 0]
    pos = jnp.take_along_axis(self.idx, jnp.broadcast_to(last, self.idx.shape[:2] + (1,)),
                              axis=2)[..., 0]
    return jnp.where(self.budget[None, :] > 0, val, jnp.inf), pos


def block_budgets(spec: DSASpec, num_blocks_: int) -> jax.Array:
  """int32 [U]: the budget of each of `num_blocks_` blocks."""
  return budget_at(spec, (jnp.arange(num_blocks_) + 1) * spec.block)


def select_global(spec: DSASpec, scores: jax.Array, slots: int) -> Selection:
  """Per block, the `slots` eligible tokens with the highest scores (a running top-k).

  Block u admits the P positions [uP - W, (u + 1)P - W) to the candidates of block
  u - 1, so the work is O(U (M + P) log M), not O(U T).

  Args:
    scores: [B, Tp] f32, Tp a multiple of the block.
    slots: static M, the largest budget of any block.
  """
  b, tp = scores.shape
  p, w = spec.block, spec.window
  u_blocks = tp // p
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
  return Selection(jnp.where(vals > -jnp.inf, idx, 0), vals, block_budgets(spec, u_blocks))


# --- local part ---------------------------------------------------------------------------
# The fast path runs head-major: q [B, K, G, T, H], k/v [B, K, T, H], so that every
# per-block matmul has its batch dimensions leading and needs no transpose.

def to_head_major(q: jax.Array, k: jax.Array, v: jax.Array, length: int):
  """[B, T, N, H] / [B, T, K, H] -> f32 [B, K, G, Tp, H] / [B, K, Tp, H], zero-padded."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, length - t), (0, 0), (0, 0)))  # noqa: E731
  qh = pad(q).reshape(b, length, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
  return qh, pad(k).transpose(0, 2, 1, 3), pad(v).transpose(0, 2, 1, 3)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Blocked sliding-window attention: query t over keys (t - window, t].

  Block u's queries read their own block and the `before` = ceil((window - 1) / block)
  blocks before it. Each of those key blocks is a separate [P, P] piece of logits;
  the softmax runs over the pieces jointly, so no key span is ever copied.

  Args:
    q: f32 [B, K, G, Tp, H]; k, v: f32 [B, K, Tp, H]; Tp a multiple of `block`.

  Returns:
    out [B, K, G, Tp, H] (normalised), lse [B, K, G, Tp], entropy [B, Tp] (mean over
    heads, nats).
  """
  b, kh, g, t, h = q.shape
  p = block
  u_blocks = t // p
  before = -(-(window - 1) // p)  # Earlier blocks a query's window can reach.
  qb = q.reshape(b, kh, g, u_blocks, p, h)
  kb, vb = k.reshape(b, kh, u_blocks, p, h), v.reshape(b, kh, u_blocks, p, h)
  shift = lambda x, i: jnp.pad(x, ((0, 0), (0, 0), (i, 0), (0, 0), (0, 0)))[:, :, :u_blocks]  # noqa: E731
  query_pos = jnp.arange(p)[:, None]
  logits, values = [], []
  for i in range(before + 1):  # Key block u - i.
    rel = i * p + query_pos - jnp.arange(p)[None, :]  # t - j, [P, P]
    ok = (rel >= 0) & (rel < window)
    ok = ok[None] & (jnp.arange(u_blocks) >= i)[:, None, None]  # [U, P, P]
    piece = jnp.einsum("BKGUPH,BKUSH->BKGUPS", qb, shift(kb, i)) / math.sqrt(h)
    logits.append(jnp.where(ok, piece, MASK_VALUE))
    values.append(shift(vb, i))
  m = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
  e = [jnp.exp(x - m) for x in logits]
  l = sum(jnp.sum(x, axis=-1, keepdims=True) for x in e)
  out = sum(jnp.einsum("BKGUPS,BKUSH->BKGUPH", x, y) for x, y in zip(e, values)) / l
  lse = (m + jnp.log(l))[..., 0]  # [B, K, G, U, P]
  # Entropy = lse - E_p[logit]; masked logits have p = 0 (exp underflows), so they add 0.
  mean_logit = sum(jnp.einsum("BKGUPS,BKGUPS->BKGUP", jax.lax.stop_gradient(x),
                              jnp.maximum(y, -1e30)) for x, y in zip(e, logits))
  entropy = jax.lax.stop_gradient(lse - mean_logit / l[..., 0])
  entropy = jnp.mean(entropy, axis=(1, 2)).reshape(b, t)
  return out.reshape(b, kh, g, t, h), lse.reshape(b, kh, g, t), entropy


# --- the fast path ------------------------------------------------------------------------

def _stages(spec: DSASpec, num_blocks_: int) -> list[tuple[int, int, int]]:
  """(first block, blocks, slots) per stage: with a growing budget, later stages
  need more slots; a stage computes only the slots its last block may use."""
  count = min(4, num_blocks_) if spec.budget == "fraction" else 1
  bounds = [round(i * num_blocks_ / count) for i in range(count + 1)]
  return [(lo, hi - lo, budget_at(spec, hi * spec.block))
          for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _global_part(qh, kh_, vh, scores, selection: Selection, spec: DSASpec):
  """Runs the global kernel stage by stage; returns (out, lse) for all query blocks."""
  tau_val, tau_pos = selection.threshold()
  u_blocks = qh.shape[3] // spec.block
  plan = [(first, count, slots, dsa_global.chunk_blocks(slots, spec.block, count))
          for first, count, slots in _stages(spec, u_blocks)]
  right = max(dsa_global.padding_right(count, spec.block, chunk, first, qh.shape[3])
              for first, count, _, chunk in plan)
  k_t, v_p, s_p = dsa_global.pad_keys(kh_, vh, scores, spec.window, right)  # Once.
  outs, lses = [], []
  for first, count, slots, chunk in plan:
    rows = slice(first * spec.block, (first + count) * spec.block)
    blocks = slice(first, first + count)
    if slots == 0:  # No block of this stage may select anything yet.
      outs.append(jnp.zeros_like(qh[..., rows, :]))
      lses.append(jnp.full(qh[..., rows, 0].shape, MASK_VALUE, qh.dtype))
      continue
    out, lse = dsa_global.global_attention(
        qh[..., rows, :], k_t, v_p, s_p, selection.idx[:, blocks, :slots],
        selection.vals[:, blocks, :slots], tau_val[:, blocks], tau_pos[:, blocks],
        spec.window, spec.block, chunk, first)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def dsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: DSASpec,
                  positions: jax.Array | None = None, scores: jax.Array | None = None,
                  return_scores: bool = False):
  """DSA without any [T, S] tensor. q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  Args:
    positions: int [B, T] (for the `random` score); defaults to 0..T-1.
    scores: optional [B, T] scores overriding `spec.score` (tests, custom scorers).
    return_scores: also return the [B, T] scores (the decode cache stores them).
  """
  b, t, n, h = q.shape
  tp = num_blocks(spec, t) * spec.block
  qh, kh_, vh = to_head_major(q, k, v, tp)
  out_l, lse_l, entropy = local_attention(qh, kh_, vh, spec.window, spec.block)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  if scores is None:
    scores = token_scores(spec, entropy[:, :t], k, positions)
  scores = checkpoint_name(scores, "dsa_scores")
  slots = max_budget(spec, tp)
  if slots > 0:
    padded_scores = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, tp - t)),
                            constant_values=-jnp.inf)
    selection = select_global(spec, padded_scores, slots)
    selection = selection._replace(idx=checkpoint_name(selection.idx, "dsa_selection"))
    out_g, lse_g = _global_part(qh, kh_, vh, padded_scores, selection, spec)
    lse = jnp.logaddexp(lse_l, lse_g)
    out = (jnp.exp(lse_l - lse)[..., None] * out_l + jnp.exp(lse_g - lse)[..., None] * out_g)
  else:
    out = out_l
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t].astype(q.dtype)
  return (out, scores) if return_scores else out


# --- decoding with a KV cache -------------------------------------------------------------

def cached_local_entropy(q: jax.Array, keys: jax.Array, positions: jax.Array,
                         window: int) -> jax.Array:
  """Entropy of each new query's local attention over the cache -> [B, T]."""
  b, t, n, h = q.shape
  kh = keys.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys.astype(jnp.float32)) / math.sqrt(h)
  slots = jnp.arange(keys.shape[1])[None, None, :]
  pos = positions[:, :, None]
  local = ((slots <= pos) & (slots > pos - window))[:, None, None]  # [B, 1, 1, T, S]
  logp = jax.nn.log_softmax(jnp.where(local, logits, MASK_VALUE), axis=-1)
  ent = -jnp.sum(jnp.where(local, jnp.exp(logp) * logp, 0.0), axis=-1)  # [B, K, G, T]
  return ent.mean(axis=(1, 2))


def cached_mask(spec: DSASpec, scores: jax.Array, positions: jax.Array) -> jax.Array:
  """The mask of new queries at `positions` [B, T] over a cache of S slots -> bool [B, T, S].

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
