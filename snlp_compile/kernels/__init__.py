"""Hand-written GPU kernels the rewritten graphs call where the standard lowering is slow.

``SNLP_GEMV_KERNEL=0`` in the environment (or ``set_gemv_kernel(False)``) turns the layer-batched
GEMV kernel off, so every batched linear is ``torch.einsum`` (cuBLAS) as on the CPU.
"""

from __future__ import annotations

import os

from . import layer_gemv

_gemv_enabled = os.environ.get("SNLP_GEMV_KERNEL", "1").strip().lower() not in ("0", "false", "off", "no")


def gemv_kernel_enabled() -> bool:
    """Whether batched linears with few rows per layer on a GPU use ``torch.ops.snlp.layer_gemv``."""
    return _gemv_enabled and layer_gemv.available()


def set_gemv_kernel(enabled: bool) -> bool:
    """Turn the layer-batched GEMV kernel on or off for this process; returns the previous setting.
    Takes effect for graphs run eagerly from now on and for compiles made from now on."""
    global _gemv_enabled
    previous, _gemv_enabled = _gemv_enabled, bool(enabled)
    return previous


__all__ = ["gemv_kernel_enabled", "layer_gemv", "set_gemv_kernel"]
