"""Courier benchmarks: `make bench` runs bench/run.py (see its docstring) and bench/bulkhead.py."""
