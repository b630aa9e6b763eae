"""The demo application (`python -m slicecompile demo`): a byte-level language model (model.py)
trained on Python's standard-library sources (textdata.py) under each backend asked for
(train.py). It uses the package's public names only."""
