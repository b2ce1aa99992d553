"""Train-step throughput and model-FLOPs utilisation (MFU) against this machine's peak.

MFU = (model FLOPs per token x tokens per second) / peak matmul FLOP/s, where
model FLOPs follow `dsv2_jax.model.flops` (6 x matmul params + attention, PaLM
convention) and the peak is a large square matmul timed in the same process, in
the same dtype (bf16 inputs accumulate in f32). Compared cases are interleaved and
repeated, because this CPU's speed drifts over minutes.

Shapes:
  reference  the Llama-like shape of issue 2: vocab 256, width 256, 4 layers, 4 heads,
             FFN 1024, sequence 256, batch 8 (SwiGLU, RMSNorm, RoPE, untied head).
  tiny       configs/tiny.py (the README's main job).

Peer (when importable): PyTorch + HF transformers' LlamaForCausalLM with the same
shape, AdamW and clipping, same FLOP formula and a torch-measured peak.

  python experiments/throughput.py --out docs/figures/throughput.json
  python experiments/throughput.py --quick --out /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
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

REFERENCE = dict(vocab_size=256, d_model=256, num_layers=4, num_heads=4, ffn_hidden=1024,
                 seq_len=256, batch_size=8)


def shape_config(shape: str, dtype: str) -> Any:
  if shape == "reference":
    c = config_lib.default_config()
    r = REFERENCE
    c.model.update(vocab_size=r["vocab_size"], d_model=r["d_model"], num_layers=r["num_layers"],
                   num_heads=r["num_heads"], ffn_hidden=r["ffn_hidden"], max_seq_len=r["seq_len"],
                   scan_unroll=r["num_layers"])  # The CPU setting of configs/tiny.py.
    c.data.update(seq_len=r["seq_len"], batch_size=r["batch_size"])
  else:
    c = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
  c.model.dtype = dtype
  c.train.update(warmup_steps=10, steps=10_000)
  config_lib.validate(c)
  return c


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def jax_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul (bf16 inputs accumulate in f32)."""
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), dt)
  b = jnp.asarray(np.random.RandomState(1).randn(n, n), dt)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  seconds = best_time(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2.0 * n ** 3 / seconds


def random_batch(config, mesh) -> dict[str, jax.Array]:
  """One batch of the config's shape: uniform random bytes, every token weighted."""
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.RandomState(0)
  return sharding.put_batch({
      "inputs": rng.randint(0, 256, (b, t)).astype(np.int32),
      "targets": rng.randint(0, 256, (b, t)).astype(np.int32),
      "weights": np.ones((b, t), np.float32)}, mesh)


class JaxStep:
  """Our jitted train step on random tokens; `run(k)` times k back-to-back steps."""

  def __init__(self, config):
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    model, tx = build_model(config.model), build_optimizer(config.train)
    self.state, shardings = create_train_state(model, tx, 0, config.data.seq_len, mesh)
    self.step = jit_train_step(model, tx, mesh, shardings)
    self.batch = random_batch(config, mesh)
    self.run(2)  # Compile and warm up.

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps (one host sync at the end)."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / steps


class TorchLlamaStep:
  """HF transformers LlamaForCausalLM + torch AdamW at the same shape (the peer)."""

  def __init__(self, config):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    m = config.model
    llama = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=False)
    llama._attn_implementation = "sdpa"  # pylint: disable=protected-access
    self.model = transformers.LlamaForCausalLM(llama).float().train()
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
    start = time.perf_counter()
    for _ in range(steps):
      loss = self._step()
    float(loss.detach())
    return (time.perf_counter() - start) / steps

  def peak_flops(self, n: int = 2048, repeats: int = 5) -> float:
    torch = self.torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / best_time(lambda: torch.mm(a, b), repeats)


def torch_available() -> bool:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON output file.")
  parser.add_argument("--shape", default="reference", choices=["reference", "tiny"])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=5, help="Interleaved rounds.")
  parser.add_argument("--steps", type=int, default=10, help="Steps timed per round.")
  parser.add_argument("--no_torch", action="store_true", help="Skip the PyTorch peer.")
  parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (~1 min).")
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats, args.steps = 2, 3

  cases: dict[str, tuple[Any, Callable[[], float], Any]] = {}
  for dtype in args.dtypes.split(","):
    config = shape_config(args.shape, dtype)
    cases[f"dsv2_jax/{dtype}"] = (JaxStep(config), lambda d=dtype: jax_peak_flops(d), config)
  if not args.no_torch and torch_available() and "float32" in args.dtypes:
    config = shape_config(args.shape, "float32")
    peer = TorchLlamaStep(config)  # Same shape; torch has no scan to unroll.
    cases["torch_hf_llama/float32"] = (peer, peer.peak_flops, config)

  samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
  for _ in range(args.repeats):  # Interleave every case in each round.
    for name, (runner, peak_fn, _) in cases.items():
      peak = peak_fn()
      samples[name].append((runner.run(args.steps), peak))

  records = []
  for name, (_, _, config) in cases.items():
    impl, dtype = name.split("/")
    tokens = config.data.batch_size * config.data.seq_len
    per_token = flops.train_flops_per_token(config.model, config.data.seq_len)
    mfus = [tokens * per_token / step / peak for step, peak in samples[name]]
    step_s = statistics.median(s for s, _ in samples[name])
    records.append({
        "impl": impl, "dtype": dtype, "shape": args.shape,
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
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"command": " ".join(["python", "experiments/throughput.py", *argv]),
               "records": records}, f, indent=2)


if __name__ == "__main__":
  main(sys.argv[1:])
