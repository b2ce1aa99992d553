"""The article's stage-1 recipe at a 1B-class size (every default of dsv2_jax.config).

AdamW (b1 0.9, b2 0.95), warmup to 5e-5 then linear decay; byte-level tokens.
Meant for accelerators:
  python -m dsv2_jax train --config configs/base.py --workdir gs://bucket/run \
      --config.data.dataset=c4/en
"""

from dsv2_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg  # No variants yet.
  return config_lib.default_config()
