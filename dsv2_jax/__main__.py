"""`python -m dsv2_jax ...`: see dsv2_jax/cli.py."""

from dsv2_jax.cli import run

if __name__ == "__main__":
  run()
