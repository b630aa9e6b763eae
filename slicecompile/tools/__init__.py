"""Tools on top of the ops: `python -m slicecompile tune` (tune.py) and the timing helpers the
demo and the benchmarks share (timing.py)."""
