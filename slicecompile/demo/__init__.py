"""The demo application (`python -m slicecompile demo`): a small language model (model.py)
trained on Python's standard-library sources (textdata.py), as bytes or through a BPE vocabulary
(bpe.py), under each backend asked for (train.py). It uses the package's public names only."""
