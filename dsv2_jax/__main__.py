"""`python -m dsv2_jax ...`: see dsv2_jax/cli.py."""

from dsv2_jax import host_memory

if __name__ == "__main__":
  host_memory.keep_freed_memory()  # Before JAX starts its threads.
  from dsv2_jax.cli import run  # pylint: disable=g-import-not-at-top
  run()
