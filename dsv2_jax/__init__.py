"""dsv2_jax: JAX/Flax reimplementation of the article's large-model design.

Where things live:
  dsv2_jax/model/      layers, attention (dense reference), ffn, transformer, remat, flops
  dsv2_jax/data/       tokenizer, local TFDS corpora, sources (name -> TFDS), grain pipeline
  dsv2_jax/train/      optimizer, state, step, checkpoint, metrics, evaluate, trainer
  dsv2_jax/parallel/   mesh and logical-axis rules
  dsv2_jax/infer/      KV-cache generation
  dsv2_jax/config.py   the config schema and its validation
  dsv2_jax/cli.py      python -m dsv2_jax {train,eval,generate,info}
"""

__version__ = "0.1.0"
