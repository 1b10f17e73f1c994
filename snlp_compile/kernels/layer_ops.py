"""The layer ops the batched layer body calls: linears over stacked weights, products of two
layer-batched activations, attention and marker ops with the layer axis folded into the batch.

The batching pass (``passes.batch_layers``) emits these functions by name, and the lowering pass
(``passes.lowering``) gives each call its transform's kernel choices as keyword arguments
(``gemv=``, ``pdl=``, from ``SNLPConfig.lowering``; :func:`linear_lowering`,
:func:`matmul_lowering`), so a rewritten graph's code says which layer op runs and what it may
use. Called without them (tests, benchmarks, the training graphs) they take the process defaults,
``options.ENVIRONMENT``. The layer-batched GEMV kernel (``layer_gemv``) runs where it is asked for,
on a GPU with Triton and few rows per layer; else plain ATen ops (CPUs, ONNX exports).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch

from .. import markers
from ..options import ENVIRONMENT, LoweringOptions
from . import layer_gemv


def linear_lowering(options: LoweringOptions) -> dict[str, bool]:
    """The keyword arguments of :func:`batched_linear` (and ``_dynamic``) for ``options``."""
    return {"gemv": options.gemv_kernel, "pdl": options.pdl}


def matmul_lowering(options: LoweringOptions) -> dict[str, bool]:
    """The keyword arguments of :func:`layer_matmul` for ``options``: the kernel for the attention
    products only where it is on for the linears too (``gemv_kernel=False`` turns every kernel off)."""
    return {"gemv": options.gemv_kernel and options.attention_kernel, "pdl": options.pdl}


_LINEAR = linear_lowering(ENVIRONMENT)
_MATMUL = matmul_lowering(ENVIRONMENT)


def views_as_batch(t: torch.Tensor, lead: int) -> bool:
    """Whether t's first ``lead`` dims flatten into one without a copy (strides nest)."""
    dims = [(n, st) for n, st in zip(t.shape[:lead], t.stride()[:lead]) if n != 1]
    return all(st == nxt_n * nxt_st for (_, st), (nxt_n, nxt_st) in pairwise(dims))


def layer_matmul(
    a: torch.Tensor, b: torch.Tensor, *, gemv: bool = _MATMUL["gemv"], pdl: bool = _MATMUL["pdl"]
) -> torch.Tensor:
    """``a @ b`` of two layer-batched activations, e.g. a decode step's attention products
    (queries times the cached keys, probabilities times the cached values).

    With the same leading dims, few rows per product and b's batch dims flattening without a copy,
    on a GPU it is the layer-batched GEMV kernel over ``b`` transposed, read through its strides.
    ATen's ``bmm`` adds a memset and a copy of the one-row operand per product; its kernels are
    as fast or faster (~1-3 us on the values product), but in a CUDA-graphed 0.5B step the two
    launches fewer win: 0.174 -> 0.163 ms (run 9, BENCHMARKS.md). Everything else, exports, CPUs
    and ``gemv=False`` (``LoweringOptions.attention_kernel``) take ``torch.matmul``."""
    lead = a.dim() - 2
    if (
        gemv
        and a.is_cuda  # (before any flattening: CPUs take torch.matmul as they are)
        and lead >= 1
        and b.dim() == a.dim()
        and a.shape[:-2] == b.shape[:-2]
        and views_as_batch(b, lead)
    ):
        w = b.transpose(-1, -2).flatten(0, lead - 1)
        x = a.flatten(0, lead - 1)
        if layer_gemv.applies(x, w):
            return layer_gemv.gemv(x, w, pdl, weights_constant=False).unflatten(0, a.shape[:-2])
    return torch.matmul(a, b)


def batched_linear(
    x: torch.Tensor, w: torch.Tensor, *, gemv: bool = _LINEAR["gemv"], pdl: bool = _LINEAR["pdl"]
) -> torch.Tensor:
    """x (N, ..., I) times stacked weights w (N, O, I): one batched matmul for all layers.

    With ``gemv`` and few rows per layer on a GPU (decoding) it is the layer-batched GEMV kernel
    (``snlp_compile.kernels``), which reads the weights closer to the bytes floor than cuBLAS'
    batched GEMM and copies no operand; CPUs and ONNX exports take the einsum. w is a
    transform-time constant (the solve's stacked weights): launched with PDL (``pdl``, on Hopper
    and newer), the kernel streams its first weight tiles before waiting for the kernel before it."""
    return _linear(x, w, True, gemv, pdl)


def batched_linear_dynamic(
    x: torch.Tensor, w: torch.Tensor, *, gemv: bool = _LINEAR["gemv"], pdl: bool = _LINEAR["pdl"]
) -> torch.Tensor:
    """:func:`batched_linear` with weights computed when the graph runs (read only after the
    kernel before it has finished)."""
    return _linear(x, w, False, gemv, pdl)


def _linear(x: torch.Tensor, w: torch.Tensor, weights_constant: bool, gemv: bool, pdl: bool) -> torch.Tensor:
    if gemv and layer_gemv.applies(x, w):
        rows = x.shape[1:-1]
        y = layer_gemv.gemv(x.reshape(x.shape[0], -1, x.shape[-1]), w, pdl, weights_constant)
        return y.reshape(x.shape[0], *rows, w.shape[1])
    return torch.einsum("n...i,noi->n...o", x, w)


def layer_attention(
    op: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Attention over (N, B, ...) inputs with the layer axis folded into the batch axis: the fused
    kernels (flash, memory-efficient) and ONNX export take 4-D q/k/v only."""
    out = op(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *args, **kwargs)
    return out.unflatten(0, (q.shape[0], q.shape[1]))


def layer_marked(op: Any, *args: Any, **lowering: bool) -> Any:
    """The function a marker op stands for (``markers``, by its op: the graph's code names an op,
    not a Python function) over all layers at once: the layer axis of its batched arguments is
    folded into their batch axis, one call, and unfolded from the result. ``lowering``: its kernel
    choices (``Marked.layer_lowering``), passed on."""
    marked = markers.MARKED[op]
    lead = args[marked.folded[0]].shape[:2]
    flat = [a.flatten(0, 1) if i in marked.folded else a for i, a in enumerate(args)]
    return (marked.layer_function or marked.function)(*flat, **lowering).unflatten(0, lead)


def fold_batched_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A per-layer mask (N, B or 1, ...) as (N*B or N, ...), matching the folded q."""
    return mask.expand(n, *mask.shape[1:]).flatten(0, 1)


def fold_shared_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A mask shared by all layers whose batch dim is B: repeated per layer as (N*B, ...)."""
    return mask.unsqueeze(0).expand(n, *mask.shape).flatten(0, 1)
