"""Reference models the compiler is developed and tested against."""

from .gpt import GPT, GPTConfig
from .nanochat import NanochatConfig, NanochatGPT
from .registry import DEFAULT_MODEL, MODEL_NAMES, build_model, model_config

__all__ = [
    "DEFAULT_MODEL",
    "GPT",
    "MODEL_NAMES",
    "GPTConfig",
    "NanochatConfig",
    "NanochatGPT",
    "build_model",
    "model_config",
]
