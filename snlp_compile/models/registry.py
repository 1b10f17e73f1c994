"""Named reference models: one place that says which shapes the tests, CLI and benchmarks use.

``build_model(name, **overrides)`` returns a seeded, eval-mode model; overrides replace
config fields. The big configs (d20, 0.5b) are the shapes of docs/DESIGN.md section 3; build them
on ``device="meta"`` to inspect structure or count parameters without allocating.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .gpt import GPT, GPTConfig
from .mhc import MHCGPT, MHCConfig
from .nanochat import NanochatConfig, NanochatGPT

_CONFIGS: dict[str, GPTConfig | NanochatConfig] = {
    "gpt-tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=64),
    "gpt-small": GPTConfig(vocab_size=1024, block_size=512, n_layer=8, n_head=8, n_embd=256),
    "nanochat-tiny": NanochatConfig(
        vocab_size=256, sequence_len=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=64
    ),
    "nanochat-small": NanochatConfig(
        vocab_size=512, sequence_len=256, n_layer=8, n_head=4, n_kv_head=4, n_embd=128, backout=True
    ),
    "nanochat-d20": NanochatConfig(
        vocab_size=65536, sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280
    ),
    "nanochat-0.5b": NanochatConfig(
        vocab_size=65536, sequence_len=2048, n_layer=32, n_head=10, n_kv_head=10, n_embd=640
    ),
    "gpt-0.5b": GPTConfig(vocab_size=50304, block_size=2048, n_layer=32, n_head=10, n_embd=640),
    # mHC (n = 4 hyper-connected streams): static H ("mhc-*") and per-token H ("mhc-dyn-*")
    "mhc-tiny": MHCConfig(vocab_size=256, sequence_len=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=64),
    "mhc-dyn-tiny": MHCConfig(
        vocab_size=256, sequence_len=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, dynamic=True
    ),
    "mhc-small": MHCConfig(vocab_size=512, sequence_len=256, n_layer=8, n_head=4, n_kv_head=4, n_embd=128),
    "mhc-dyn-small": MHCConfig(
        vocab_size=512, sequence_len=256, n_layer=8, n_head=4, n_kv_head=4, n_embd=128, dynamic=True
    ),
    "mhc-d20": MHCConfig(
        vocab_size=65536, sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280
    ),
    "mhc-0.5b": MHCConfig(
        vocab_size=65536, sequence_len=2048, n_layer=32, n_head=10, n_kv_head=10, n_embd=640
    ),
    "mhc-dyn-d20": MHCConfig(
        vocab_size=65536, sequence_len=2048, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280, dynamic=True
    ),
    "mhc-dyn-0.5b": MHCConfig(
        vocab_size=65536, sequence_len=2048, n_layer=32, n_head=10, n_kv_head=10, n_embd=640, dynamic=True
    ),
}

# The named presets are the compiler's reference models: their layers must do something at init, so
# they keep random output projections (NanochatConfig.zero_init_out=False); training
# (snlp_compile.train) builds them with nanochat's zero init unless told otherwise.
_CONFIGS = {
    k: dataclasses.replace(v, zero_init_out=False) if isinstance(v, NanochatConfig) else v
    for k, v in _CONFIGS.items()
}

MODEL_NAMES: tuple[str, ...] = tuple(_CONFIGS)
DEFAULT_MODEL = "nanochat-small"


def model_config(name: str, **overrides: Any) -> GPTConfig | NanochatConfig:
    """A fresh copy of the named config, with the given fields replaced."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    base = _CONFIGS[name]
    fields = [f.name for f in dataclasses.fields(base)]
    for key in overrides:
        if key not in fields:
            raise ValueError(
                f"unknown config field {key!r} for model {name!r} ({type(base).__name__}); "
                f"valid fields: {', '.join(fields)}"
            )
    return dataclasses.replace(base, **overrides)


def _construct(config: GPTConfig | NanochatConfig) -> nn.Module:
    """The model of ``config``'s class (an MHCConfig is a NanochatConfig: it is tested first)."""
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, MHCConfig):
        return MHCGPT(config)
    return NanochatGPT(config)


def config_of(model: nn.Module) -> GPTConfig | NanochatConfig:
    """The config a reference model was built from (``model.config``), typed: attribute lookup on
    an nn.Module is typed ``Tensor | Module``, so callers reading its fields need this narrowing."""
    config = getattr(model, "config", None)
    if not isinstance(config, (GPTConfig, NanochatConfig)):
        raise TypeError(
            f"{type(model).__name__} has no GPTConfig/NanochatConfig .config (got {type(config).__name__}): "
            "not a reference model of snlp_compile.models"
        )
    return config


def build_model(
    name: str,
    *,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the named model in eval() mode.

    seed: weights are drawn from a private RNG seeded with it (the global RNG is left alone),
    on the CPU, so the same seed gives the same weights on every device; None draws from the
    global RNG. device="meta" allocates nothing (weights are then undefined).
    """
    config = model_config(name, **overrides)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        with torch.device("meta"):
            model = _construct(config)
    elif seed is None:
        model = _construct(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _construct(config)
    model = model.to(device=device, dtype=dtype)
    return model.eval()
