"""GMoE layer cost: our dropless dispatch against a dense FFN, the article's loop and ragged_dot.

One MoE layer (SwiGLU experts, k = 4, 2-layer MLP gate) on X tokens of width D,
forward + backward (gradients for the tokens and every weight), f32, in one run:
  moe_tiled       ours: router + sort by expert + tiled grouped FFN (CPU default path),
                  tiles from `--max_tile` rows halving down to the padding unit
  moe_tiled_single  the same with one tile size (the padding unit): the ablation of the
                  tile classes
  moe_ragged_dot  ours with `jax.lax.ragged_dot` as the grouped matmul (GPU/TPU default)
  dense_ffn       a dense SwiGLU FFN of hidden k x expert_hidden: the same active parameters
  oracle          the article's `gated_routing` (every expert on every token, masked)
Per record: best-of-`--repeats` wall time (cases interleaved), FLOPs, compiled temp memory.
`flops` is the executed matmul FLOPs of forward + backward, counted analytically from the
routing actually taken (XLA's cost analysis counts a loop body once, and on CPU a
ragged_dot expands to a dense matmul over every group); `compiled_flops` is XLA's own
count. `active_flops` is what the active parameters cost: 3 x 2 x X x (k x 3 D F + gate).

  python -m experiments.moe_benchmark --out docs/figures/moe_benchmark.json
  python -m experiments.moe_benchmark --quick --out /tmp/moe_quick.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.model import moe_dispatch
from dsv2_jax.model.moe import load_balancing_loss
from dsv2_jax.model.moe_reference import gated_routing
from experiments import common

IMPLS = ("moe_tiled", "moe_tiled_single", "moe_ragged_dot", "dense_ffn", "oracle")


def make_inputs(x_tokens: int, d: int, f: int, e: int, gh: int, k: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  arr = lambda *shape, scale=1.0: jnp.asarray(rng.randn(*shape) * scale, jnp.float32)  # noqa: E731
  return {
      "x": arr(x_tokens, d),
      "gate_in": arr(d, gh, scale=d ** -0.5), "gate_out": arr(gh, e, scale=gh ** -0.5),
      "w_in": arr(e, d, 2, f, scale=d ** -0.5), "w_out": arr(e, f, d, scale=f ** -0.5),
      "dense_in": arr(2, d, k * f, scale=d ** -0.5),
      "dense_out": arr(k * f, d, scale=(k * f) ** -0.5),
  }


def route(p, k):
  """The 2-layer MLP gate: probs [X, E], top-k indices and weights (raw, as the article)."""
  h = jax.nn.gelu(p["x"] @ p["gate_in"])
  probs = jax.nn.softmax(h @ p["gate_out"], axis=-1)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(probs), k)
  return probs, idx, jnp.take_along_axis(probs, idx, axis=-1)


def layer_fn(impl: str, k: int, tile: int = 0, max_tile: int = moe_dispatch.MAX_TILE
             ) -> Callable[[dict[str, jax.Array]], jax.Array]:
  """impl -> f(params) = a scalar loss of the layer's output (for forward + backward)."""
  probe = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731

  def moe(path, max_tile):
    def f(p):
      probs, idx, weights = route(p, k)
      y, _ = moe_dispatch.routed_ffn(p["x"], idx, weights, p["w_in"], p["w_out"],
                                     act=jax.nn.silu, gated=True, dtype=jnp.float32,
                                     path=path, tile=tile, max_tile=max_tile)
      return probe(y) + 0.01 * load_balancing_loss(probs, idx, p["w_out"].shape[0])
    return f

  def dense(p):
    hidden = jax.nn.silu(p["x"] @ p["dense_in"][0]) * (p["x"] @ p["dense_in"][1])
    return probe(hidden @ p["dense_out"])

  def oracle(p):
    probs, idx, weights = route(p, k)
    y = gated_routing(p["x"], idx, weights, p["w_in"], p["w_out"], act=jax.nn.silu, gated=True)
    return probe(y) + 0.01 * load_balancing_loss(probs, idx, p["w_out"].shape[0])

  return {"moe_tiled": moe("tiled", max_tile), "moe_tiled_single": moe("tiled", 0),
          "moe_ragged_dot": moe("ragged_dot", 0), "dense_ffn": dense, "oracle": oracle}[impl]


def analytic_flops(impl: str, p, k: int, executed_rows: int) -> float:
  """Executed matmul FLOPs of forward + backward (3 x forward)."""
  x_tokens, d = p["x"].shape
  e, _, _, f = p["w_in"].shape  # [E, D, 2, F]
  gh = p["gate_in"].shape[1]
  gate = 2 * x_tokens * (d * gh + gh * e)
  per_row = 2 * 3 * d * f  # SwiGLU expert: gate, up, down.
  rows = {"moe_tiled": executed_rows, "moe_tiled_single": executed_rows, "moe_ragged_dot": e * x_tokens * k,  # CPU: dense per group.
          "dense_ffn": x_tokens * k, "oracle": x_tokens * e}[impl]
  return 3.0 * (rows * per_row + (0 if impl == "dense_ffn" else gate))


