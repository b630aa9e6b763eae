"""The demo's text: the ten modules and the whole standard library, each file split at
TRAIN_SHARE into training and validation text, test packages and site-packages left out."""

import os
import sysconfig

import pytest
import torch

from slicecompile.demo import textdata

from conftest import DEVICE

STDLIB = sysconfig.get_paths()["stdlib"]


def _size(name):
    return os.path.getsize(os.path.join(STDLIB, name))


def test_text_is_split_per_file_and_batches_shift_by_one():
    train, validation = textdata.load()
    assert train.dtype == torch.uint8 and 0.85 < len(train) / (len(train) + len(validation)) < 0.95
    with open(os.path.join(STDLIB, textdata.FILES[0]), "rb") as f:
        first = f.read()
    cut = int(len(first) * textdata.TRAIN_SHARE)
    assert bytes(train[:cut].tolist()) == first[:cut] and bytes(validation[: len(first) - cut].tolist()) == first[cut:]
    x, y = textdata.batch(train, 3, 10, torch.Generator().manual_seed(0), DEVICE)
    assert x.shape == y.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1])


def test_stdlib_files_leave_out_test_packages_and_site_packages(tmp_path):
    for name in ["b.py", "a/__init__.py", "a/c.py", "a/notes.txt", "test/test_a.py", "a/tests/t.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    for name in ["idlelib/idle_test/t.py", "site-packages/torch/__init__.py", "dist-packages/d.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    assert textdata.stdlib_files(tmp_path) == ("a/__init__.py", "a/c.py", "b.py")


def test_stdlib_corpus_is_the_whole_library_sorted_and_split_per_file():
    files = textdata.corpus_files("stdlib")
    assert files == textdata.stdlib_files() == tuple(sorted(files))
    assert len(files) > 300 and set(textdata.FILES) <= set(files)
    assert not any(textdata.EXCLUDED_DIRS & set(name.split("/")[:-1]) for name in files)
    assert "unittest/case.py" in files and not any(name.startswith(("test/", "idlelib/idle_test/")) for name in files)

    train, validation = textdata.load(files)
    cuts = [int(_size(name) * textdata.TRAIN_SHARE) for name in files]
    assert len(train) == sum(cuts) and len(train) + len(validation) == sum(map(_size, files))
    # The last file's tail ends the validation text; its head ends the training text.
    with open(os.path.join(STDLIB, files[-1]), "rb") as f:
        last = f.read()
    assert bytes(train[len(train) - cuts[-1] :].tolist()) == last[: cuts[-1]]
    assert bytes(validation[len(validation) - (len(last) - cuts[-1]) :].tolist()) == last[cuts[-1] :]


def test_unknown_corpus_and_no_files_are_refused():
    with pytest.raises(ValueError, match="unknown corpus 'everything'"):
        textdata.corpus_files("everything")
    with pytest.raises(ValueError, match="no files"):
        textdata.load(())
