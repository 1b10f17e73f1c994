"""Which model a training or evaluation run starts from: a built-in registry name, a user factory
``'package.module:function'``, a local `transformers` folder or config.json, or a module given
directly; with the model's own tokenizer when its folder has one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from ..errors import SNLPConfigError
from .data import Tokenizer
from .hf_folder import folder_tokenizer, is_transformers_path, load_transformers

SourceKind = Literal["registry", "factory", "transformers", "module"]


@dataclass
class ModelSource:
    """A resolved model. name: what the user gave (registry name, factory, folder path, class name);
    tokenizer: the model's own (a transformers folder's), None when it brings none;
    folder: the transformers folder, whose tokenizer files a checkpoint copies."""

    model: nn.Module
    name: str
    kind: SourceKind
    tokenizer: Tokenizer | None = None
    folder: Path | None = None


def load_factory(spec: str) -> nn.Module:
    """Call ``'package.module:function'`` and check that it returns an ``nn.Module``."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SNLPConfigError(f"model {spec!r}: cannot load {attr!r} from {module_name!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise SNLPConfigError(
            f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return model


def resolve_model(spec: str | Path | nn.Module, *, seed: int = 0) -> ModelSource:
    """The model ``spec`` names (a registry model is built with seeded random weights)."""
    if isinstance(spec, nn.Module):
        return ModelSource(spec, type(spec).__name__, "module")
    text = str(spec)
    if is_transformers_path(text):
        folder = Path(text) if Path(text).is_dir() else Path(text).parent
        model = load_transformers(text, seed=seed)
        return ModelSource(model, text, "transformers", folder_tokenizer(folder), folder)
    if Path(text).exists():
        raise SNLPConfigError(
            f"model {text!r}: not a transformers folder or config.json (config.json with a model_type) "
            "nor an snlp-compile checkpoint"
        )
    if ":" in text:
        return ModelSource(load_factory(text), text, "factory")
    if "/" in text or text.startswith("."):
        raise SNLPConfigError(f"model {text!r}: no such file or folder")
    from ..models import MODEL_NAMES, build_model

    if text not in MODEL_NAMES:
        raise SNLPConfigError(
            f"model {text!r}: not a built-in name ({', '.join(MODEL_NAMES)}), 'module.path:factory', "
            "nor an existing transformers folder"
        )
    return ModelSource(build_model(text, seed=seed), text, "registry")
