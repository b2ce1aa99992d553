"""Multi-head Latent Attention's decode cache: bytes per token and decode speed.

Part 1, cache bytes (exact, from the shapes `model.init(..., decode=True)` allocates,
nothing allocated: `jax.eval_shape`):
  deepseek_v2      configs/deepseek_v2.py (MLA: 512 latent + 64 RoPE values per layer)
  v2_mha           the same model with multi-head attention of the same width (128 heads
                   of 128: the MLA heads' no-RoPE width)
  v2_gqa8          ... grouped-query attention with 8 key/value heads
  deepseek_67b     DeepSeek LLM 67B (95 layers, 64 heads of 128, GQA 8): the paper's
                   comparison point for its "93.3% smaller KV cache"
Bytes per token = every layer's cache for one token, in the cache dtype (bf16). The paper's
figure also stores the MLA cache at ~6 bits per value in deployment (sec. 3.2.3):
`paper_cut_6bit` applies that to ours.

Part 2, decode speed at a long context (one process, interleaved rounds, CPU): the same
decoder (`--width`, `--layers`, `--heads`; dense FFN) with MHA, GQA (`--kv_heads`) and MLA
(latent `--latent`, RoPE `--rope`): one jitted one-token decode step of a batch of
`--batch` rows against a cache of `--context` slots, `--context - 8` of them filled (the
step reads every slot; its values do not change the cost). Tokens/s = batch / the median
step time over `--rounds` rounds.

  python -m experiments.mla_cache --out docs/figures/mla_cache.json
  python -m experiments.mla_cache --quick --out /tmp/mla_cache.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax.model import flops
from dsv2_jax.model.transformer import build_model
from experiments import common

PAPER_CUT = 0.933  # DeepSeek-V2 paper: KV cache 93.3% smaller than DeepSeek 67B's.
PAPER_BITS = 6  # ... with the cache quantized to ~6 bits per value (sec. 3.2.3).


def v2_model(arg: str = "") -> ml_collections.ConfigDict:
  return common.load_config("configs/deepseek_v2.py" + (f":{arg}" if arg else "")).model


def with_attention(model: ml_collections.ConfigDict, kind: str, kv_heads: int = 0,
                   head_dim: int = 0) -> ml_collections.ConfigDict:
  """`model` with its attention swapped: 'mla' as is, else MHA / GQA of `head_dim`."""
  m = ml_collections.ConfigDict(model.to_dict())
  if kind != "mla":
    m.mla.update(kv_lora_rank=0, q_lora_rank=0)
    m.update(head_dim=head_dim, num_kv_heads=kv_heads if kind == "gqa" else 0)
  return m


def deepseek_67b() -> ml_collections.ConfigDict:
  """DeepSeek LLM 67B (Bi et al. 2024): 95 layers, width 8,192, 64 heads, GQA 8 groups."""
  c = config_lib.default_config().model
  c.update(vocab_size=102_400, d_model=8192, num_layers=95, num_heads=64, num_kv_heads=8,
           head_dim=128, ffn_hidden=22_016, dtype="bfloat16", max_seq_len=4096)
  return c


def cache_bytes_per_token(model: ml_collections.ConfigDict, slots: int = 16) -> dict[str, Any]:
  """Bytes of decode cache per token (all layers) from the cache shapes of `slots` slots."""
  cache = jax.eval_shape(lambda: build_model(model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, slots), jnp.int32), decode=True)["cache"])
  leaves = [x for x in jax.tree.leaves(cache) if x.ndim >= 2]  # Not the position index.
  total = sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)
  values = sum(x.size for x in leaves) // slots
  per_layer = flops.cache_values_per_token(model)
  assert values == per_layer * model.num_layers, (values, per_layer)  # Shapes = formula.
  return {"bytes_per_token": total // slots, "values_per_token": values,
          "values_per_token_per_layer": per_layer, "layers": model.num_layers,
          "dtype": str(leaves[0].dtype)}


def cache_table() -> dict[str, Any]:
  v2 = v2_model()
  h = v2.mla.qk_nope_head_dim
  models = {"deepseek_v2": v2, "v2_mha": with_attention(v2, "mha", head_dim=h),
            "v2_gqa8": with_attention(v2, "gqa", kv_heads=8, head_dim=h),
            "deepseek_67b": deepseek_67b()}
  table = {name: cache_bytes_per_token(m) for name, m in models.items()}
  ours = table["deepseek_v2"]["bytes_per_token"]
  for row in table.values():
    row["mla_over_this"] = ours / row["bytes_per_token"]
  cut = 1 - ours / table["deepseek_67b"]["bytes_per_token"]
  bits = 8 * jnp.dtype(table["deepseek_v2"]["dtype"]).itemsize
  return {"models": table, "cut_vs_67b_same_dtype": cut,
          "paper_cut_6bit": 1 - (1 - cut) * PAPER_BITS / bits, "paper_cut": PAPER_CUT}


def decode_model(kind: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
  c = config_lib.default_config().model
  head = args.width // args.heads
  c.update(d_model=args.width, num_layers=args.layers, num_heads=args.heads,
           ffn_hidden=4 * args.width, max_seq_len=args.context)
  if kind == "mla":
    c.mla.update(kv_lora_rank=args.latent, qk_nope_head_dim=head, qk_rope_head_dim=args.rope,
                 v_head_dim=head)
  elif kind == "gqa":
    c.num_kv_heads = args.kv_heads
  return c


def decode_step(model_cfg: ml_collections.ConfigDict, batch: int, context: int):
  """A jitted one-token decode step on a cache filled to context - 8 slots.

  The cache is donated and carried from call to call (as `generate`'s scan carries it, so
  the write is in place), with the position reset each time: every call does the same
  work, a decode step at position context - 8."""
  model = build_model(model_cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  # Shapes only: a real init would run attention over `context` tokens to size the cache.
  cache = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((batch, context), jnp.int32), decode=True)["cache"])
  rng = np.random.default_rng(0)
  cache = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.5,
                                             x.dtype)
                       if x.ndim >= 2 else jnp.asarray(context - 8, x.dtype), cache)

  position = cache["index"]

  @functools.partial(jax.jit, donate_argnums=0)
  def step(cache, tokens):
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                  mutable=["cache"])
    return logits, {**mutated["cache"], "index": position}

  tokens = jnp.zeros((batch, 1), jnp.int32)
  state = {"cache": cache}

  def call():
    logits, state["cache"] = step(state["cache"], tokens)
    return logits
  return call


def decode_speeds(args: argparse.Namespace) -> dict[str, Any]:
  steps = {kind: decode_step(decode_model(kind, args), args.batch, args.context)
           for kind in ("mha", "gqa", "mla")}
  samples = common.interleaved({k: (lambda f=f: common.timed(f)) for k, f in steps.items()},
                               args.rounds)
  rows = {}
  for kind, times in samples.items():
    m = decode_model(kind, args)
    rows[kind] = {"step_s": times, "median_step_s": statistics.median(times),
                  "tokens_per_s": args.batch / statistics.median(times),
                  "cache_values_per_token_per_layer": flops.cache_values_per_token(m),
                  "cache_mib": args.batch * args.context * args.layers
                  * flops.cache_values_per_token(m) * 4 / 2**20}
  for row in rows.values():
    row["mla_speedup"] = row["median_step_s"] / rows["mla"]["median_step_s"]
  return {"settings": {k: getattr(args, k) for k in ("width", "layers", "heads", "kv_heads",
                                                      "latent", "rope", "batch", "context",
                                                      "rounds")},
          "cases": rows}


def plot(result: dict[str, Any]):
  def draw(path: str) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    models = result["cache"]["models"]
    a.bar(list(models), [m["bytes_per_token"] / 1024 for m in models.values()])
    a.set_ylabel("KV cache per token (KiB, bf16)")
    a.set_yscale("log")
    a.set_title("cache bytes per token")
    cases = result["decode"]["cases"]
    b.bar(list(cases), [c["tokens_per_s"] for c in cases.values()])
    s = result["decode"]["settings"]
    b.set_title(f"decode at {s['context']:,} context, batch {s['batch']} (CPU)")
    b.set_ylabel("tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  return draw


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--latent", type=int, default=256)
  parser.add_argument("--rope", type=int, default=32)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--context", type=int, default=16_384)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--quick", action="store_true",
                      help="context 1,024, width 256, 3 rounds (a smoke run)")
  parser.add_argument("--out", default="-")
  args = parser.parse_args(argv)
  if args.quick:
    args.context, args.width, args.latent, args.rope, args.rounds = 1024, 256, 64, 16, 3
  result = {"cache": cache_table(), "decode": decode_speeds(args),
            "command": common.command("experiments.mla_cache", argv)}
  cases = result["decode"]["cases"]
  result["summary"] = {
      "v2_cache_bytes_per_token": result["cache"]["models"]["deepseek_v2"]["bytes_per_token"],
      "mla_over_mha": result["cache"]["models"]["v2_mha"]["mla_over_this"],
      "mla_over_gqa8": result["cache"]["models"]["v2_gqa8"]["mla_over_this"],
      "cut_vs_67b_same_dtype": result["cache"]["cut_vs_67b_same_dtype"],
      "cut_vs_67b_6bit": result["cache"]["paper_cut_6bit"],
      "decode_tokens_per_s": {k: c["tokens_per_s"] for k, c in cases.items()},
  }
  common.write(result, args.out, plot(result))


if __name__ == "__main__":
  main(sys.argv[1:])
