"""What every experiment shares: config loading, peers, timing, the machine, the JSON report.

Run experiments as modules from the repository root, e.g.
  python -m experiments.throughput --out runs/throughput.json
  python -m experiments.moe_quality --config configs/tiny.py:steps=200 --config.seed=1 --out ...

- Configs: `--config FILE[:args]` plus `--config.a.b=v` overrides, parsed exactly as by
  `python -m dsv2_jax train` (ml_collections' config_flags); `load_config` is the one way an
  experiment reads a config file, `with_args` appends ablation arguments to a spec.
- Peers: `peer_available('torch', 'transformers')`.
- Timing: `timed` (one call, waiting for JAX's outputs), `best_time` (warm-up, then the best
  of n), `interleaved` (compared cases run in turn each round, because a CPU's speed drifts),
  on `random_batch` inputs of a config's shape.
- The machine: `machine()` (CPU model and its avx512 / amx flags, cores, backend, versions,
  the host-memory setting of `dsv2_jax.host_memory`), recorded in every result by `write`.
- `write(result, out, plot)`: the JSON, its plot beside it (skipped with one line when
  matplotlib, the `bench` extra, is missing), the summary on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from dsv2_jax import config as config_lib
from dsv2_jax import host_memory
from dsv2_jax.parallel import sharding

# Like the CLI: XLA:CPU's buffers reuse freed host memory instead of page-faulting
# fresh pages every call (dsv2_jax/host_memory.py); recorded as `malloc` in `machine()`.
MALLOC = "keep" if host_memory.keep_freed_memory() else "system"

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- configs -----------------------------------------------------------------------------

def with_args(spec: str, *args: str) -> str:
  """Appends ablation arguments to a config spec: ('configs/tiny.py:steps=9', 'moe=8x2')
  -> 'configs/tiny.py:steps=9,moe=8x2'. Later arguments win over earlier ones."""
  args = tuple(a for a in args if a)
  if not args:
    return spec
  return spec + ("," if ":" in spec else ":") + ",".join(args)


def load_config(spec: str, overrides: Sequence[str] = (), *, name: str = "config",
                validate: bool = True) -> ml_collections.ConfigDict:
  """`get_config(args)` of `FILE[:args]`, then `--NAME.a.b=v` overrides, as the CLI does.

  A relative FILE is read from the working directory, else from the repository root.
  """
  path, sep, args = spec.partition(":")
  if not os.path.exists(path) and (REPO / path).exists():
    spec = str(REPO / path) + sep + args
  argv = ["experiment", f"--{name}={spec}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(name, None, "Config file.", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values[name].value
  if validate:
    config_lib.validate(config)
  return config


def add_config_flag(parser: argparse.ArgumentParser, default: str, name: str = "config",
                    help_text: str = "") -> None:
  """Adds `--NAME FILE[:args]`; `parse_args` collects its `--NAME.a.b=v` overrides."""
  parser.add_argument(f"--{name}", default=default, metavar="FILE[:args]",
                      help=(help_text + " " if help_text else "") +
                      f"Config file with ablation arguments (default: {default}); "
                      f"--{name}.a.b=v overrides a field.")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str],
               config_names: Sequence[str] = ("config",)) -> argparse.Namespace:
  """`parser.parse_args`, keeping `--NAME.a.b=v` overrides in `args.overrides[NAME]`."""
  args, rest = parser.parse_known_args(argv)
  args.overrides = {name: [] for name in config_names}
  for arg in rest:
    name = arg.lstrip("-").split(".", 1)[0]
    if name not in args.overrides or "." not in arg or "=" not in arg:
      parser.error(f"unrecognized argument {arg!r} (config overrides take the form "
                   f"--{config_names[0]}.a.b=VALUE)")
    args.overrides[name].append(arg)
  return args


# --- peers -------------------------------------------------------------------------------

def peer_available(*modules: str) -> bool:
  """True when every module imports (an optional peer such as torch or transformers)."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError:
      return False
  return True


