"""Checkpoints of trained reference models: weights in safetensors, everything else in JSON.

A checkpoint is a folder with ``model.safetensors`` and ``config.json`` (the registry name and the
full model config, the tokenizer, how it was trained and what it measured), so
``load_checkpoint(folder)`` rebuilds an ordinary ``nn.Module`` that ``transform()`` accepts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "snlp_compile.checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str, **meta: Any) -> Path:
    """Write ``model`` (a registry model named ``model_name``) and JSON-serialisable ``meta``."""
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise TypeError(
            f"save_checkpoint needs a reference model with a dataclass .config, got {type(model).__name__}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS))
    info = {"format": FORMAT, "model": model_name, "model_config": dataclasses.asdict(config), **meta}
    (folder / CONFIG).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return folder


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint folder: {CONFIG} is missing")
    info = json.loads(file.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{file} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def load_checkpoint(path: str | Path, *, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a saved reference model (eval mode) with its trained weights."""
    from safetensors.torch import load_model

    info = read_checkpoint_info(path)
    # built normally (so derived buffers such as rotary tables exist), then overwritten
    model = build_model(info["model"], seed=0, device=device, **info["model_config"])
    load_model(model, str(Path(path) / WEIGHTS), strict=True, device=str(device or "cpu"))
    return model.eval()
