"""Benchmarks for issue 4: `python -m bench.accuracy` and `python -m bench.speed`."""
