"""`python -m dsv2_jax` end to end on a tiny run, and one clear line for every bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.train import trainer
from tests.helpers import REPO, cli

TINY_CONFIG = str(REPO / "configs" / "tiny.py")
TINY = [
    "--config", TINY_CONFIG + ":steps=4,seq_len=32,batch_size=4,dataset=lee_news",
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.ffn_hidden=64",
    "--config.model.max_seq_len=128", "--config.train.warmup_steps=1",
    "--config.train.log_every=2", "--config.eval.max_batches=2", "--config.eval.batch_size=32",
    "--config.sample.max_new_tokens=5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("cli") / "run"
  out = cli("train", *TINY, f"--config.data.data_dir={data_dir}", "--workdir", str(workdir))
  return workdir, out


def test_train_writes_metrics_eval_and_prints_figures(trained):
  workdir, out = trained
  assert "bits/byte" in out.stdout and "sample:" in out.stdout
  result = json.loads((workdir / "eval.json").read_text())
  assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 4
  # No backend-probing noise (e.g. "Unable to initialize backend 'tpu'") on a CPU machine.
  assert "backend" not in out.stderr.lower(), out.stderr


def test_eval_on_trained_workdir(trained):
  workdir, _ = trained
  out = cli("eval", "--workdir", str(workdir), "--json")
  result = json.loads(out.stdout)
  assert result["step"] == 4 and result["tokens"] > 0 and result["bits_per_byte"] > 0


def test_generate_prints_the_greedy_continuation(trained):
  workdir, _ = trained
  prompt, new = "History of", 12
  out = cli("generate", "--workdir", str(workdir), "--prompt", prompt,
            "--max_new_tokens", str(new), "--temperature", "0")
  # Oracle: the restored model's argmax, re-running the whole prefix for each token (in a
  # fixed-length buffer: the model is causal, so the zeros after the prefix do not matter).
  run = trainer.Run(trainer.load_config(workdir), workdir)
  params = run.initial_state()[0].params
  forward = jax.jit(lambda seq: run.model.apply({"params": params}, seq))
  ids = ByteTokenizer().encode(prompt)
  seq = np.zeros((1, len(ids) + new), np.int32)
  seq[0, :len(ids)] = ids
  for pos in range(len(ids), len(ids) + new):
    seq[0, pos] = int(jnp.argmax(forward(seq)[0, pos - 1]))
  continuation = ByteTokenizer().decode(seq[0, len(ids):])
  assert continuation and out.stdout == prompt + continuation + "\n"


def test_info_prints_parameter_count():
  out = cli("info", "--config", TINY_CONFIG, "--json")
  report = json.loads(out.stdout)
  assert report["total_params"] == sum(report["breakdown"].values()) > 1_000_000
  assert out.stderr == ""


def listing(path):
  return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


# (name, arguments, what the one line must say). WORKDIR is the trained run; CONFIG its
# config file; FILE a regular file (so FILE/run cannot be a directory).
BAD_INPUT = [
    ("unknown config field", ["train", "--workdir", "NEW", "--config", "CONFIG",
                              "--config.model.num_layer=1"],
     "--config.model.num_layer: no such config field; did you mean model.num_layers"),
    ("missing config file", ["train", "--workdir", "NEW", "--config", "configs/nonexist.py"],
     "--config configs/nonexist.py: no such file"),
    ("broken config file", ["train", "--workdir", "NEW", "--config", "BROKEN"],
     "could not be loaded: SyntaxError (line 2)"),
    ("unknown config argument", ["train", "--workdir", "NEW", "--config", "CONFIG:stepz=3"],
     "config argument 'stepz' is unknown"),
    ("bad override value", ["train", "--workdir", "NEW", "--config", "CONFIG",
                            "--config.train.steps=abc"],
     "--config.train.steps=abc: invalid literal for int()"),
    ("invalid config value", ["train", "--workdir", "NEW", "--config", "CONFIG",
                              "--config.model.num_heads=3"],
     "model.num_heads=3 does not divide model.d_model=128"),
    ("bad mesh", ["train", "--workdir", "NEW", "--config", "CONFIG", "--mesh", "data=2,foo=4"],
     "'foo=4' is not AXIS=SIZE"),
    ("unknown flag", ["train", "--workdirr", "NEW"], "Unknown command line flag 'workdirr'"),
    ("unwritable workdir", ["train", "--workdir", "FILE/run", "--config", "CONFIG"],
     "cannot be written (NotADirectoryError"),
    ("no command", ["--workdir", "NEW"], "give exactly one command"),
    ("not a workdir", ["eval", "--workdir", "NEW"], "config.json not found"),
    ("no workdir", ["generate"], "--workdir is required"),
    ("zero new tokens", ["generate", "--workdir", "WORKDIR", "--max_new_tokens", "0"],
     "--max_new_tokens=0 must be a positive integer"),
    ("negative new tokens", ["generate", "--workdir", "WORKDIR", "--max_new_tokens=-5"],
     "--max_new_tokens=-5 must be a positive integer"),
    ("negative temperature", ["generate", "--workdir", "WORKDIR", "--temperature=-1"],
     "--temperature=-1.0 must be >= 0"),
    ("negative top_k", ["generate", "--workdir", "WORKDIR", "--top_k=-2"],
     "--top_k=-2 must be >= 0"),
    ("empty prompt", ["generate", "--workdir", "WORKDIR", "--prompt", ""], "--prompt is empty"),
    ("non-UTF-8 prompt", ["generate", "--workdir", "WORKDIR", "--prompt", b"caf\xe9"],
     "--prompt is not valid UTF-8"),
    ("bad top_p", ["generate", "--workdir", "WORKDIR", "--top_p=1.5"],
     "--top_p=1.5 must be in (0, 1]"),
    ("window too large", ["generate", "--workdir", "WORKDIR", "--window", "500"],
     "--window=500 is longer than the model takes (model.max_seq_len=128)"),
    ("stride > window", ["eval", "--workdir", "WORKDIR", "--window", "16", "--stride", "32"],
     "stride=32 is larger than window=16"),
    ("empty text file", ["eval", "--workdir", "WORKDIR", "--text", "EMPTY"],
     "the file is empty"),
    ("non-UTF-8 text file", ["eval", "--workdir", "WORKDIR", "--text", "LATIN1"],
     "not UTF-8 (invalid byte 0xe9 at byte offset 3)"),
    ("missing index", ["eval", "--workdir", "WORKDIR", "--rag", "nope"],
     "build it with the `index` command"),
    ("init_from a non-run", ["train", "--workdir", "NEW", "--config", "CONFIG",
                             "--init_from", "FILE"], "point it at the workdir of a finished"),
    ("init_from another shape", ["train", "--workdir", "NEW", "--config", "CONFIG:width=64",
                                 "--init_from", "WORKDIR"],
     "its parameters do not fit this model (embedder/embedding is [258, 32] in the parent "
     "and [258, 64] here)"),
]


def expand(arg, subs):
  """Replaces a leading placeholder (WORKDIR, CONFIG:args, FILE/run, ...)."""
  for key, value in subs.items():
    if isinstance(arg, str) and (arg == key or arg.startswith((key + "/", key + ":"))):
      return value + arg[len(key):]
  return arg


@pytest.mark.parametrize("name,args,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line(trained, tmp_path, name, args, message):
  del name
  workdir, _ = trained
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  return (\n")
  regular_file = tmp_path / "file"
  regular_file.write_text("")
  new = tmp_path / "new_run"
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
  subs = {"WORKDIR": str(workdir), "NEW": str(new), "CONFIG": TINY_CONFIG,
          "BROKEN": str(broken), "FILE": str(regular_file),
          "EMPTY": str(tmp_path / "empty.txt"), "LATIN1": str(tmp_path / "latin1.txt")}
  args = [expand(a, subs) for a in args]
  before = listing(workdir)
  out = cli(*args, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
  assert message in out.stderr
  assert listing(workdir) == before  # Nothing written, nothing deleted.
  assert not new.exists()
