"""Tiny CPU default: a byte-level Transformer on the local Wikipedia excerpt.

  python -m dsv2_jax train --config configs/tiny.py --workdir /tmp/dsv2_tiny

Arguments after ':' pick an ablation without a new file, e.g.
  --config configs/tiny.py:steps=100,seq_len=128,dataset=web_bible
"""

from dsv2_jax import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, steps=600, seq_len=256, batch_size=16,
                              dataset="wiki_excerpt")
  c = config_lib.default_config()
  c.model.update(
      d_model=256,
      num_layers=4,
      num_heads=4,
      ffn_hidden=1024,
      max_seq_len=1024,  # Room to sample past the training length.
      dropout_rate=0.0,  # Too few steps to overfit 3 MB of text.
  )
  c.data.update(dataset=args.dataset, seq_len=args.seq_len, batch_size=args.batch_size)
  c.train.update(
      steps=args.steps,
      # The article's 5e-5 peak is for a 175B model; a 3M-parameter model trains
      # ~50x faster at a 50x larger peak.
      learning_rate=3e-3,
      warmup_steps=min(60, args.steps),
      end_lr_fraction=0.1,
      log_every=25,
      eval_every=200,
      checkpoint_every=200,
  )
  c.eval.batch_size = 32
  return c
