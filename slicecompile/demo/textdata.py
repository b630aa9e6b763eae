"""Real text available offline everywhere: source files of Python's own standard library, as bytes.

A fixed selection of modules (present in every CPython 3.10+), read from the running
interpreter's standard library. Byte-level: the vocabulary is the 256 byte values. Each file is
split at 90% of its length: the first part of every file is training text, the rest validation,
so both sides see every file's style and neither sees the other's lines. Files differ a little
between Python versions, so losses are comparable within one interpreter.
"""

import os
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
VOCAB = 256
TRAIN_SHARE = 0.9


def load(files=FILES):
    """(train, validation): uint8 tensors of the selected files' bytes, split per file."""
    root = sysconfig.get_paths()["stdlib"]
    train, validation = [], []
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        cut = int(len(data) * TRAIN_SHARE)
        train.append(data[:cut])
        validation.append(data[cut:])
    return torch.cat(train), torch.cat(validation)


def batch(data, batch_size, context, generator, device):
    """(inputs, targets), each (batch_size, context) int64: random windows of data and the same
    windows shifted by one byte."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator, device="cpu")
    windows = torch.stack([data[s : s + context + 1] for s in starts.tolist()]).long()
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]
