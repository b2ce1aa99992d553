"""Autoregressive sampling with the decode KV cache.

The prompt is prefilled in one call (its keys/values written to the cache), then
`lax.scan` emits one token per step: temperature and top-k sampling, greedy at
temperature 0. The whole loop is one jitted program.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dsv2_jax.parallel import sharding


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
  """A zeroed cache for `length` positions, shaped without running the model."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32),
                         decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int
                 ) -> jax.Array:
  """logits [B, V] -> int32 [B]."""
  logits = logits.astype(jnp.float32)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                              "top_k", "mesh"))
def generate(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
             mesh: Mesh | None = None) -> jax.Array:
  """Continues `prompt` (int32 [B, T]) by `max_new_tokens` tokens -> int32 [B, new].

  With a `mesh`, the model runs under its activation rules: tensor-parallel heads and
  FFN, and, when the mesh has stages, the pipelined stack (`parallel.pipeline`).
  """
  rules = contextlib.nullcontext() if mesh is None else sharding.activation_rules(mesh)
  with rules:
    return _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k)


def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k):
  b, p = prompt.shape
  cache = init_cache(model, b, p + max_new_tokens)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True,
                                  mutable=["cache"])

  def step(carry, step_rng):
    last_logits, cache = carry
    token = sample_token(last_logits, step_rng, temperature, top_k)  # [B]
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                    decode=True, mutable=["cache"])
    return (logits[:, -1], variables["cache"]), token

  _, tokens = jax.lax.scan(step, (logits[:, -1], variables["cache"]),
                           jax.random.split(rng, max_new_tokens))
  return tokens.T  # [B, new]
