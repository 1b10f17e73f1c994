"""Helpers and tiny models shared by the tests: reference models in float64, tokens, error
measures, decode-step inputs and the sequential decode reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

from snlp_compile.models import build_model
from snlp_compile.models.kv import new_cache, write_cache

F64 = torch.float64

StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a cached step's (logits, new_k, new_v)


def reference_model(
    name: str, *, sinkhorn_iters: int | None = None, scaled: bool = False, **overrides: object
) -> nn.Module:
    """A registered reference model (``models.build_model``) in float64.

    sinkhorn_iters: fewer Sinkhorn iterations for the mHC models (a faster capture; exactness is
        unaffected). scaled: nanochat's resid_lambdas drawn from U(0.6, 1.4) (generator seed 3),
        so that scaled skips other than 1 are exercised."""
    if sinkhorn_iters is not None and name.startswith("mhc"):
        overrides.setdefault("sinkhorn_iters", sinkhorn_iters)
    model = build_model(name, dtype=F64, **overrides)
    if scaled and name.startswith("nanochat"):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            model.resid_lambdas.copy_(
                0.6 + 0.8 * torch.rand(model.resid_lambdas.shape, generator=g, dtype=F64)
            )
    return model


def tiny_llama(seed: int | None = 0, **overrides: object) -> nn.Module:
    """A random transformers LlamaForCausalLM in eval mode (3 layers, d=32, 4 heads, 2 kv heads,
    vocab 64; ``overrides`` change LlamaConfig fields), its weights drawn after
    ``torch.manual_seed(seed)`` (None: from the global generator as it stands). Skips the test
    where transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    fields: dict[str, object] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**{**fields, **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(model: nn.Module, batch: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    """Token ids (batch, t) for ``model``, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements."""
    return float((a - b).norm() / b.norm())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, the one number every tolerance in the decode tests is checked on."""
    return float((a - b).abs().max())


def step_inputs(
    model: nn.Module, batch: int = 2, t_max: int = 24, pos: int = 9, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's inputs with a cache holding random (non-zero) keys/values before ``pos``, so a
    step that ignored the cache would not pass; ``seed`` draws from its own generator, else the global one."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    k_cache, v_cache = new_cache(model, batch, t_max)
    k_cache[:, :, :, :pos] = torch.randn(k_cache[:, :, :, :pos].shape, generator=g, dtype=k_cache.dtype)
    v_cache[:, :, :, :pos] = torch.randn(v_cache[:, :, :, :pos].shape, generator=g, dtype=v_cache.dtype)
    idx = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    return idx, torch.tensor(pos), k_cache, v_cache


def prefill_then_decode(
    model: nn.Module, idx: torch.Tensor, prompt: int, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> Iterator[StepOut]:
    """Prefill ``idx[:, :prompt]``, then decode the rest of ``idx`` token by token through
    ``model.forward_cached``, the sequential reference the cached steps are checked against.

    Yields each step's output *before* writing its K/V into the caches (written when the generator is
    resumed), so a test can check a step, or the still-unwritten cache, between steps; consume it to
    the end to have every step written. Run it under ``torch.no_grad()``."""
    spans = [(0, prompt), *((t, t + 1) for t in range(prompt, idx.shape[1]))]
    for start, stop in spans:
        pos = torch.tensor(start)
        out = model.forward_cached(idx[:, start:stop], pos, k_cache, v_cache)
        yield out
        write_cache(k_cache, v_cache, out[1], out[2], pos)
