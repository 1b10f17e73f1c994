"""What an evaluation reads for one model: the model, the tokenizer its text is read with, the
data it was trained on (held-out split) and its training sequence length, whichever way the model
was given (an snlp-compile checkpoint, a local `transformers` folder, a factory, a built-in name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import is_checkpoint, load_checkpoint, read_checkpoint_info
from .data import ByteTokenizer, Tokenizer, tokenizer_from_json
from .hf_folder import check_vocab, read_record
from .model_source import resolve_model

DEFAULT_SEQ_LEN = 128
# load_corpus's arguments when nothing records the training data: this Python's stdlib sources
DEFAULT_DATA: dict[str, Any] = {"sources": None, "val_fraction": 0.05, "max_bytes": None, "suffix": ".py"}
_CONTEXT = ("sequence_len", "block_size", "max_position_embeddings", "n_positions")


@dataclass
class EvalSource:
    """model (eval mode, on the device), tokenizer, data (``load_corpus`` keyword arguments), seq_len."""

    model: nn.Module
    tokenizer: Tokenizer
    data: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DATA))
    seq_len: int = DEFAULT_SEQ_LEN


def load_for_eval(spec: str | Path, device: torch.device | str = "cpu") -> EvalSource:
    """The model ``spec`` names with what its evaluation reads (``EvalSource``)."""
    if is_checkpoint(spec):
        info = read_checkpoint_info(spec)
        tokenizer = tokenizer_from_json(info["tokenizer"]) if info.get("tokenizer") else ByteTokenizer()
        model = load_checkpoint(spec, device=device)
        return EvalSource(model, tokenizer, dict(info.get("data") or DEFAULT_DATA), _seq_len(model, info))
    source = resolve_model(spec)
    tokenizer = source.tokenizer or ByteTokenizer()
    check_vocab(source.model, tokenizer, source.name)
    record = read_record(source.folder) if source.folder is not None else None
    data = dict((record or {}).get("data") or DEFAULT_DATA)
    return EvalSource(source.model.to(device).eval(), tokenizer, data, _seq_len(source.model, record))


def _seq_len(model: nn.Module, record: dict[str, Any] | None) -> int:
    """The training sequence length when recorded, else 128 within the model's context."""
    trained = ((record or {}).get("train") or {}).get("seq_len")
    if isinstance(trained, int):
        return trained
    config = getattr(model, "config", None)
    context = next((getattr(config, f) for f in _CONTEXT if isinstance(getattr(config, f, None), int)), None)
    return min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN
