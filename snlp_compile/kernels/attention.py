"""The attention of a KV-cached step as an op of the kernel library: reference ops, the fused
decode kernel, and the marker op that capture keeps whole.

Attention reads the cache once, without copying it: scores against the whole cache (slots at and
after ``pos`` masked out by an additive bias, ``models.kv.attention_bias``) are concatenated with
causal scores among the new tokens, one softmax, two products. Grouped-query heads are handled by
folding the query groups into the query rows, so the cache is never repeated either. On a GPU,
one new token's attention in the model as written is one fused kernel (``decode_attention``)
instead of those ops. While ``transform()`` captures, :func:`cached_attention` is recorded as one
op, ``snlp::cached_attention`` (defined and registered with ``markers`` in ``kernels.ops``), which
the batching pass turns into one call over all layers (:func:`layer_cached_attention`).

Kernel choices are keyword arguments: a rewritten graph passes its transform's
(:func:`attention_lowering`, :func:`layer_attention_lowering`, from ``SNLPConfig.lowering``); the
model as written calls :func:`cached_attention` without them, taking the process defaults
(``options.ENVIRONMENT``), or gives its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import markers
from ..options import ENVIRONMENT, LoweringOptions
from . import decode_attention
from .layer_gemv import pdl_supported
from .layer_ops import layer_matmul


def attention_lowering(options: LoweringOptions) -> dict[str, bool]:
    """The keyword arguments of :func:`cached_attention` for ``options``: the fused kernel where
    ``decode_attention`` is on and the GEMV kernel too (``gemv_kernel=False`` turns every kernel off)."""
    return {"fused": options.decode_attention and options.gemv_kernel, "pdl": options.pdl}


def layer_attention_lowering(options: LoweringOptions) -> dict[str, bool]:
    """The keyword arguments of :func:`layer_cached_attention` for ``options``: fused only where
    ``decode_attention_in_layers`` asks for it; else the cache products on the GEMV kernel where
    ``attention_kernel`` is on."""
    fused = attention_lowering(options)["fused"] and options.decode_attention_in_layers
    gemv = options.gemv_kernel and options.attention_kernel
    return {"fused": fused, "gemv": gemv, "pdl": options.pdl}


_DEFAULT = attention_lowering(ENVIRONMENT)
_LAYER_DEFAULT = layer_attention_lowering(ENVIRONMENT)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
    *,
    fused: bool = _DEFAULT["fused"],
    pdl: bool = _DEFAULT["pdl"],
) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over the cache (B, Hkv, Tmax, D) plus the new k/v
    (B, Hkv, T, D); ``bias`` from :func:`attention_bias`. Returns (B, H, T, D).

    With ``fused``, one new token on a GPU runs the fused decode-attention kernel (launched with
    PDL where ``pdl`` and the GPU allow); everything else, exports included, the ops of
    :func:`attention_ops`. While ``transform()`` captures, this is one op (``markers``). ``matmul``
    other than ``torch.matmul`` always takes the ops with it
    (``benchmarks/attention_lowering.py`` swaps their lowering)."""
    if matmul is torch.matmul and markers.keeping_whole():
        return torch.ops.snlp.cached_attention(q, k, v, k_cache, v_cache, bias)
    if fused and matmul is torch.matmul and decode_attention.applies(q, k, k_cache, v_cache, bias):
        return decode_attention.attention(q, k, v, k_cache, v_cache, bias, pdl and pdl_supported(q))
    return attention_ops(q, k, v, k_cache, v_cache, bias, matmul)


def attention_ops(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> torch.Tensor:
    """:func:`cached_attention` as tensor ops; ``matmul`` computes the two products over the cache.

    The softmax over [cache | new] is written as two exponentials against a shared row maximum
    and one denominator, so neither the scores nor the probabilities are concatenated or sliced
    (no copies around the two cache products); at T = 1 the new token's score and value are a dot
    product and a scaled add instead of two tiny matrix products."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    t_max = k_cache.shape[2]
    scale = d**-0.5
    qg = q.reshape(b, hkv, rep * t, d)  # query heads of one kv head become rows
    s_cache = matmul(qg, k_cache.transpose(-1, -2)) * scale
    s_new = (qg * k).sum(-1, keepdim=True) * scale if t == 1 else (qg @ k.transpose(-1, -2)) * scale
    # scores in at least float32 (bias is float32): bf16 exponentials lose the small probabilities
    s_cache = s_cache.view(b, hkv, rep, t, t_max) + bias[:, :t_max]
    s_new = s_new.view(b, hkv, rep, t, t) + bias[:, t_max:]
    s_cache = s_cache.to(torch.promote_types(s_cache.dtype, torch.float32))
    s_new = s_new.to(s_cache.dtype)
    row_max = torch.maximum(s_cache.amax(-1, keepdim=True), s_new.amax(-1, keepdim=True))
    e_cache = torch.exp(s_cache - row_max)
    e_new = torch.exp(s_new - row_max)
    denom = (e_cache.sum(-1, keepdim=True) + e_new.sum(-1, keepdim=True)).view(b, hkv, rep * t, 1)
    out = matmul(e_cache.to(q.dtype).view(b, hkv, rep * t, t_max), v_cache)
    if t == 1:
        out = out + e_new.to(q.dtype).view(b, hkv, rep, 1) * v
    else:
        out = out + e_new.to(q.dtype).view(b, hkv, rep * t, t) @ v
    return (out / denom).to(q.dtype).view(b, h, t, d)


def layer_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
    *,
    fused: bool = _LAYER_DEFAULT["fused"],
    gemv: bool = _LAYER_DEFAULT["gemv"],
    pdl: bool = _LAYER_DEFAULT["pdl"],
) -> torch.Tensor:
    """:func:`cached_attention` in the rewritten step, every layer folded into the batch: the ops,
    the two cache products on the layer-batched GEMV kernel (``gemv``: ``layer_matmul``). Inside
    the step's CUDA graph they take as long as the fused kernel (0.5B: 28.3 vs 27.6 us), because
    Inductor fuses the softmax with the bias and the products launch with PDL; the opaque fused
    kernel instead needs its bias and operands materialised (two to three small kernels) and
    breaks the PDL overlap, so the step is slower with it (0.136 vs 0.127 ms; BENCHMARKS.md, run
    14). ``fused`` (``LoweringOptions.decode_attention_in_layers``, ``SNLP_DECODE_ATTENTION=all``)
    takes the fused kernel here too."""
    if fused:
        return cached_attention(q, k, v, k_cache, v_cache, bias, fused=True, pdl=pdl)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return layer_matmul(a, b, gemv=gemv, pdl=pdl)

    return attention_ops(q, k, v, k_cache, v_cache, bias, matmul)
