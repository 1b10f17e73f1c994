"""Local `transformers` causal LMs for training and evaluation: load a folder (or a config), give
the compiler a plain token -> logits module, read the folder's own tokenizer, save a checkpoint
the model's own class loads (``save_pretrained``: config.json + model.safetensors + tokenizer).

Nothing is downloaded: every ``from_pretrained`` runs with ``local_files_only=True``, and only
safetensors weights are read (a ``pytorch_model.bin`` is a pickle: refused). ``transformers`` is
imported only when one of these functions needs it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SNLPConfigError, SNLPUsageError
from .data import BPETokenizer, ByteTokenizer, Tokenizer

CONFIG = "config.json"
RECORD = "snlp_compile.json"  # what snlp-compile adds to a save_pretrained folder: training record, data
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _config_file(path: str | Path) -> Path | None:
    target = Path(path)
    if target.is_dir():
        target = target / CONFIG
    return target if target.is_file() and target.suffix == ".json" else None


def is_transformers_path(path: str | Path) -> bool:
    """A folder with a `transformers` config.json (it names a ``model_type``), or such a file."""
    file = _config_file(path)
    if file is None:
        return False
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a `transformers` ``PreTrainedModel`` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def load_transformers(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype | None = torch.float32
) -> nn.Module:
    """The causal LM of a local folder with its safetensors weights, or built from its config with
    seeded random weights when the folder (or a config.json given directly) has none."""
    import transformers

    file = _config_file(path)
    if file is None or not is_transformers_path(file):
        raise SNLPConfigError(f"{str(path)!r} is not a transformers folder or config.json (no model_type)")
    folder = file.parent
    try:
        config = transformers.AutoConfig.from_pretrained(str(file), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise SNLPConfigError(f"{file}: transformers cannot read this config: {_first_line(exc)}") from None
    has_weights = Path(path).is_dir() and any((folder / w).is_file() for w in SAFETENSORS)
    if Path(path).is_dir() and not has_weights and any(folder.glob("pytorch_model*.bin")):
        raise SNLPConfigError(
            f"{folder}: only pytorch_model*.bin weights (a pickle); snlp-compile reads safetensors only: "
            "convert with model.save_pretrained(folder) (safe_serialization is the default)"
        )
    try:
        if has_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, dtype=dtype
            )
        else:
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise SNLPConfigError(
            f"{folder}: not a causal language model transformers can build: {_first_line(exc)}"
        ) from None
    return model.eval()


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class TokenLogits(nn.Module):
    """``model(input_ids, use_cache=False).logits``: what the compiler captures of a `transformers`
    causal LM (its ``DynamicCache`` cannot be captured), with the model's own parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # (vocab_size, layer count: read by callers that size inputs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def token_model(model: nn.Module) -> nn.Module:
    """``model`` as a token -> logits module: a `transformers` model wrapped in ``TokenLogits``,
    anything else as it is."""
    return TokenLogits(model).train(model.training) if is_transformers_model(model) else model


def model_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary a model's config declares (None when it has no config saying so)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(vocab) if isinstance(vocab, int) else None


def model_layers(model: nn.Module) -> int:
    """The layer count a model's config declares (0 when it does not say)."""
    config = getattr(model, "config", None)
    for name in ("n_layer", "num_hidden_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def folder_tokenizer(path: str | Path) -> Tokenizer | None:
    """The folder's own tokenizer: tokenizer.json through ``tokenizers``, else whatever fast
    tokenizer ``AutoTokenizer`` builds offline from its files; None when it has no tokenizer files."""
    file = _config_file(path)
    folder = file.parent if file is not None else Path(path)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        return _named(BPETokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json"))))
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SNLPConfigError(
            f"{folder}: its tokenizer files do not load offline: {_first_line(exc)}"
        ) from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SNLPConfigError(
            f"{folder}: {type(tok).__name__} is a slow tokenizer; save a fast one (tokenizer.json) with "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder)"
        )
    return _named(BPETokenizer(backend))


def _named(tok: BPETokenizer) -> BPETokenizer:
    tok.name = "the model's own (tokenizer.json)"
    return tok


def check_vocab(model: nn.Module, tokenizer: Tokenizer, what: str) -> None:
    """Every token id the tokenizer can emit must be a row of the model's embedding."""
    vocab = model_vocab_size(model)
    if vocab is not None and vocab < tokenizer.vocab_size:
        hint = (
            " (without a tokenizer in the folder, text is read as bytes: ids 0-255)"
            if isinstance(tokenizer, ByteTokenizer)
            else ""
        )
        raise SNLPConfigError(
            f"{what}: the model's vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}"
            f"{hint}"
        )


def read_record(path: str | Path) -> dict[str, Any] | None:
    """What ``save_transformers`` recorded next to the weights (None for a folder it did not write)."""
    file = Path(path) / RECORD
    return json.loads(file.read_text()) if file.is_file() else None


def save_transformers(
    path: str | Path,
    model: nn.Module,
    *,
    tokenizer: Tokenizer | None = None,
    tokenizer_source: str | Path | None = None,
    **record: Any,
) -> Path:
    """``model.save_pretrained(path)`` (config.json + model.safetensors), the tokenizer
    (tokenizer.json, plus the other tokenizer files of ``tokenizer_source``, the folder it came
    from) and ``record`` (JSON) as snlp_compile.json. ``path`` is a folder."""
    if not is_transformers_model(model):
        raise SNLPUsageError(
            f"save_transformers needs a transformers PreTrainedModel, got {type(model).__name__}"
        )
    target = Path(path)
    if target.suffix == ".safetensors":
        raise SNLPConfigError(
            f"{target}: a transformers model is saved as a folder (save_pretrained), not one .safetensors file"
        )
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))  # type: ignore[operator]
    if tokenizer_source is not None:
        source = Path(tokenizer_source)
        source = source if source.is_dir() else source.parent
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and source.resolve() != target.resolve():
                shutil.copyfile(source / name, target / name)
    if isinstance(tokenizer, BPETokenizer) and not (target / "tokenizer.json").is_file():
        tokenizer.save(target / "tokenizer.json")
    if tokenizer is not None:
        record["tokenizer"] = (
            tokenizer.to_json() if isinstance(tokenizer, ByteTokenizer) else {"kind": "folder"}
        )
    (target / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return target
