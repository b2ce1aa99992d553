"""Benchmarks and studies. Run each from the repository root as a module:

  python -m experiments.NAME --help

Shared helpers (configs, timing, the machine, the JSON report): `experiments.common`.
"""
