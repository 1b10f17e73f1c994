"""Reference models the compiler is developed and tested against."""

from .gpt import GPT, GPTConfig
from .hf_decode import HFCachedLM
from .nanochat import NanochatConfig, NanochatGPT
from .registry import DEFAULT_MODEL, MODEL_NAMES, build_model, config_of, model_config

__all__ = [
    "DEFAULT_MODEL",
    "GPT",
    "MODEL_NAMES",
    "GPTConfig",
    "HFCachedLM",
    "NanochatConfig",
    "NanochatGPT",
    "build_model",
    "config_of",
    "model_config",
]
