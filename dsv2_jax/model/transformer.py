"""Decoder-only pre-norm Transformer; layers stacked with `nn.scan` under `nn.remat`.

  x = embed(tokens) (+ learned positions)
  for each layer:  x = x + attention(norm(x));  x = x + ffn(norm(x))
  logits = head(norm(x))

Scanning keeps compile time flat in depth and makes the remat policy show up in
compiled memory; every layer's parameters gain a leading 'layers' axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsv2_jax.model import remat
from dsv2_jax.model.attention import Attention
from dsv2_jax.model.mla import MultiHeadLatentAttention
from dsv2_jax.model.ffn import FeedForward
from dsv2_jax.model.moe import MoEFeedForward
from dsv2_jax.model.layers import Einsum, Embedder, Norm, dtype_of
from dsv2_jax.parallel import pipeline

# `model.position`: 'rope' rotates q and k in attention; 'learned' adds a [max_seq_len, D]
# table to the embeddings here; 'none' uses neither.
POSITIONS = ("rope", "learned", "none")
# `model.head`: 'lm' gives next-token logits [B, T, V]; 'scalar' gives one score per
# position [B, T] (f32), a reward model's output read at the last token of a text;
# 'lm_value' gives both (a PPO policy sharing its trunk with the value function).
HEADS = ("lm", "scalar", "lm_value")


class DecoderBlock(nn.Module):
  """One pre-norm block. Returns (x, None) so that it can be the body of nn.scan."""

  cfg: ml_collections.FrozenConfigDict
  deterministic: bool = True
  decode: bool = False
  moe: bool = False  # Routed experts (GMoE) instead of the dense FFN.
  packed: bool = False  # Rows hold several examples; attention stays within each.

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
    """x: [X, D] tokens, positions: [B, T] -> ([X, D], None)."""
    cfg = self.cfg
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, dtype_of(cfg.dtype),  # noqa: E731
                             dtype_of(cfg.param_dtype), name=name)
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    attention = MultiHeadLatentAttention if cfg.mla.kv_lora_rank else Attention
    h = attention(cfg, self.decode, self.packed, name="attention")(
        norm("attention_norm")(x), positions)
    x = x + dropout(h)
    ffn = MoEFeedForward(cfg, name="moe") if self.moe else FeedForward(cfg, name="ffn")
    h = ffn(norm("ffn_norm")(x))
    x = x + dropout(h)
    x = nn.with_logical_constraint(x, ("tokens", "act_embed"))
    return x, None


class BlockGroup(nn.Module):
  """`every_n_layers` blocks whose last one is MoE: the unit scanned in an MoE model."""

  cfg: ml_collections.FrozenConfigDict
  deterministic: bool = True
  decode: bool = False
  packed: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
    n = self.cfg.moe.every_n_layers
    for i in range(n):
      x, _ = DecoderBlock(self.cfg, self.deterministic, self.decode, moe=i == n - 1,
                          packed=self.packed, name=f"block_{i}")(x, positions)
    return x, None


def layer_plan(cfg: ml_collections.FrozenConfigDict) -> list[tuple[str, type, int]]:
  """(name, unit, repeats) segments of the stack: dense blocks, then MoE groups."""
  if not cfg.moe.num_experts:
    return [("layers", DecoderBlock, cfg.num_layers)]
  plan = []
  if cfg.moe.first_dense_layers:
    plan.append(("dense_layers", DecoderBlock, cfg.moe.first_dense_layers))
  groups = (cfg.num_layers - cfg.moe.first_dense_layers) // cfg.moe.every_n_layers
  plan.append(("moe_layers", BlockGroup, groups))
  return plan


class Transformer(nn.Module):
  """The language model: int tokens [B, T] -> logits [B, T, V] (compute dtype), or
  with `model.head='scalar'` one f32 score per position [B, T].

  Attributes:
    cfg: the `model` config section, frozen (`ml_collections.FrozenConfigDict`).
  """

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
    """Args:
      tokens: int32 [B, T].
      positions: int32 [B, T] for rows packed with several examples (grain's first-fit
        packing): each example's positions restart at 0, and a token attends only to
        earlier tokens of its own example (a 0 starts a new one). None: 0..T-1.
      deterministic: disables dropout.
      decode: generation mode; the tokens continue what the 'cache' collection holds.

    Returns:
      logits [B, T, V]; scores [B, T] (f32) with the scalar head; both with 'lm_value'.
    """
    cfg = self.cfg
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, t = tokens.shape
    packed = positions is not None
    if packed and decode:
      raise ValueError("packed rows (explicit positions) are for training, not decoding.")
    if not packed:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if decode:  # Positions continue from what the cache already holds.
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      positions = positions + index.value
      if not self.is_initializing():
        index.value = index.value + t

    embedder = Embedder(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype, param_dtype,
                        name="embedder")
    x = embedder.encode(tokens.reshape(b * t))  # [X, D]
    if cfg.position == "learned":
      table = self.param(
          "position_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "embed")),
          (cfg.max_seq_len, cfg.d_model), param_dtype)
      x = x + jnp.take(table, positions.reshape(b * t), axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("tokens", "act_embed"))

    stages = pipeline.num_stages()
    for name, unit, repeats in layer_plan(cfg):
      if cfg.remat_policy != "none":
        unit = nn.remat(unit, policy=remat.policy(cfg.remat_policy, cfg.remat_names),
                        prevent_cse=not cfg.scan_layers)
      if stages > 1 and cfg.scan_layers and not self.is_initializing():
        x = self._pipelined(name, unit, repeats, x, positions, deterministic, decode, packed)
      elif cfg.scan_layers:
        stack = nn.scan(
            unit,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=repeats,
            unroll=min(cfg.scan_unroll, repeats),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, decode, packed=packed, name=name)
        x, _ = stack(x, positions)
      else:
        for i in range(repeats):
          x, _ = unit(cfg, deterministic, decode, packed=packed, name=f"{name}_{i}")(
              x, positions)

    x = Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name="final_norm")(x)
    if cfg.head in ("scalar", "lm_value"):  # A reward or value model: a score per position.
      score = Einsum((cfg.d_model,), ("embed",), (0,), dtype, param_dtype,
                     name="score_head")("XD,D->X", x)
      score = score.astype(jnp.float32).reshape(b, t)  # [B, T]
      if cfg.head == "scalar":
        return score
    if cfg.tie_embeddings:
      logits = embedder.decode(x)
    else:
      logits = Einsum((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), (0,), dtype,
                      param_dtype, name="head")("XD,DV->XV", x)
    logits = nn.with_logical_constraint(logits, ("tokens", "act_vocab"))
    logits = logits.reshape(b, t, cfg.vocab_size)  # [B, T, V]
    return (logits, score) if cfg.head == "lm_value" else logits


  def _pipelined(self, name: str, unit: type, repeats: int, x: jax.Array,
                 positions: jax.Array, deterministic: bool, decode: bool,
                 packed: bool = False) -> jax.Array:
    """The scanned stack `name` run as pipeline stages (`parallel.pipeline`).

    Uses the same [L, ...] parameters (and decode cache) the scan created, so every
    layout shares one checkpoint format; sown statistics are stacked per layer as the
    scan stacks them.
    """
    key = None if deterministic else self.make_rng("dropout")

    def layer_fn(p, h, pos, key_id, cache):
      rngs = {} if key is None else {"dropout": jax.random.fold_in(key, key_id)}
      variables = {"params": p} if cache is None else {"params": p, "cache": cache}
      (h, _), sown = unit(self.cfg, deterministic, decode, packed=packed, parent=None).apply(
          variables, h, pos, rngs=rngs, mutable=["intermediates", "cache"])
      return h, sown.get("intermediates", {}), sown.get("cache")

    cache = self.variables["cache"][name] if decode else None
    x, stats, cache = pipeline.run_stack(
        layer_fn, self.variables["params"][name], x, positions, num_layers=repeats,
        microbatches=self.cfg.pipeline_microbatches, layer_state=cache)
    if stats and self.is_mutable_collection("intermediates"):
      self.put_variable("intermediates", name, stats)
    if decode:
      self.put_variable("cache", name, cache)
    return x


def build_model(model_config: ml_collections.ConfigDict) -> Transformer:
  """Transformer from the (mutable or frozen) `model` config section."""
  return Transformer(ml_collections.FrozenConfigDict(model_config))
