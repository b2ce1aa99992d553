"""Autoregressive sampling with the decode KV cache, optionally in a rolling window.

The prompt is prefilled in one call (its keys/values written to the cache), then
`lax.scan` emits one token per step: temperature, top-k and nucleus (top-p, Holtzman et
al. 2020, "The Curious Case of Neural Text Degeneration") sampling, greedy at
temperature 0. The whole loop is one jitted program with static shapes.

Rolling window (`window` W > 0, `stride` S): generation may run past the model's
context. The model always sees at most W tokens: the token at absolute index i of the
sequence (prompt + generated, 0-based) is predicted from tokens[s(i):i], with

  s(i) = 0                      if i <= W,
  s(i) = S * ceil((i - W) / S)  otherwise.

The window stays put while it fills, then jumps forward S tokens at a time. At each
jump its keys/values are recomputed from scratch: a fresh cache, the W - S + 1 kept
tokens prefilled at positions re-based to 0. Shifting the old cache instead would be
cheaper but wrong: a kept token's deeper-layer keys/values were computed attending to
the dropped tokens, so they would still carry them (and positions would keep growing past
the trained range, or need re-rotating). The cost is one prefill of
W - S + 1 tokens per S generated tokens. Prompts longer than W follow the same rule
(generation starts in the segment of s(p), p the prompt length).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dsv2_jax.model.transformer import Transformer, build_model, layer_plan
from dsv2_jax.parallel import sharding


def unstacked(model: nn.Module, params: Any, mesh: Mesh | None = None
              ) -> tuple[nn.Module, Any]:
  """The model and parameters decoding runs: the `nn.scan` stack split into per-layer
  parameters (a model with `scan_layers=False`, numerically the same layers).

  In a scanned stack every layer's weights are a dynamic slice of the stacked arrays,
  and XLA:CPU copies that slice on each pass, so every generated token read each weight
  three times (results 11.2). Split once with static slices before the token loop, each
  token reads each weight once. The compiled program then holds every layer (compile
  time grows with depth); a pipelined mesh (stages > 1) keeps the stack, and so does a
  model that is not this package's Transformer (e.g. qwix's wrapped baseline).
  """
  cfg = getattr(model, "cfg", None)
  stages = 1 if mesh is None else dict(mesh.shape).get("stage", 1)
  if type(model) is not Transformer or not cfg.scan_layers or stages > 1:
    return model, params
  flat = build_model(ml_collections.ConfigDict({**cfg.to_dict(), "scan_layers": False}))
  out = dict(params)
  for name, _, repeats in layer_plan(cfg):
    stack = out.pop(name)
    for i in range(repeats):
      out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stack)
  return flat, out


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
  """A zeroed cache for `length` positions, shaped without running the model.

  A fresh cache has index 0: the first tokens written to it get positions 0, 1, ...
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32),
                         decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float = 1.0
                  ) -> jax.Array:
  """The f32 logits [B, V] that sampling draws from: scaled, then top-k and top-p masked.

  Masked tokens get -inf. temperature must be > 0. top_k 0 (or >= V) keeps all tokens;
  top_p in (0, 1] keeps the smallest set of most likely tokens whose probability (after
  temperature and top-k) sums to >= top_p, always at least the most likely one; 1 = off.
  Tokens tied with the last kept one are kept too (as with top-k).
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first.
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the more likely tokens.
    # Token r is kept iff the more likely ones hold < p: then r is needed to reach p.
    # r = 0 always is (before = 0 < p); kept ranks are a prefix of the sorted order.
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # [B, 1], >= 1
    cutoff = jnp.take_along_axis(desc, kept - 1, axis=-1)  # [B, 1]
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                 top_p: float = 1.0) -> jax.Array:
  """logits [B, V] -> int32 [B]: argmax at temperature 0, else a draw of `filter_logits`."""
  if temperature <= 0:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                              "top_k", "top_p", "window", "stride", "mesh",
                                              "unstack"))
def generate(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 1.0, window: int = 0, stride: int = 0,
             mesh: Mesh | None = None, unstack: bool = True) -> jax.Array:
  """Continues `prompt` (int32 [B, T]) by `max_new_tokens` tokens -> int32 [B, new].

  Args:
    model, params: the transformer and its parameters.
    prompt: int32 [B, T].
    rng: key; new token j is drawn with `jax.random.split(rng, max_new_tokens)[j]`.
    max_new_tokens: tokens to generate.
    temperature, top_k, top_p: see `sample_token` (temperature 0 = greedy).
    window: 0 = no rolling: the model sees the whole sequence, so T + max_new_tokens
      must fit the model's positions (one cache of T + max_new_tokens slots). W > 0: the
      rolling window of the module docstring; token i is predicted from tokens[s(i):i],
      s(i) = 0 if i <= W else S * ceil((i - W) / S), every window recomputed in a fresh
      cache of W slots. Equals window 0 whenever T + max_new_tokens <= W + 1.
    stride: S in [1, W], the tokens the window jumps by; 0 = max(W // 4, 1). Ignored
      when window is 0.
    mesh: with a mesh, the model runs under its activation rules: tensor-parallel heads
      and FFN, and, when the mesh has stages, the pipelined stack (`parallel.pipeline`).
    unstack: decode with per-layer parameters (`unstacked`), the same tokens faster;
      False keeps the scanned stack (shorter compiles for very deep models).
  """
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off).")
  if window < 0 or (window and not 0 <= stride <= window):
    raise ValueError(f"window={window} must be >= 0 and stride={stride} in [0, window].")
  if max_new_tokens == 0:
    return jnp.zeros((prompt.shape[0], 0), jnp.int32)
  if unstack:
    model, params = unstacked(model, params, mesh)
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k,
                             top_p=top_p)
  rules = contextlib.nullcontext() if mesh is None else sharding.activation_rules(mesh)
  with rules:
    if window == 0:
      keys = jax.random.split(rng, max_new_tokens)
      return _segment(model, params, prompt, keys, prompt.shape[1] + max_new_tokens, sample)
    return _rolling(model, params, prompt, rng, max_new_tokens, sample, window,
                    stride or max(window // 4, 1))


def _segment(model: nn.Module, params: Any, context: jax.Array, keys: jax.Array,
             cache_len: int, sample: Callable) -> jax.Array:
  """Prefills `context` [B, C] into a fresh cache of `cache_len` slots -> int32 [B, M].

  Samples M = len(keys) tokens, the j-th with keys[j]: the first from the prefill's
  last logits, each next one after feeding the previous (C + M - 1 slots are written).
  """
  b = context.shape[0]
  cache = init_cache(model, b, cache_len)
  logits, variables = model.apply({"params": params, "cache": cache}, context, decode=True,
                                  mutable=["cache"])
  first = sample(logits[:, -1], keys[0])  # [B]

  def step(carry, key):
    token, cache = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                    decode=True, mutable=["cache"])
    token = sample(logits[:, -1], key)
    return (token, variables["cache"]), token

  _, rest = jax.lax.scan(step, (first, variables["cache"]), keys[1:])  # [M - 1, B]
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def _rolling(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, new: int,
             sample: Callable, w: int, s: int) -> jax.Array:
  """`generate` with window w and stride s (python ints) -> int32 [B, new].

  Segment k >= 1 predicts tokens i in (w + (k-1)s, w + ks] from start ks: its first
  context is tokens[ks : w + (k-1)s + 1], w - s + 1 of them, and it ends with w.
  """
  b, p = prompt.shape
  keys = jax.random.split(rng, new)
  # First segment: k0 = the segment of the first prediction i = p; it runs to i = w + k0 s.
  k0 = 0 if p <= w else -(-(p - w) // s)
  n0 = min(w + k0 * s - p + 1, new)
  first = _segment(model, params, prompt[:, k0 * s:], keys[:n0], w, sample)  # [B, n0]
  if n0 == new:
    return first
  # Full segments k0 + 1 .. k0 + m, s predictions each; the last one's surplus is dropped
  # (its keys repeat the last key: those tokens are never returned).
  m = -(-(new - n0) // s)
  total = n0 + m * s
  seg_keys = keys[jnp.minimum(jnp.arange(n0, total), new - 1)]
  seg_keys = seg_keys.reshape(m, s, *keys.shape[1:])  # [m, s, ...]
  buf = jnp.zeros((b, p + total), jnp.int32)  # Prompt + everything generated.
  buf = buf.at[:, :p].set(prompt.astype(jnp.int32)).at[:, p:p + n0].set(first)

  def segment(buf, xs):
    k, key = xs
    context = jax.lax.dynamic_slice_in_dim(buf, k * s, w - s + 1, axis=1)  # [B, w - s + 1]
    out = _segment(model, params, context, key, w, sample)  # [B, s]
    return jax.lax.dynamic_update_slice_in_dim(buf, out, w + (k - 1) * s + 1, axis=1), None

  buf, _ = jax.lax.scan(segment, buf, (jnp.arange(k0 + 1, k0 + m + 1), seg_keys))
  return buf[:, p:p + new]
