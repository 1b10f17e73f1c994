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

Models from elsewhere: a `transformers` model is saved with ``save_pretrained`` (a folder its own
class loads, ``hf_folder.save_transformers``) and ``load_checkpoint`` reads such folders too; a
model built by ``'package.module:function'`` is saved with that name instead of a config and
rebuilt by calling it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SNLPUsageError
from ..models import build_model
from .data import Tokenizer, tokenizer_from_json
from .hf_folder import is_transformers_model, is_transformers_path, load_transformers, save_transformers
from .model_source import load_factory

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
    """Write ``model`` (a registry model named ``model_name``, or one built by the factory
    ``model_name='package.module:function'``), its tokenizer (a ``Tokenizer`` or its ``to_json()``)
    and JSON-serialisable ``meta``. ``path`` ending in ``.safetensors``: one file; anything else: a
    folder. A `transformers` model goes to ``save_transformers`` (a ``save_pretrained`` folder).
    Returns the path written."""
    from safetensors.torch import save_model

    if is_transformers_model(model):
        tok = tokenizer_from_json(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        return save_transformers(path, model, tokenizer=tok, source=model_name, **meta)
    config = getattr(model, "config", None)
    if ":" in model_name:  # rebuilt by calling the factory (whatever config it has)
        built: dict[str, Any] = {"model": model_name, "factory": model_name, "model_config": {}}
    elif config is not None and dataclasses.is_dataclass(config) and not isinstance(config, type):
        built = {"model": model_name, "model_config": dataclasses.asdict(config)}
    else:
        raise SNLPUsageError(
            f"save_checkpoint cannot rebuild a {type(model).__name__} later: it is neither a reference model, "
            "a transformers model, nor built by a factory; give model_name='package.module:function' "
            "(train(model='package.module:function', ...) does), or save its state_dict yourself"
        )
    if tokenizer is not None and not isinstance(tokenizer, dict):
        tokenizer = tokenizer.to_json()
    info = {"format": FORMAT, **built, **meta}
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


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an snlp-compile checkpoint: a ``.safetensors`` file, or a folder whose
    config.json has this module's format (a `transformers` folder's has a model_type instead)."""
    if _single_file(path):
        return True
    file = Path(path) / CONFIG
    try:
        return file.is_file() and json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
    (default CPU), in ``dtype`` (default: as saved; a `transformers` folder: float32)."""
    from safetensors.torch import load_model

    if not _single_file(path) and is_transformers_path(path):
        return load_transformers(path, dtype=dtype or torch.float32).to(device or "cpu").eval()
    info = read_checkpoint_info(path)
    # built normally (so derived buffers such as rotary tables exist), then overwritten
    if "factory" in info:
        model = load_factory(info["factory"]).to(device or "cpu")
    else:
        model = build_model(info["model"], seed=0, device=device, **info["model_config"])
    weights = Path(path) if _single_file(path) else Path(path) / WEIGHTS
    load_model(model, str(weights), strict=True, device=str(device or "cpu"))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()
