"""The published DeepSeek-V2-Lite layout (15.7B total / 2.4B active), and its tiny variant.

MLA without query compression (16 heads, KV latent 512, RoPE 64), DeepSeekMoE with 1
dense layer, then 2 shared + 64 routed experts of hidden 1,408, top-6 (no group limit),
YaRN x40 over 4K. Everything, arguments included, is configs/deepseek_v2.py with
variant=lite:
  python -m dsv2_jax info --config configs/deepseek_v2_lite.py
  python -m dsv2_jax train --config configs/deepseek_v2_lite.py:tiny --workdir runs/lite_tiny
"""

import pathlib

from dsv2_jax import config as config_lib


def get_config(arg: str | None = None):
  arg = "variant=lite" + (f",{arg}" if arg else "")
  return config_lib.from_file(pathlib.Path(__file__).with_name("deepseek_v2.py"), arg)
