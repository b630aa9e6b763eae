"""Real text available offline everywhere: source files of Python's own standard library, as bytes.

Two corpora, read from the running interpreter's standard library: `modules`, a fixed selection
of ten modules (present in every CPython 3.10+, ~640 KB), and `stdlib`, every readable `.py` file
outside test packages and site-packages (stdlib_files(): ~730 files, ~12 MB on CPython 3.11),
enough text for a 32k BPE vocabulary (bpe.py). Byte-level: the vocabulary is the 256 byte values.
Each file is split at 90% of its length: the first part of every file is training text, the rest
validation, so both sides see every file's style and neither sees the other's lines. Files differ
between Python versions, so losses are comparable within one interpreter.
"""

import os
import pathlib
import sysconfig

import torch

FILES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "pathlib.py"
    if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "pathlib.py"))
    else "pathlib/_local.py",
    "subprocess.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
)
CORPORA = ("modules", "stdlib")
# Directory names skipped by stdlib_files(). Test packages (test/, idlelib/idle_test/,
# lib2to3/tests/, ctypes/test/, ...) are mostly fixtures, and more text than the rest (19 MB
# against 12 MB on CPython 3.11); site-packages holds installed packages, not the standard library.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
VOCAB = 256
TRAIN_SHARE = 0.9


def stdlib_files(root=None):
    """Every readable .py file under root (default: the running interpreter's standard library),
    as paths relative to root, sorted, outside any directory named in EXCLUDED_DIRS."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in EXCLUDED_DIRS]  # prune: never walk them
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(".py") and os.access(path, os.R_OK):
                found.append(pathlib.Path(path).relative_to(root).as_posix())
    return tuple(sorted(found))


def corpus_files(corpus):
    """The files of a corpus named in CORPORA."""
    if corpus == "modules":
        return FILES
    if corpus == "stdlib":
        return stdlib_files()
    raise ValueError(f"unknown corpus {corpus!r}: expected one of {', '.join(CORPORA)}")


def load(files=FILES):
    """(train, validation): uint8 tensors of the files' bytes (paths relative to the standard
    library, e.g. FILES or corpus_files("stdlib")), split per file."""
    if not files:
        raise ValueError("no files to load")
    root = sysconfig.get_paths()["stdlib"]
    train, validation = bytearray(), bytearray()  # one buffer each: empty files (__init__.py) are fine
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        cut = int(len(data) * TRAIN_SHARE)
        train += data[:cut]
        validation += data[cut:]
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(validation, dtype=torch.uint8)


def batch(data, batch_size, context, generator, device):
    """(inputs, targets), each (batch_size, context) int64: random windows of data and the same
    windows shifted by one byte."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator, device="cpu")
    windows = torch.stack([data[s : s + context + 1] for s in starts.tolist()]).long()
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]
