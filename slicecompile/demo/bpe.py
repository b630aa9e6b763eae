"""A byte-level BPE vocabulary for the demo (`--vocab bpe`): trained with the Hugging Face
`tokenizers` package on the demo's training text (textdata.py; never the validation text), and
cached on disk, so a later run with the same vocabulary size and text loads it.

GPT-2's recipe: text is split into words by GPT-2's pattern, bytes are the initial alphabet (no
unknown tokens, decoding inverts encoding) and merges never cross a word. The ten modules'
~640 KB of training text hold about 10,500 distinct merges, so a larger requested size stops
there: the model's output layer has the size the tokenizer reached (`tokenizer.get_vocab_size()`),
never classes that no text produces. The whole standard library (--corpus stdlib, ~11 MB of
training text) reaches the default 32,768 (on CPython 3.11: training ~5 s, encoding ~7 s, 2.6M
training tokens).

The cache: $SLICECOMPILE_CACHE_DIR/bpe (by default ~/.cache/slicecompile/bpe), one JSON file per
(requested size, SHA-256 of the training text). `tokenizers` is imported only here and only
when a BPE vocabulary is asked for: the byte-level demo does not need it.
"""

import hashlib
import os
import pathlib
import tempfile

import torch

DEFAULT_VOCAB_SIZE = 32768
RECIPE = "bytelevel-gpt2"  # in the cache file's name: a changed recipe must not load old files


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "the BPE vocabulary (--vocab bpe) needs the `tokenizers` package: pip install tokenizers "
            "(or pip install 'slicecompile[demo]')"
        ) from error
    return tokenizers


def check_vocab_size(size):
    """size itself, or ValueError/TypeError: byte-level BPE starts from the 256 byte values."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"the BPE vocabulary size must be an int, got {size!r}")
    if size <= 256:
        raise ValueError(f"the BPE vocabulary size must exceed the 256 byte values, got {size}")
    return size


def as_text(data):
    """A uint8 tensor of UTF-8 bytes as str. A per-file cut (textdata.py) that splits a character
    leaves U+FFFD in its place."""
    return data.numpy().tobytes().decode("utf-8", errors="replace")


def cache_path(size, text, cache_dir=None):
    root = pathlib.Path(cache_dir or os.environ.get("SLICECOMPILE_CACHE_DIR") or "~/.cache/slicecompile")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return root.expanduser() / "bpe" / f"{RECIPE}-{size}-{digest}.json"


def train_tokenizer(size, text):
    """A byte-level BPE tokenizer of at most `size` tokens trained on text (seconds on either corpus)."""
    tokenizers = _tokenizers()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def load_tokenizer(size, text, cache_dir=None):
    """The cached tokenizer for (size, text), trained and saved first when there is none. Saved
    through a temporary file and a rename, so a concurrent run never reads half a file."""
    check_vocab_size(size)
    path = cache_path(size, text, cache_dir)
    if path.exists():
        return _tokenizers().Tokenizer.from_file(str(path))
    tokenizer = train_tokenizer(size, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(tokenizer.to_str())
    os.replace(f.name, path)
    return tokenizer


def encode(tokenizer, text):
    """text's token ids as an int32 tensor (the batches widen them to int64)."""
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.int32)


def decode(tokenizer, ids):
    return tokenizer.decode([int(i) for i in ids])


def load(size, data, cache_dir=None):
    """(train, validation) token tensors and the tokenizer, from textdata.load()'s byte tensors:
    the tokenizer learns from the training text only."""
    train_text = as_text(data[0])
    tokenizer = load_tokenizer(size, train_text, cache_dir)
    return (encode(tokenizer, train_text), encode(tokenizer, as_text(data[1]))), tokenizer
