"""The demo's BPE vocabulary: trained on the training text, a lossless round trip, cached on disk
(a second load reads the file and trains nothing), and a clear error without `tokenizers`."""

import sys

import pytest
import torch

from slicecompile.demo import bpe, textdata


def test_tokenizer_trains_round_trips_and_is_cached(tmp_path, monkeypatch):
    data = textdata.load()
    (train, validation), tokenizer = bpe.load(512, data, cache_dir=tmp_path)
    assert tokenizer.get_vocab_size() == 512
    assert train.dtype == validation.dtype == torch.int32 and 0 <= int(train.min()) and int(train.max()) < 512
    assert len(train) < len(data[0]) / 2  # merges: fewer tokens than bytes
    sample = bpe.as_text(data[1])[:3000]  # validation text: never seen in training
    assert bpe.decode(tokenizer, bpe.encode(tokenizer, sample)) == sample

    path = bpe.cache_path(512, bpe.as_text(data[0]), tmp_path)
    written = path.stat().st_mtime_ns

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(bpe, "train_tokenizer", no_training)
    (train_again, _), cached = bpe.load(512, data, cache_dir=tmp_path)
    assert torch.equal(train_again, train) and cached.get_vocab_size() == 512
    assert path.stat().st_mtime_ns == written and [p.name for p in path.parent.iterdir()] == [path.name]
    assert bpe.cache_path(1024, "text", tmp_path) != bpe.cache_path(512, "text", tmp_path)
    assert bpe.cache_path(512, "other text", tmp_path) != bpe.cache_path(512, "text", tmp_path)


def test_missing_tokenizers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        bpe.train_tokenizer(300, "text")


@pytest.mark.parametrize(
    ("size", "error"), [(256, ValueError), (-1, ValueError), ("512", TypeError), (True, TypeError)]
)
def test_bad_vocab_sizes_are_refused(size, error):
    with pytest.raises(error, match="vocabulary size"):
        bpe.check_vocab_size(size)
