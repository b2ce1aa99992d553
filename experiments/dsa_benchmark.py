"""DSA vs dense attention: time, FLOPs and memory against sequence length, in one run.

Implementations, on the same random q/k/v (B = 1, N = 8 heads, H = 64; f32 unless --dtype):
  dense           XLA causal attention (`jax.nn.dot_product_attention`, implementation='xla')
  dense_chunked   the model's dense kernel (`dense_attention.causal_attention`): query
                  chunks that skip the masked blocks, hand-written backward
  dense_cudnn     the same with implementation='cudnn' (GPU only, --dtype bfloat16): cuDNN's
                  fused FlashAttention-class kernel; recorded as skipped elsewhere
  sliding_window  DSA with a global budget of 0 (our blocked local window, W = 32)
  dsa_fraction    DSA, W = 32, P = 32, global budget 15% of the length (the article's p)
  dsa_log         DSA, W = 32, P = 32, global budget 16 * log2(length)
  torch_sdpa      PyTorch's fused CPU attention (`scaled_dot_product_attention`, causal),
                  when torch is importable: what a user would pick instead.

Per (impl, n): forward and forward+backward wall time (best of --repeats, cases
interleaved), FLOPs (`flops`: executed matmul FLOPs counted analytically, since XLA's
cost analysis counts a loop body once; `compiled_flops`: XLA's own count), and
compiled temp memory of the forward (`temp_bytes`) and forward+backward
(`temp_bytes_fwd_bwd`). Both passes are compiled (which allocates nothing) before
either runs: a pass whose compiled memory exceeds --memory_fraction of the machine's
available memory is not run and is recorded as `fwd_skipped` / `fwd_bwd_skipped` with
that memory; passes above 2 GiB run in a child process so that running out of memory
cannot lose the run. Fitted
exponents (time ~ n^a over n >= 2048) and a log-log plot complete the output.

  python -m experiments.dsa_benchmark --out docs/figures/dsa_benchmark.json
  python -m experiments.dsa_benchmark --quick --out /tmp/dsa_quick.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.model import dense_attention, dsa
from experiments import common

B, N, H = 1, 8, 64
WINDOW, BLOCK = 32, 32
SPECS = {
    "sliding_window": dsa.DSASpec(WINDOW, BLOCK, "fixed", 0),
    "dsa_fraction": dsa.DSASpec(WINDOW, BLOCK, "fraction", 0.15),
    "dsa_log": dsa.DSASpec(WINDOW, BLOCK, "log", 16.0),
}
JAX_IMPLS = ("dense", "dense_chunked", "sliding_window", "dsa_fraction", "dsa_log")
# cuDNN's fused (FlashAttention-class) kernel, GPU only, bf16/f16 inputs: the attention
# the article advises, measured by experiments/accelerator_suite.sh.
GPU_IMPLS = ("dense_cudnn",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE = jnp.float32  # q, k, v dtype (--dtype).
ISOLATE_BYTES = 2 << 30


def attention_fn(impl: str) -> Callable:
  if impl in ("dense", "dense_cudnn"):
    kernel = "xla" if impl == "dense" else "cudnn"
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation=kernel)
  if impl == "dense_chunked":
    return dense_attention.causal_attention
  return functools.partial(dsa.dsa_attention, spec=SPECS[impl])


def compile_pair(impl: str, n: int):
  """Compiles (without running) the forward and the forward+backward at length n."""
  fn = attention_fn(impl)
  shape = jax.ShapeDtypeStruct((B, n, N, H), DTYPE)
  grad = jax.grad(lambda q, k, v: jnp.sum((fn(q, k, v) * q).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  return (jax.jit(fn).lower(shape, shape, shape).compile(),
          jax.jit(grad).lower(shape, shape, shape).compile())


def temp_bytes(compiled) -> int:
  return int(compiled.memory_analysis().temp_size_in_bytes)


def analytic_flops(impl: str, n: int) -> tuple[float, float]:
  """Executed matmul FLOPs (forward, forward+backward)."""
  if impl == "dense_chunked":  # Chunk i scores keys [0, end_i); no recompute backward.
    chunk = dense_attention.query_chunk(n)
    pairs = sum(end * (end - start) for start, end in dense_attention.chunk_bounds(n, chunk))
    fwd = 4.0 * B * N * pairs * H
    return fwd, 3.0 * fwd
  if impl in ("dense", "torch_sdpa", "dense_cudnn"):
    keys = n if impl == "dense" else (n + 1) / 2  # XLA:CPU computes every score.
    fwd = 4.0 * B * N * n * keys * H
    return fwd, 3.0 * fwd if impl == "dense" else 3.5 * fwd  # Flash recomputes QK^T.
  spec = SPECS[impl]
  tp = dsa.num_blocks(spec, n) * spec.block
  span = (1 + -(-(spec.window - 1) // spec.block)) * spec.block
  local = 4.0 * B * N * tp * span * H
  glob = 4.0 * B * N * tp * dsa.max_budget(spec, tp) * H
  return local + glob, 3.0 * local + 3.5 * glob  # The global VJP recomputes QK^T.


def inputs(n: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  return tuple(jnp.asarray(rng.randn(B, n, N, H), DTYPE) for _ in range(3))


class JaxCase:
  """Compiled forward and forward+backward of one implementation at one length."""

  def __init__(self, impl: str, n: int):
    self.fwd, self.fwd_bwd = compile_pair(impl, n)
    self.stats = {
        "temp_bytes": temp_bytes(self.fwd),
        "temp_bytes_fwd_bwd": temp_bytes(self.fwd_bwd),
        "compiled_flops": float(self.fwd.cost_analysis().get("flops", float("nan"))),
    }
    self.args = inputs(n)

  def time(self, which: str) -> float:
    fn = self.fwd if which == "fwd" else self.fwd_bwd
    return common.timed(lambda: fn(*self.args))


class TorchCase:
  """torch.nn.functional.scaled_dot_product_attention, causal, [B, N, T, H] layout."""

  def __init__(self, n: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    self.qkv = [torch.randn(B, N, n, H, generator=g, requires_grad=True) for _ in range(3)]
    self.stats = {"temp_bytes": None, "temp_bytes_fwd_bwd": None, "compiled_flops": None}

  def time(self, which: str) -> float:
    torch = self.torch
    q, k, v = self.qkv

    def run():  # Eager on CPU: done when it returns.
      if which == "fwd":
        with torch.no_grad():
          return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
      out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
      return torch.autograd.grad((out * q).sum(), (q, k, v))

    return common.timed(run)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 16 << 30


def measure(case, repeats: int, which: tuple[str, ...] = ("fwd", "fwd_bwd")) -> dict[str, float]:
  """Best-of-`repeats` times after one warm-up call, the `which` passes interleaved."""
  times = common.interleaved({w: functools.partial(case.time, w) for w in which}, repeats)
  return {f"{w}_ms": 1e3 * min(t) for w, t in times.items()}


def run_isolated(impl: str, n: int, repeats: int, which: tuple[str, ...]) -> dict[str, Any]:
  """Times one big case in a child process; a crash (e.g. out of memory) is recorded."""
  cmd = [sys.executable, "-m", "experiments.dsa_benchmark", "--single",
         f"{impl}:{n}:{'+'.join(which)}", "--repeats", str(repeats), "--out", "-",
         "--dtype", jnp.dtype(DTYPE).name]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO)
  if proc.returncode != 0:
    return {"skipped": f"child process failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip().splitlines()[-1:]}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_exponent(records: list[dict[str, Any]], impl: str, key: str, min_n: int) -> float | None:
  pts = [(r["seq_len"], r[key]) for r in records
         if r["impl"] == impl and r.get(key) and r["seq_len"] >= min_n]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def plot(records: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for ax, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms", "temp_bytes_fwd_bwd"),
                            ("forward (ms)", "forward + backward (ms)", "fwd+bwd temp memory (bytes)")):
    for impl in sorted({r["impl"] for r in records}):
      pts = sorted((r["seq_len"], r[key]) for r in records if r["impl"] == impl and r.get(key))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"Attention cost vs n (B={B}, N={N}, H={H}, {jnp.dtype(DTYPE).name}, "
               f"{jax.devices()[0].device_kind})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def single(spec: str, repeats: int) -> dict[str, Any]:
  """Runs `impl:n[:fwd+fwd_bwd]` in this process."""
  impl, n, *which = spec.split(":")
  which = tuple(which[0].split("+")) if which else ("fwd", "fwd_bwd")
  case = TorchCase(int(n)) if impl == "torch_sdpa" else JaxCase(impl, int(n))
  return {**case.stats, **measure(case, repeats, which)}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file ('-' for stdout).")
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory_fraction", type=float, default=0.8)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--impls", default=",".join(JAX_IMPLS) + ",torch_sdpa",
                      help="Comma-separated subset of implementations.")
  parser.add_argument("--quick", action="store_true", help="n in {512, 2048}, 1 repeat (< 2 min).")
  parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                      help="q/k/v dtype (dense_cudnn needs bfloat16).")
  parser.add_argument("--single", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  global DTYPE
  DTYPE = DTYPES[args.dtype]
  if args.single:
    print(json.dumps(single(args.single, args.repeats)))
    return
  if args.quick:
    args.lengths, args.repeats = "512,2048", 1

  impls = [i for i in args.impls.split(",")
           if i in JAX_IMPLS + GPU_IMPLS or (i == "torch_sdpa" and
                                             common.peer_available("torch")
                                             and not args.no_torch)]
  budget = args.memory_fraction * available_bytes()
  records = []
  for n in (int(x) for x in args.lengths.split(",")):
    for impl in impls:  # Interleaved: every impl at this n, then the next n.
      fwd_flops, fwd_bwd_flops = analytic_flops(impl, n)
      record: dict[str, Any] = {"impl": impl, "seq_len": n, "flops": fwd_flops,
                                "flops_fwd_bwd": fwd_bwd_flops}
      if impl in GPU_IMPLS and jax.default_backend() != "gpu":
        record["skipped"] = f"{impl} needs a GPU (backend: {jax.default_backend()})"
      elif impl == "torch_sdpa":
        record.update(single(f"{impl}:{n}", args.repeats) if n <= 8192 else
                      run_isolated(impl, n, args.repeats, ("fwd", "fwd_bwd")))
      else:
        # Compile both passes first (compiling allocates nothing); run only what fits.
        fwd, fwd_bwd = compile_pair(impl, n)
        needs = {"fwd": temp_bytes(fwd), "fwd_bwd": temp_bytes(fwd_bwd)}
        del fwd, fwd_bwd
        record.update(temp_bytes=needs["fwd"], temp_bytes_fwd_bwd=needs["fwd_bwd"])
        which = tuple(w for w, need in needs.items() if need <= budget)
        for w in needs:
          if w not in which:
            record[f"{w}_skipped"] = (f"compiled temp memory {needs[w] / 2**30:.1f} GiB > "
                                      f"{budget / 2**30:.1f} GiB available")
        if not which:
          record["skipped"] = record["fwd_skipped"]
        elif max(needs[w] for w in which) > ISOLATE_BYTES:
          record.update(run_isolated(impl, n, args.repeats, which))
        else:
          record.update(single(f"{impl}:{n}:{'+'.join(which)}", args.repeats))
      records.append(record)
      print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                        for k, v in record.items()}), flush=True)

  summary = {}
  for impl in impls:
    summary[impl] = {f"exponent_{key}": fit_exponent(records, impl, key, 2048)
                     for key in ("fwd_ms", "fwd_bwd_ms", "flops", "temp_bytes_fwd_bwd")}
  for n in sorted({r["seq_len"] for r in records}):
    by = {r["impl"]: r for r in records if r["seq_len"] == n}
    for impl in ("dsa_fraction", "dsa_log", "sliding_window", "dense_chunked"):
      for ref in ("dense", "dense_chunked", "torch_sdpa", "dense_cudnn"):
        if ref == impl:
          continue
        for key in ("fwd_ms", "fwd_bwd_ms", "temp_bytes_fwd_bwd"):
          a, b = by.get(impl, {}).get(key), by.get(ref, {}).get(key)
          if a and b:
            summary.setdefault("ratios", {}).setdefault(f"{ref}/{impl}", {})[f"{key}@{n}"] = b / a
  result = {"command": common.command("experiments.dsa_benchmark", argv),
            "shape": {"batch": B, "heads": N, "head_dim": H, "window": WINDOW, "block": BLOCK,
                      "dtype": args.dtype},
            "device": jax.devices()[0].device_kind, "records": records, "summary": summary}
  common.write(result, args.out, lambda path: plot(records, path))


if __name__ == "__main__":
  main(sys.argv[1:])
