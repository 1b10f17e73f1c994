"""Every ``snlp::`` custom op, defined and registered in one place.

The kernel modules hold the Triton kernels and their launch functions (``layer_gemv.launch``,
``decode_attention.launch``); this module makes them ops PyTorch can trace, compile and capture
in CUDA graphs, with fake implementations for shape propagation, and registers the marker op of a
decode step's attention with ``markers`` (capture keeps it whole, the batching pass folds it).

Which ops an AOTInductor package can carry is stated here too (:data:`TRITON_OPS`): a
``triton_op``'s kernels are compiled into the package; an opaque custom op needs this project
imported wherever the package is loaded.
"""

from __future__ import annotations

import torch

from .. import markers
from . import decode_attention, layer_gemv
from .attention import (
    attention_lowering,
    cached_attention,
    layer_attention_lowering,
    layer_cached_attention,
)

TRITON_OPS = frozenset({"snlp::layer_gemv"})
"""``torch.library.triton_op``s: Inductor traces into their Triton kernels, so AOTInductor
compiles them into a package (``export.aoti``)."""

OPAQUE_OPS = frozenset({"snlp::layer_gemv_pdl", "snlp::decode_attention", "snlp::cached_attention"})
"""Opaque custom ops: a graph calling them runs only where this project registers them."""


@torch.library.custom_op("snlp::cached_attention", mutates_args=())
def _cached_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """``attention.cached_attention`` as one node of a captured graph (``markers``); run, it is that."""
    with markers.keep_whole(False):
        return cached_attention(q, k, v, k_cache, v_cache, bias)


@_cached_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, bias):
    return q.new_empty(q.shape)


# q, k, v and both caches carry the batch; the bias row is shared
markers.register(
    torch.ops.snlp.cached_attention.default,
    cached_attention,
    folded=(0, 1, 2, 3, 4),
    layer_function=layer_cached_attention,
    lowering=attention_lowering,
    layer_lowering=layer_attention_lowering,
)


if layer_gemv.triton is not None:
    # a name of this module: torch finds a triton_op's kernels (for AOTInductor) by the names its
    # body passes ``wrap_triton``, looked up in the function's globals
    _layer_gemv_tuned = layer_gemv._layer_gemv_tuned

    @torch.library.triton_op("snlp::layer_gemv", mutates_args={})
    def _layer_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, R, I), w (N, O, I) -> (N, R, O), R <= MAX_ROWS, float16/bfloat16/float32."""
        return layer_gemv.launch(torch.library.wrap_triton(_layer_gemv_tuned), x, w)

    @torch.library.custom_op("snlp::layer_gemv_pdl", mutates_args=())
    def _layer_gemv_pdl(x: torch.Tensor, w: torch.Tensor, early_weights: bool) -> torch.Tensor:
        """``layer_gemv`` launched with programmatic dependent launch (Hopper and newer): it starts
        while the kernel before it finishes and, with ``early_weights`` (w a constant no kernel
        writes: stacked weights, not a cache), streams its first weight tiles meanwhile.

        An opaque custom op, not a ``triton_op``: Inductor launches the kernels of a triton_op
        itself, without the launch attribute PDL needs, so this op launches its own (Inductor
        calls it like an ATen kernel; inside a CUDA graph the launch costs nothing extra)."""
        return layer_gemv.launch(_layer_gemv_tuned, x, w, pdl=True, early_weights=early_weights)

    @_layer_gemv_pdl.register_fake
    def _layer_gemv_pdl_fake(x: torch.Tensor, w: torch.Tensor, early_weights: bool) -> torch.Tensor:
        return x.new_empty((x.shape[0], x.shape[1], w.shape[1]))


if decode_attention.triton is not None:

    @torch.library.custom_op("snlp::decode_attention", mutates_args=())
    def _decode_attention(
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
        pdl: bool,
    ) -> torch.Tensor:
        """See ``decode_attention.launch``. An opaque custom op (not a ``triton_op``) so that it
        can launch with PDL, as ``layer_gemv_pdl`` does."""
        return decode_attention.launch(q, k_new, v_new, k_cache, v_cache, bias, scale, pdl=pdl)

    @_decode_attention.register_fake
    def _decode_attention_fake(q, k_new, v_new, k_cache, v_cache, bias, scale, pdl):
        return torch.empty_like(q, memory_format=torch.contiguous_format)
