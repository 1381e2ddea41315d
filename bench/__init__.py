"""The benchmark of issue 5: `python -m bench.run` (see bench/README.md)."""