def hf_llama(model_config: ml_collections.ConfigDict) -> Any:
  """The peer model: transformers' LlamaForCausalLM of `model_config`'s shape (f32, sdpa).

  SwiGLU, RMSNorm, RoPE, no biases, like our default; the caller sets train/eval mode.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  m = model_config
  llama = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_hidden,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=m.max_seq_len,
      rms_norm_eps=m.norm_eps, rope_theta=m.rope_max_wavelength,
      tie_word_embeddings=m.tie_embeddings)
  llama._attn_implementation = "sdpa"  # pylint: disable=protected-access
  return transformers.LlamaForCausalLM(llama).float()


# --- timing ------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> float:
  """Seconds of one call of `fn`, waiting for the JAX arrays it returns."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """Best of `repeats` timed calls of `fn`, after one warm-up call."""
  fn()
  return min(timed(fn) for _ in range(repeats))


def interleaved(cases: Mapping[Hashable, Callable[[], float]], rounds: int,
                warmup: bool = True) -> dict[Hashable, list[float]]:
  """Runs every case once per round, in turn; each call returns its own measurement.

  Interleaving puts the compared cases under the same drift of the machine's speed.
  Returns the `rounds` measurements of each case (after one warm-up call each).
  """
  if warmup:
    for case in cases.values():
      case()
  samples: dict[Hashable, list[float]] = {name: [] for name in cases}
  for _ in range(rounds):
    for name, case in cases.items():
      samples[name].append(case())
  return samples


def random_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.Array]:
  """One batch of the config's shape on `mesh`: uniform random bytes, every token weighted."""
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.RandomState(0)
  return sharding.put_batch({
      "inputs": rng.randint(0, 256, (b, t)).astype(np.int32),
      "targets": rng.randint(0, 256, (b, t)).astype(np.int32),
      "weights": np.ones((b, t), np.float32)}, mesh)


# --- the machine -------------------------------------------------------------------------

def cpu_info() -> dict[str, Any]:
  """The CPU model name and whether it has avx512 / amx (from /proc/cpuinfo on Linux)."""
  model, cpu_flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key in ("flags", "Features") and not cpu_flags:
          cpu_flags = set(value.split())
  except OSError:
    pass
  return {"cpu": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "avx512": any(f.startswith("avx512") for f in cpu_flags),
          "amx": any(f.startswith("amx") for f in cpu_flags)}


def machine() -> dict[str, Any]:
  """What a result was measured on: CPU, JAX backend and device kind, versions."""
  return {**cpu_info(), "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
          "python": platform.python_version(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc": MALLOC}


def command(module: str, argv: Sequence[str]) -> str:
  """The command line that reproduces a run: `python -m experiments.X ARGS`."""
  return shlex.join(["python", "-m", module, *argv])


def chain_parser(doc: str, workdir: str) -> argparse.ArgumentParser:
  """Flags of an experiment that trains a chain of runs: --out (the JSON), --workdir (one
  resumable trainer workdir per run, default `workdir`) and --data_dir."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--workdir", default=workdir)
  parser.add_argument("--data_dir", default="~/tensorflow_datasets")
  return parser


def chain_dirs(args: argparse.Namespace) -> tuple[str, pathlib.Path]:
  """(data_dir, workdir) of `chain_parser`'s flags, expanded; the workdir is created."""
  root = pathlib.Path(args.workdir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return os.path.expanduser(args.data_dir), root


def train_stage(spec: str, workdir: pathlib.Path, data_dir: str, init_from: str = "",
                overrides: Sequence[str] = ()) -> dict:
  """Trains (or resumes, or just reads) one stage of a chain in `workdir`; returns its
  eval.json plus train_seconds and the config spec. No sample is generated.
  `overrides`: `--config.a.b=v` flags applied after the spec (e.g. a seed)."""
  from dsv2_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = load_config(spec, overrides)
  c.data.data_dir = data_dir
  c.train.init_from = init_from
  c.sample.max_new_tokens = 0
  if not (workdir / "eval.json").exists():
    start = time.perf_counter()
    trainer.train_and_evaluate(c, workdir)
    (workdir / "train_seconds.json").write_text(json.dumps(time.perf_counter() - start))
  result = json.loads((workdir / "eval.json").read_text())
  seconds = workdir / "train_seconds.json"
  result["train_seconds"] = json.loads(seconds.read_text()) if seconds.exists() else None
  result["config"] = spec
  return result


# --- output ------------------------------------------------------------------------------

def write(result: dict[str, Any], out: str,
          plot: Callable[[str], None] | None = None) -> None:
  """Writes `result` (plus `machine()`) to `out` ('-': stdout only) and its plot.

  `plot(path)` draws to out's .png sibling; without matplotlib (the `bench` extra) the plot
  is skipped with one line. A `summary` entry, if any, is printed.
  """
  result.setdefault("machine", machine())
  text = json.dumps(result, indent=2)
  if out == "-":
    print(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(f"wrote {out}")
  if plot is not None:
    if importlib.util.find_spec("matplotlib") is None:
      print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    else:
      png = os.path.splitext(out)[0] + ".png"
      plot(png)
      print(f"wrote {png}")
  if "summary" in result:
    print(json.dumps(result["summary"], indent=2))
