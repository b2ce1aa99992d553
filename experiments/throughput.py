"""Train-step throughput and model-FLOPs utilisation (MFU) against this machine's peak.

MFU = (model FLOPs per token x tokens per second) / peak matmul FLOP/s, where
model FLOPs follow `dsv2_jax.model.flops` (6 x matmul params + attention, PaLM
convention) and the peak is a large square matmul timed in the same process, in
the same dtype (bf16 inputs accumulate in f32). Compared cases are interleaved and
repeated, because this CPU's speed drifts over minutes.

The model is `--config FILE[:args]` (plus `--config.a.b=v` overrides). The default is the
Llama-like reference shape (docs/results.md section 2), configs/tiny.py at width 256:
4 layers, 4 heads, FFN 1024, sequence 256, batch 8 (SwiGLU, RMSNorm, RoPE, untied head);
`--config configs/tiny.py` measures the README's main job.

Peer (when importable): PyTorch + HF transformers' LlamaForCausalLM with the same
shape, AdamW and clipping, same FLOP formula and a torch-measured peak.

  python -m experiments.throughput --out docs/figures/throughput.json
  python -m experiments.throughput --config configs/tiny.py --out /tmp/throughput_tiny.json
  python -m experiments.throughput --quick --out /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax.model import flops
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.state import create_train_state
from dsv2_jax.train.step import jit_train_step
from experiments import common

REFERENCE = "configs/tiny.py:width=256,seq_len=256,batch_size=8"  # The reference shape.


def with_dtype(config, dtype: str):
  """The config with compute dtype `dtype`, its LR schedule past warmup (steps time alike)."""
  c = config.copy_and_resolve_references()
  c.model.dtype = dtype
  c.train.update(warmup_steps=10, steps=10_000)
  config_lib.validate(c)
  return c


def jax_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul (bf16 inputs accumulate in f32)."""
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), dt)
  b = jnp.asarray(np.random.RandomState(1).randn(n, n), dt)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  seconds = common.best_time(lambda: matmul(a, b), repeats)
  return 2.0 * n ** 3 / seconds


class JaxStep:
  """Our jitted train step on random tokens; `run(k)` times k back-to-back steps."""

  def __init__(self, config):
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    model, tx = build_model(config.model), build_optimizer(config.train)
    self.state, shardings = create_train_state(model, tx, 0, config.data.seq_len, mesh)
    self.step = jit_train_step(model, tx, mesh, shardings)
    self.batch = common.random_batch(config, mesh)
    self.run(2)  # Compile and warm up.

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps (one host sync at the end)."""

    def steps_in_a_row():
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.batch)
      return self.state, metrics

    return common.timed(steps_in_a_row) / steps


class TorchLlamaStep:
  """HF transformers LlamaForCausalLM + torch AdamW at the same shape (the peer)."""

  def __init__(self, config):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    self.model = common.hf_llama(config.model).train()
    t = config.train
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(t.b1, t.b2),
                                 eps=t.eps, weight_decay=t.weight_decay)
    b, s = config.data.batch_size, config.data.seq_len
    self.inputs = torch.randint(0, 256, (b, s))
    self.targets = torch.randint(0, 256, (b, s))
    self.clip = t.grad_clip_norm
    self.run(2)

  def _step(self):
    logits = self.model(input_ids=self.inputs).logits
    loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  self.targets.reshape(-1))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    return loss

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps (torch on CPU runs eagerly)."""
    return common.timed(lambda: [self._step() for _ in range(steps)][-1].item()) / steps

  def peak_flops(self, n: int = 2048, repeats: int = 5) -> float:
    torch = self.torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / common.best_time(lambda: torch.mm(a, b), repeats)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON output file ('-' for stdout).")
  common.add_config_flag(parser, REFERENCE)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=5, help="Interleaved rounds.")
  parser.add_argument("--steps", type=int, default=10, help="Steps timed per round.")
  parser.add_argument("--no_torch", action="store_true", help="Skip the PyTorch peer.")
  parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (~1 min).")
  args = common.parse_args(parser, argv)
  if args.quick:
    args.repeats, args.steps = 2, 3
  base = common.load_config(args.config, args.overrides["config"])

  cases: dict[str, tuple[Any, Callable[[], float], Any]] = {}
  for dtype in args.dtypes.split(","):
    config = with_dtype(base, dtype)
    cases[f"dsv2_jax/{dtype}"] = (JaxStep(config), lambda d=dtype: jax_peak_flops(d), config)
  if (not args.no_torch and common.peer_available("torch", "transformers")
      and "float32" in args.dtypes):
    config = with_dtype(base, "float32")
    peer = TorchLlamaStep(config)  # Same shape; torch has no scan to unroll.
    cases["torch_hf_llama/float32"] = (peer, peer.peak_flops, config)

  def peak_then_steps(runner, peak_fn) -> tuple[float, float]:
    peak = peak_fn()  # Measured beside each case's steps: the peak drifts with the machine.
    return runner.run(args.steps), peak

  samples = common.interleaved(  # Cases compiled and warmed up above.
      {name: functools.partial(peak_then_steps, runner, peak_fn)
       for name, (runner, peak_fn, _) in cases.items()}, args.repeats, warmup=False)

  records = []
  for name, (_, _, config) in cases.items():
    impl, dtype = name.split("/")
    tokens = config.data.batch_size * config.data.seq_len
    per_token = flops.train_flops_per_token(config.model, config.data.seq_len)
    mfus = [tokens * per_token / step / peak for step, peak in samples[name]]
    step_s = statistics.median(s for s, _ in samples[name])
    records.append({
        "impl": impl, "dtype": dtype, "config": args.config,
        "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_token": per_token,
        "peak_flops": statistics.median(p for _, p in samples[name]),
        "mfu": statistics.median(mfus),
        "mfu_per_round": mfus,
        "backend": jax.default_backend() if impl == "dsv2_jax" else "torch-cpu",
        "device": str(jax.devices()[0].device_kind),
        "scan_unroll": config.model.scan_unroll if impl == "dsv2_jax" else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    })
  for r in records:
    print(f"{r['impl']:>16} {r['dtype']:>8}: {r['step_ms']:8.1f} ms/step  "
          f"{r['tokens_per_s']:9,.0f} tok/s  peak {r['peak_flops'] / 1e9:7.1f} GFLOP/s  "
          f"MFU {100 * r['mfu']:5.1f}%")
  common.write({"command": common.command("experiments.throughput", argv),
                "config_overrides": args.overrides["config"], "records": records}, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
