"""Tools on top of the ops: `python -m slicecompile tune` (tune.py), and the benchmarks' timing
helpers (timing.py) and shared harness (bench.py: run metadata, CSV files, interleaved rounds)."""
