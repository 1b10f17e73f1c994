"""Checkpoints of trained reference models: weights in safetensors, everything else in JSON.

Two layouts, both read by every function here:

- a single file ``*.safetensors``: the weights, and the JSON record in the file's metadata
  (key ``snlp_compile``);
- a folder (any other path): ``model.safetensors`` and ``config.json``.

The JSON record holds the registry name and the full model config (``zero_init_out`` included),
the tokenizer (``Tokenizer.to_json()``: a BPE's whole ``tokenizers`` JSON, so evaluation
re-tokenises identically; ``checkpoint_tokenizer`` rebuilds it), and whatever else the caller
passes (how it was trained, what it measured). ``load_checkpoint(path)`` rebuilds an ordinary
``nn.Module`` that ``transform()``, the evaluator and the benchmarks accept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import build_model
from .data import Tokenizer, tokenizer_from_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "snlp_compile.checkpoint/1"
METADATA_KEY = "snlp_compile"


def _single_file(path: str | Path) -> bool:
    return str(path).endswith(".safetensors")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    *,
    tokenizer: Tokenizer | dict[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write ``model`` (a registry model named ``model_name``), its tokenizer (a ``Tokenizer`` or
    its ``to_json()``) and JSON-serialisable ``meta``. ``path`` ending in ``.safetensors``: one
    file; anything else: a folder. Returns the path written."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise TypeError(
            f"save_checkpoint needs a reference model with a dataclass .config, got {type(model).__name__}"
        )
    if tokenizer is not None and not isinstance(tokenizer, dict):
        tokenizer = tokenizer.to_json()
    info = {"format": FORMAT, "model": model_name, "model_config": dataclasses.asdict(config), **meta}
    if tokenizer is not None:
        info["tokenizer"] = tokenizer
    text = json.dumps(info, indent=2, default=str) + "\n"
    target = Path(path)
    if _single_file(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, str(target), metadata={METADATA_KEY: text})
        return target
    target.mkdir(parents=True, exist_ok=True)
    save_model(model, str(target / WEIGHTS))
    (target / CONFIG).write_text(text)
    return target


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (file or folder)."""
    target = Path(path)
    if _single_file(target):
        from safetensors import safe_open

        if not target.is_file():
            raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
        with safe_open(str(target), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
        if text is None:
            raise ValueError(f"{target} has no {METADATA_KEY!r} metadata: not an snlp_compile checkpoint")
        info = json.loads(text)
        where = str(target)
    else:
        file = target / CONFIG
        if not file.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a checkpoint folder: {CONFIG} is missing")
        info = json.loads(file.read_text())
        where = str(file)
    if info.get("format") != FORMAT:
        raise ValueError(f"{where} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def checkpoint_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved with a checkpoint (None when it has none), e.g. for
    ``load_corpus(..., tokenizer=checkpoint_tokenizer(path))``."""
    spec = read_checkpoint_info(path).get("tokenizer")
    return None if spec is None else tokenizer_from_json(spec)


def load_checkpoint(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild a saved reference model (eval mode) with its trained weights, on ``device``
    (default CPU), in ``dtype`` (default: as saved)."""
    from safetensors.torch import load_model

    info = read_checkpoint_info(path)
    # built normally (so derived buffers such as rotary tables exist), then overwritten
    model = build_model(info["model"], seed=0, device=device, **info["model_config"])
    weights = Path(path) if _single_file(path) else Path(path) / WEIGHTS
    load_model(model, str(weights), strict=True, device=str(device or "cpu"))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
