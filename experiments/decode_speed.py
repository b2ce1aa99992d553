"""Decode speed: tokens/s of our jitted KV-cache sampler against HF transformers' `generate`.

What: greedy generation of `--new_tokens` tokens after a `--prompt_len`-token prompt, for
every batch size of `--batches`, with `--config`'s model (default configs/tiny.py: width
128, 4 layers, 4 heads, SwiGLU, RMSNorm, RoPE, untied head, byte vocabulary 258) and each
ablation-argument set of `--variants` (default: as given, and width=256). Random init on
both sides: greedy decoding costs the same whatever the weights.

How, per case (same shape on both sides, one process, CPU):
  dsv2_jax   `dsv2_jax.infer.generate.generate` (prefill, then a `lax.scan` of one-token
             decode steps on a cache of prompt + new slots), temperature 0. Lowered and
             compiled once before timing (`compile_s`); the timed call is the compiled
             program, waited for with block_until_ready.
  hf_llama   transformers' LlamaForCausalLM of the same shape (parameter counts are
             recorded and must match), `generate(do_sample=False, use_cache=True,
             min_new_tokens=max_new_tokens)` under torch.inference_mode, once per torch
             thread count of `--torch_threads` (case `hf_llama_tN`; default 1 and the
             machine's cores). min_new_tokens suppresses EOS, so every call emits exactly
             new_tokens tokens per row (checked).
Tokens/s = batch x new_tokens / seconds of one whole call (prefill included on both
sides). Cases are interleaved round by round (`common.interleaved`, after one warm-up
call each) and repeated `--rounds` times; median and best tokens/s and the ratio
ours / HF (of medians, against the fastest thread count) are recorded, with the machine
(CPU model, avx512 / amx) and the load average. Torch's OpenMP threads collapse when
another process holds the cores (a 2-thread team waits at every barrier for a descheduled
thread: measured 10-100x slower at load 2 on 2 cores, while 1 thread is not): hence
both counts by default, and the ratio against the faster. XLA's thread pool degrades
gracefully.

  python -m experiments.decode_speed --out docs/figures/decode_speed.json
  python -m experiments.decode_speed --config configs/tiny.py --variants ';width=256' \
      --batches 1,8 --prompt_len 64 --new_tokens 256 --rounds 5 --out /tmp/decode_speed.json
  python -m experiments.decode_speed --quick --out /tmp/decode_speed.json

Results: docs/figures/decode_speed.json (+ .png); reported in docs/results.md, section on
long context / decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsv2_jax.infer.generate import generate
from dsv2_jax.model.transformer import build_model
from experiments import common



def prompt_tokens(batch: int, length: int) -> np.ndarray:
  """The shared prompt: int32 [B, T] uniform random bytes (seed 0)."""
  return np.random.RandomState(0).randint(0, 256, (batch, length)).astype(np.int32)


class JaxDecode:
  """Our jitted sampler at one shape; `tokens_per_s()` times one compiled call."""

  def __init__(self, model_config: ml_collections.ConfigDict, batch: int, prompt_len: int,
               new_tokens: int):
    self.model = build_model(model_config)
    self.prompt = jnp.asarray(prompt_tokens(batch, prompt_len))  # [B, T]
    self.params = jax.jit(lambda: nn.meta.unbox(  # Plain arrays, no sharding boxes.
        self.model.init(jax.random.PRNGKey(0), self.prompt))["params"])()
    self.num_params = int(sum(p.size for p in jax.tree.leaves(self.params)))
    self.rng = jax.random.PRNGKey(0)
    self.tokens = batch * new_tokens
    start = time.perf_counter()
    self.compiled = generate.lower(self.model, self.params, self.prompt, self.rng,
                                   max_new_tokens=new_tokens, temperature=0.0,
                                   top_k=0).compile()
    self.compile_s = time.perf_counter() - start
    out = jax.block_until_ready(self.compiled(self.params, self.prompt, self.rng))
    assert out.shape == (batch, new_tokens), out.shape

  def tokens_per_s(self) -> float:
    return self.tokens / common.timed(lambda: self.compiled(self.params, self.prompt,
                                                            self.rng))


class HFDecode:
  """HF `generate` at the same shape: greedy, KV cache, exactly new_tokens per row."""

  def __init__(self, model_config: ml_collections.ConfigDict, batch: int, prompt_len: int,
               new_tokens: int, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.threads = threads
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    self.model = common.hf_llama(model_config).eval()
    self.num_params = int(sum(p.numel() for p in self.model.parameters()))
    self.prompt = torch.from_numpy(prompt_tokens(batch, prompt_len)).long()  # [B, T]
    self.mask = torch.ones_like(self.prompt)
    self.new_tokens = new_tokens
    self.tokens = batch * new_tokens
    start = time.perf_counter()
    out = self._generate()
    self.first_call_s = time.perf_counter() - start
    assert tuple(out.shape) == (batch, prompt_len + new_tokens), tuple(out.shape)

  def _generate(self):
    self.torch.set_num_threads(self.threads)  # A process-wide setting: cases interleave.
    with self.torch.inference_mode():
      return self.model.generate(
          self.prompt, attention_mask=self.mask, max_new_tokens=self.new_tokens,
          min_new_tokens=self.new_tokens, do_sample=False, use_cache=True,
          pad_token_id=0, num_beams=1)

  def tokens_per_s(self) -> float:
    start = time.perf_counter()
    self._generate()  # Torch on CPU runs eagerly: the call returns when it is done.
    return self.tokens / (time.perf_counter() - start)


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = list(dict.fromkeys((r["variant"], r["batch"]) for r in result["records"]))
  by = {(r["variant"], r["batch"], r["impl"]): r for r in result["records"]}
  impls = list(dict.fromkeys(r["impl"] for r in result["records"]))
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  width = 0.8 / len(impls)
  x = np.arange(len(groups))
  for j, impl in enumerate(impls):
    recs = [by.get((v, b, impl)) for v, b in groups]
    ax.bar(x + j * width, [r["tokens_per_s"] if r else 0 for r in recs], width, label=impl)
    ax.scatter(x + j * width, [r["best_tokens_per_s"] if r else 0 for r in recs],
               marker="_", color="k", zorder=3)
  for i, (v, b) in enumerate(groups):
    ours = by.get((v, b, "dsv2_jax"), {})
    if "ratio_vs_hf" in ours:  # Above our bar: ours / the fastest HF case.
      ax.annotate(f"{ours['ratio_vs_hf']:.2f}x HF", (x[i], ours["best_tokens_per_s"]),
                  xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
  ax.set_xticks(x + 0.4 - width / 2, [f"{v or 'base'}\nB={b}" for v, b in groups])
  ax.set_yscale("log")
  ax.set_ylabel("tokens/s (bars: median; ticks: best)")
  ax.set_title(f"Greedy decode, prompt {result['prompt_len']} + {result['new_tokens']} new, "
               f"{result['config']} ({result['machine']['cpu'][:40]})", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON output file ('-' for stdout).")
  common.add_config_flag(parser, "configs/tiny.py")
  parser.add_argument("--variants", default=";width=256",
                      help="';'-separated ablation-argument sets, each appended to --config "
                           "(common.with_args; '' = the config as given).")
  parser.add_argument("--batches", default="1,8", help="Batch sizes B, comma-separated.")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5, help="Interleaved timed rounds.")
  parser.add_argument("--torch_threads", default="1,0",
                      help="HF peer's torch thread counts, comma-separated (0 = the cores).")
  parser.add_argument("--no_hf", action="store_true", help="Skip the HF transformers peer.")
  parser.add_argument("--quick", action="store_true",
                      help="Smoke run (< 20 s): first variant, B=1, 8 + 8 tokens, 2 rounds.")
  args = common.parse_args(parser, argv)
  load_at_start = list(os.getloadavg())  # Other processes on the cores skew everything.
  variants = args.variants.split(";")
  batches = [int(b) for b in args.batches.split(",")]
  if args.quick:
    variants, batches = variants[:1], batches[:1]
    args.prompt_len, args.new_tokens, args.rounds = 8, 8, 2
  threads = list(dict.fromkeys(int(n) or os.cpu_count() or 1
                               for n in args.torch_threads.split(",")))
  with_hf = not args.no_hf and common.peer_available("torch", "transformers")
  if not with_hf:
    print("HF peer skipped (--no_hf, or torch / transformers not importable).")

  cases: dict[tuple[str, int, str], Any] = {}
  for variant in variants:
    config = common.load_config(common.with_args(args.config, variant),
                                args.overrides["config"])
    for batch in batches:
      shape = (config.model, batch, args.prompt_len, args.new_tokens)
      cases[(variant, batch, "dsv2_jax")] = JaxDecode(*shape)
      print(f"{variant or 'base'} B={batch}: compiled in "
            f"{cases[(variant, batch, 'dsv2_jax')].compile_s:.1f} s", flush=True)
      for n in threads if with_hf else ():
        cases[(variant, batch, f"hf_llama_t{n}")] = HFDecode(*shape, n)
  samples = common.interleaved({key: case.tokens_per_s for key, case in cases.items()},
                               args.rounds)

  records = []
  for (variant, batch, impl), case in cases.items():
    records.append({
        "impl": impl, "variant": variant, "config": common.with_args(args.config, variant),
        "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "num_params": case.num_params,
        "tokens_per_s": statistics.median(samples[(variant, batch, impl)]),
        "best_tokens_per_s": max(samples[(variant, batch, impl)]),
        "tokens_per_s_per_round": samples[(variant, batch, impl)],
        "compile_s": getattr(case, "compile_s", None),
        "first_call_s": getattr(case, "first_call_s", None),
        "torch_threads": getattr(case, "threads", None),
        "backend": jax.default_backend() if impl == "dsv2_jax" else "torch-cpu",
    })
  by = {(r["variant"], r["batch"], r["impl"]): r for r in records}
  summary = {}
  for r in records:
    peers = [by[(r["variant"], r["batch"], f"hf_llama_t{n}")] for n in threads
             if (r["variant"], r["batch"], f"hf_llama_t{n}") in by]
    if r["impl"] == "dsv2_jax" and peers:
      hf = max(peers, key=lambda p: p["tokens_per_s"])  # The fastest thread count.
      r["ratio_vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
      r["ratio_vs_hf_per_threads"] = {p["torch_threads"]: r["tokens_per_s"] / p["tokens_per_s"]
                                      for p in peers}
      r["same_num_params"] = all(r["num_params"] == p["num_params"] for p in peers)
      summary[f"{r['variant'] or 'base'}/B={r['batch']}"] = {
          "dsv2_jax_tokens_per_s": round(r["tokens_per_s"], 1),
          "hf_tokens_per_s": round(hf["tokens_per_s"], 1),
          "hf_torch_threads": hf["torch_threads"],
          "ratio_ours_over_hf": round(r["ratio_vs_hf"], 2),
          "compile_s": round(r["compile_s"], 1)}
      if not r["same_num_params"]:
        print(f"WARNING: parameter counts differ: {r['num_params']} vs "
              f"{[p['num_params'] for p in peers]}")
  for r in records:
    print(f"{r['variant'] or 'base':>10} B={r['batch']:<2} {r['impl']:>12}: "
          f"median {r['tokens_per_s']:9,.0f} tok/s  best {r['best_tokens_per_s']:9,.0f}"
          + (f"  ours/HF {r['ratio_vs_hf']:.2f}x" if "ratio_vs_hf" in r else ""))
  result = {"command": common.command("experiments.decode_speed", argv),
            "config": args.config, "config_overrides": args.overrides["config"],
            "variants": variants, "batches": batches, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "rounds": args.rounds,
            "torch_threads": threads if with_hf else [],
            "load_average_1_5_15min": {"start": load_at_start, "end": list(os.getloadavg())},
            "machine": common.machine(), "records": records, "summary": summary}
  common.write(result, args.out, lambda path: plot(result, path))


if __name__ == "__main__":
  main(sys.argv[1:])
