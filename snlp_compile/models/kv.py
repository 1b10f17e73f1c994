"""KV-cached steps of the reference models: attention over an explicit, preallocated cache.

A cached step reads tokens ``idx`` (B, T) at positions ``pos .. pos+T-1`` and caches
``k_cache, v_cache`` of shape (L, B, H_kv, T_max, D) that hold the keys/values of positions
``< pos``. It returns the logits and the keys/values of the T new tokens at every layer,
(L, B, H_kv, T, D), and never writes the cache itself: the caller does (``write_cache``), outside
the captured graph. That keeps the step functional (no input mutation under torch.export,
torch.compile or a CUDA graph) and makes each layer's new K/V a value the layer hands to the rest
of the model, which the compiler returns from the layer-parallel solve.

The models call the attention over the cache as an op of the kernel library,
``kernels.attention.cached_attention`` (re-exported here): the ops, or on a GPU for one new token
a fused kernel, and while ``transform()`` captures one op the batching pass turns into one call
over all layers. This module holds the cache protocol: its shapes, ``new_cache``, ``write_cache``
and ``CachedStep``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..kernels.attention import attention_ops, cached_attention, layer_cached_attention

__all__ = [
    "CachedStep",
    "attention_bias",
    "attention_ops",
    "cache_shape",
    "cached_attention",
    "layer_cached_attention",
    "max_positions",
    "new_cache",
    "write_cache",
]


def attention_bias(
    pos: torch.Tensor, t_new: int, t_max: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive mask (t_new, t_max + t_new): cache slots < pos and causal among the new tokens are 0,
    everything else -inf. float32 by default: added to bf16 scores it also promotes the softmax."""
    device = pos.device
    cache_ok = (torch.arange(t_max, device=device) < pos).unsqueeze(0).expand(t_new, t_max)
    new_ok = torch.ones(t_new, t_new, dtype=torch.bool, device=device).tril()
    ok = torch.cat([cache_ok, new_ok], dim=1)
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))


class CachedStep(nn.Module):
    """The model's KV-cached step as a module whose forward is the step, so transform() and
    torch.export capture it: forward(idx, pos, k_cache, v_cache) -> (logits, new_k, new_v)."""

    model: Any  # any module with forward_cached: a reference model or the transformers adapter

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_cached"):
            raise TypeError(f"{type(model).__name__} has no forward_cached(idx, pos, k_cache, v_cache)")
        self.model = model
        self.training = model.training  # the wrapper in the model's mode (its own flag only)

    def forward(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_cached(idx, pos, k_cache, v_cache)


def cache_shape(model: nn.Module, batch: int, max_len: int) -> tuple[int, int, int, int, int]:
    """(L, B, H_kv, T_max, D) of one of the two caches of a reference model (or of the
    `transformers` adapter, models.hf_decode, whose config gives head_dim)."""
    cfg: Any = model.config  # (a reference model's config dataclass or the adapter's HFStepConfig)
    n_kv = getattr(cfg, "n_kv_head", cfg.n_head)
    head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
    return (cfg.n_layer, batch, n_kv, max_len, head_dim)


def max_positions(model: nn.Module) -> int:
    """The longest sequence the model's position tables cover."""
    cfg: Any = model.config
    return int(getattr(cfg, "sequence_len", None) or cfg.block_size)


def new_cache(
    model: nn.Module,
    batch: int,
    max_len: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (k_cache, v_cache) for ``batch`` sequences of up to ``max_len`` tokens."""
    if max_len > max_positions(model):
        raise ValueError(f"max_len={max_len} exceeds the model's {max_positions(model)} positions")
    ref = next(model.parameters())
    shape = cache_shape(model, batch, max_len)
    kw: dict[str, Any] = {"device": device or ref.device, "dtype": dtype or ref.dtype}
    return torch.zeros(shape, **kw), torch.zeros(shape, **kw)


def write_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor
) -> None:
    """Write a step's new keys/values (L, B, Hkv, T, D) at positions pos .. pos+T-1, in place.

    ``pos`` is a device tensor, so this neither synchronises nor depends on a Python int (it can be
    captured in a CUDA graph together with the step). One new token (a decode step) indexes with a
    view of ``pos`` itself: no index kernels (arange, add) before the two copies."""
    if new_k.shape[3] == 1 and isinstance(pos, torch.Tensor) and pos.dtype == torch.long:
        positions = pos.reshape(1)
    else:
        positions = pos + torch.arange(new_k.shape[3], device=new_k.device)
    k_cache.index_copy_(3, positions, new_k.to(k_cache.dtype))
    v_cache.index_copy_(3, positions, new_v.to(v_cache.dtype))
