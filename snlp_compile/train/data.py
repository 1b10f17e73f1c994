"""Real text for training and evaluation, available on every machine without a download.

By default the corpus is the ``*.py`` sources of the running interpreter's standard library
(``sysconfig.get_paths()['stdlib']``, third-party ``site-packages`` left out); any files or folders
can be given instead. Files are split into train and held-out by a hash of their path, so the
split does not depend on which other files exist, and read in the order of a second hash of their
path, so a byte cap keeps an unbiased sample of files on both sides (not the alphabetically first). Tokens are bytes by default (vocabulary 256,
bits per byte = bits per token); a byte-level BPE trained on the training files with
``tokenizers`` is the alternative.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

SEPARATOR = b"\n\n"  # between files in the token stream
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, data: bytes) -> np.ndarray: ...

    def to_json(self) -> dict[str, object]: ...


class ByteTokenizer:
    """One token per byte: no training, no unknowns, bits per byte = bits per token."""

    name = "bytes"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text (bytes that are not UTF-8 replaced)."""
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, object]:
        return {"kind": "bytes"}


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` package, trained on the training files."""

    name = "bpe"

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())  # type: ignore[attr-defined]

    @classmethod
    def train(cls, texts: Iterable[bytes], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer=trainer)
        return cls(tok)

    def encode(self, data: bytes) -> np.ndarray:
        ids = self._tok.encode(data.decode("utf-8", errors="replace")).ids  # type: ignore[attr-defined]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text."""
        return str(self._tok.decode(list(ids)))  # type: ignore[attr-defined]

    def to_json(self) -> dict[str, object]:
        return {"kind": "bpe", "tokenizer": json.loads(self._tok.to_str())}  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> None:
        """Write the ``tokenizers`` JSON (tokenizer.json), as ``Tokenizer.from_file`` reads it."""
        self._tok.save(str(path))  # type: ignore[attr-defined]


def tokenizer_from_json(spec: dict[str, object]) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(spec["tokenizer"])))
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'bytes' or 'bpe')")


def default_sources() -> list[Path]:
    """The standard library folder of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def collect_files(sources: Sequence[str | Path] | None = None, suffix: str = ".py") -> list[tuple[str, Path]]:
    """(key, path) of every text file: files as given, folders searched for ``*suffix``.

    The key (path relative to the folder given) decides the split; the order is sorted by key
    (``load_corpus`` reads them in ``read_order``).
    """
    found: dict[str, Path] = {}
    for src in sources or default_sources():
        root = Path(src)
        if root.is_file():
            found[root.name] = root
        elif root.is_dir():
            for f in root.rglob(f"*{suffix}"):
                rel = f.relative_to(root)
                if f.is_file() and not _SKIP_DIRS.intersection(rel.parts):
                    found[rel.as_posix()] = f
        else:
            raise FileNotFoundError(f"data source {str(root)!r} is neither a file nor a folder")
    if not found:
        raise ValueError(f"no {suffix} files found under {[str(s) for s in sources or default_sources()]}")
    return sorted(found.items())


def is_held_out(key: str, fraction: float) -> bool:
    """A file's split, from a hash of its key (stable across machines and file sets)."""
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000


def read_order(files: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The files in the order of a hash of their key (independent of the split's hash): a
    pseudo-random but stable order, so a byte cap takes an unbiased sample of the files."""
    return sorted(files, key=lambda kv: (hashlib.blake2b(kv[0].encode(), digest_size=8).digest(), kv[0]))


@dataclass
class Corpus:
    """Train and held-out token streams plus what bits per byte needs."""

    tokenizer: Tokenizer
    train: torch.Tensor  # int64 (n,)
    val: torch.Tensor
    val_bytes: int
    train_files: int
    val_files: int
    spec: dict[str, Any] = field(default_factory=dict)  # load_corpus arguments that rebuild the same split
    train_keys: list[str] = field(default_factory=list)  # the files read, in stream order
    val_keys: list[str] = field(default_factory=list)

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / max(1, self.val.numel())

    def describe(self) -> str:
        return (
            f"{self.train_files} train files ({self.train.numel():,} tokens), {self.val_files} held-out "
            f"files ({self.val.numel():,} tokens, {self.val_bytes:,} bytes), tokenizer {self.tokenizer.name} "
            f"(vocab {self.tokenizer.vocab_size})"
        )


def load_corpus(
    sources: Sequence[str | Path] | None = None,
    *,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    tokenizer: str | Tokenizer = "bytes",
    bpe_vocab_size: int = 4096,
    suffix: str = ".py",
    val_max_bytes: int | None = None,
) -> Corpus:
    """Read, split and tokenize. ``max_bytes`` caps the train and the held-out text each, for quick
    runs: files are read in ``read_order`` (a hash of their key, so both sides are unbiased samples
    of the files), the last one cut. ``val_max_bytes`` caps the held-out text alone (default:
    ``max_bytes``), e.g. to tokenise only the held-out windows an evaluation reads."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = read_order(collect_files(sources, suffix))
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    keys: tuple[list[str], list[str]] = ([], [])
    sizes = [0, 0]
    caps = (max_bytes, max_bytes if val_max_bytes is None else val_max_bytes)
    for key, path in files:
        which = 1 if is_held_out(key, val_fraction) else 0
        cap = caps[which]
        if cap is not None and sizes[which] >= cap:
            continue
        data = path.read_bytes()
        if cap is not None:
            data = data[: cap - sizes[which]]
        (val_parts if which else train_parts).append(data)
        keys[which].append(key)
        sizes[which] += len(data) + len(SEPARATOR)
    if not train_parts or not val_parts:
        raise ValueError(
            f"the split left {len(train_parts)} train and {len(val_parts)} held-out files; give more files "
            f"or change val_fraction ({val_fraction})"
        )
    if isinstance(tokenizer, str):
        if tokenizer == "bytes":
            tok: Tokenizer = ByteTokenizer()
        elif tokenizer == "bpe":
            tok = BPETokenizer.train(train_parts, bpe_vocab_size)
        else:
            raise ValueError(f"unknown tokenizer {tokenizer!r} (expected 'bytes' or 'bpe')")
    else:
        tok = tokenizer
    val_text = SEPARATOR.join(val_parts)
    spec = {
        # None: "the standard library of whichever interpreter runs", so the spec travels
        "sources": None if not sources else [str(Path(s).resolve()) for s in sources],
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "val_max_bytes": val_max_bytes,
        "suffix": suffix,
    }
    return Corpus(
        tok,
        torch.from_numpy(tok.encode(SEPARATOR.join(train_parts))),
        torch.from_numpy(tok.encode(val_text)),
        len(val_text),
        len(train_parts),
        len(val_parts),
        spec,
        keys[0],
        keys[1],
    )


def random_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) pairs of random windows, reproducible from ``seed``."""
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"{tokens.numel()} tokens cannot fill one window of {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g)
        win = tokens[starts[:, None] + offsets]
        yield win[:, :-1], win[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len + 1) evenly spread over the held-out stream."""
    total = (tokens.numel() - 1) // seq_len
    if total < 1:
        raise ValueError(f"{tokens.numel()} held-out tokens cannot fill one window of {seq_len + 1}")
    picks = (
        torch.arange(total)
        if max_windows is None or max_windows >= total
        else (torch.linspace(0, total - 1, max_windows).round().long())
    )
    offsets = torch.arange(seq_len + 1)
    return tokens[picks[:, None] * seq_len + offsets]