def executed_rows(p, k: int, tile: int) -> int:
  """Rows the tiles cover (the same for every max_tile: padding depends on `tile` only)."""
  _, idx, _ = route(p, k)
  e = p["w_out"].shape[0]
  plan = moe_dispatch.plan_dispatch(idx, e, tile or moe_dispatch.auto_tile(idx.size, e))
  return int(plan.executed_rows)


class Case:
  def __init__(self, impl: str, p, k: int, tile: int, max_tile: int):
    grad = jax.jit(jax.grad(layer_fn(impl, k, tile, max_tile)))
    self.compiled = grad.lower(p).compile()
    self.p = p
    self.stats = {
        "temp_bytes": int(self.compiled.memory_analysis().temp_size_in_bytes),
        "compiled_flops": float(self.compiled.cost_analysis().get("flops", float("nan"))),
    }

  def time(self) -> float:
    return common.timed(lambda: self.compiled(self.p))


def run(args) -> dict[str, Any]:
  records = []
  for e in (int(v) for v in args.experts.split(",")):
    p = make_inputs(args.tokens, args.d_model, args.expert_hidden, e, args.gate_hidden, args.top_k)
    rows = executed_rows(p, args.top_k, args.tile)
    impls = [i for i in args.impls.split(",") if not (i == "oracle" and e > args.oracle_max_e)]
    cases = {impl: Case(impl, p, args.top_k, args.tile, args.max_tile) for impl in impls}
    times = common.interleaved({impl: case.time for impl, case in cases.items()}, args.repeats)
    active = analytic_flops("dense_ffn", p, args.top_k, rows) + 3.0 * 2 * args.tokens * (
        args.d_model * args.gate_hidden + args.gate_hidden * e)
    for impl, case in cases.items():
      record = {"impl": impl, "num_experts": e, "top_k": args.top_k, "tokens": args.tokens,
                "d_model": args.d_model, "expert_hidden": args.expert_hidden,
                "fwd_bwd_ms": 1e3 * min(times[impl]),
                "flops": analytic_flops(impl, p, args.top_k, rows),
                "active_flops": active, **case.stats}
      if impl.startswith("moe_tiled"):
        tile = args.tile or moe_dispatch.auto_tile(args.tokens * args.top_k, e)
        record.update(executed_rows=rows, tile_rows=tile,
                      max_tile_rows=max(tile, args.max_tile) if impl == "moe_tiled" else tile)
      records.append(record)
      print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in record.items()}), flush=True)
  summary: dict[str, Any] = {}
  for e in sorted({r["num_experts"] for r in records}):
    by = {r["impl"]: r for r in records if r["num_experts"] == e}
    s = summary[f"E={e}"] = {}
    ours = by.get("moe_tiled")
    if ours:
      s["executed_over_active_flops"] = ours["flops"] / ours["active_flops"]
      for ref in ("dense_ffn", "oracle", "moe_ragged_dot", "moe_tiled_single"):
        if ref in by:
          s[f"time_moe_tiled_over_{ref}"] = ours["fwd_bwd_ms"] / by[ref]["fwd_bwd_ms"]
  return {"device": jax.devices()[0].device_kind, "records": records, "summary": summary}


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = result["records"]
  experts = sorted({r["num_experts"] for r in records})
  impls = [i for i in IMPLS if any(r["impl"] == i for r in records)]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  width = 0.8 / len(impls)
  for j, impl in enumerate(impls):
    vals = [next((r["fwd_bwd_ms"] for r in records
                  if r["impl"] == impl and r["num_experts"] == e), 0) for e in experts]
    ax.bar(np.arange(len(experts)) + j * width, vals, width, label=impl)
  ax.set_xticks(np.arange(len(experts)) + 0.4 - width / 2, [f"E={e}" for e in experts])
  ax.set_yscale("log")
  ax.set_ylabel("forward + backward (ms)")
  ax.set_title(f"MoE layer, k={records[0]['top_k']}, {records[0]['tokens']} tokens, "
               f"D={records[0]['d_model']}, F={records[0]['expert_hidden']} ({result['device']})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file ('-' for stdout).")
  parser.add_argument("--experts", default="8,32,128")
  parser.add_argument("--top_k", type=int, default=4)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--expert_hidden", type=int, default=256)
  parser.add_argument("--gate_hidden", type=int, default=256)
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--tile", type=int, default=0,
                      help="Tiled path padding unit, its smallest tile (0: auto).")
  parser.add_argument("--max_tile", type=int, default=moe_dispatch.MAX_TILE,
                      help="Tiled path largest tile.")
  parser.add_argument("--oracle_max_e", type=int, default=128,
                      help="Skip the oracle above this many experts (it costs E/k x).")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="1024 tokens, 2 repeats (< 2 min).")
  args = parser.parse_args(argv)
  if args.quick:
    args.tokens, args.repeats, args.experts = 1024, 2, "8,32"
  result = {"command": common.command("experiments.moe_benchmark", argv), **run(args)}
  common.write(result, args.out, lambda path: plot(result, path))


if __name__ == "__main__":
  main(sys.argv[1:])
