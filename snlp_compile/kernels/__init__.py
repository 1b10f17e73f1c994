"""Hand-written GPU kernels the rewritten graphs call where the standard lowering is slow.

The switches below start from the environment as ``snlp_compile.options`` reads it.
``SNLP_GEMV_KERNEL=0`` in the environment (or ``set_gemv_kernel(False)``) turns the layer-batched
GEMV kernel off, so every batched linear is ``torch.einsum`` (cuBLAS) as on the CPU.
``SNLP_ATTENTION_KERNEL=0`` keeps it for the linears only: the attention products of a decode step
(``layer_ops.layer_matmul``) go back to ``torch.matmul``, for A/B timing on a GPU.
``SNLP_DECODE_ATTENTION=0`` keeps a decode step's attention as its ops instead of the fused
decode-attention kernel (``decode_attention``), for A/B timing; the default (``1``) fuses it where one
layer's attention is one call (the model as written, sequential), ``all`` also in the rewritten
step, where the ops measured faster (BENCHMARKS.md, run 13). ``SNLP_PDL=0`` launches the kernels
without programmatic dependent launch on Hopper and newer GPUs. Turning the GEMV kernel off
(``gemv_kernel(False)``, as ``export_onnx`` does) turns every kernel off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..options import ENVIRONMENT
from . import decode_attention, layer_gemv

# the process's switches, from the environment (``snlp_compile.options``)
_gemv_enabled = ENVIRONMENT.gemv_kernel
_attention_enabled = ENVIRONMENT.attention_kernel
_pdl_enabled = ENVIRONMENT.pdl
_decode_attention_enabled = ENVIRONMENT.decode_attention
_decode_attention_layers = ENVIRONMENT.decode_attention_in_layers


def gemv_kernel_enabled() -> bool:
    """Whether batched linears with few rows per layer on a GPU use ``torch.ops.snlp.layer_gemv``."""
    return _gemv_enabled and layer_gemv.available()


def attention_kernel_enabled() -> bool:
    """Whether products of two layer-batched activations with few rows (attention over a decode
    step's caches) also use the kernel: on unless ``SNLP_ATTENTION_KERNEL=0``."""
    return _attention_enabled and gemv_kernel_enabled()


def decode_attention_enabled() -> bool:
    """Whether a decode step's attention (``models.kv.cached_attention`` at one new token) runs as
    the fused kernel on a GPU: on unless ``SNLP_DECODE_ATTENTION=0`` or the GEMV kernel is off."""
    return _decode_attention_enabled and _gemv_enabled and decode_attention.available()


def decode_attention_in_layers() -> bool:
    """Whether the rewritten step's layer-batched attention also takes the fused kernel
    (``SNLP_DECODE_ATTENTION=all``); by default it keeps the ops, cache products on the GEMV kernel."""
    return _decode_attention_layers and decode_attention_enabled()


def pdl_enabled() -> bool:
    """Whether the kernel is launched with programmatic dependent launch where the GPU supports it
    (``layer_gemv.layer_gemv_pdl``): on unless ``SNLP_PDL=0``."""
    return _pdl_enabled


def set_gemv_kernel(enabled: bool) -> bool:
    """Turn the layer-batched GEMV kernel on or off for this process; returns the previous setting.
    Takes effect for graphs run eagerly from now on and for compiles made from now on."""
    global _gemv_enabled
    previous, _gemv_enabled = _gemv_enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def gemv_kernel(enabled: bool) -> Iterator[None]:
    """The kernel on or off inside a block, e.g. off while exporting to ONNX, whose opset has no
    Triton kernels (``export_onnx`` does this)."""
    previous = set_gemv_kernel(enabled)
    try:
        yield
    finally:
        set_gemv_kernel(previous)


@contextlib.contextmanager
def packaged_kernels() -> Iterator[None]:
    """Only the kernels a compiled package can carry, inside a block (``export_aoti``): the GEMV
    ``triton_op``, whose Triton kernel AOTInductor compiles into the package. The PDL launch and the
    fused decode attention are opaque custom ops; a package calling them would need this project
    imported wherever it is loaded (``Could not find schema for snlp::layer_gemv_pdl``)."""
    global _pdl_enabled, _decode_attention_enabled
    saved = (_pdl_enabled, _decode_attention_enabled)
    _pdl_enabled = _decode_attention_enabled = False
    try:
        yield
    finally:
        _pdl_enabled, _decode_attention_enabled = saved


__all__ = [
    "attention_kernel_enabled",
    "decode_attention",
    "decode_attention_enabled",
    "decode_attention_in_layers",
    "gemv_kernel",
    "gemv_kernel_enabled",
    "layer_gemv",
    "packaged_kernels",
    "pdl_enabled",
    "set_gemv_kernel",
]
