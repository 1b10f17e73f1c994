"""Write a transform's kernel choices into its rewritten graph's calls.

The layer ops (``kernels.layer_ops``) and the decode attention (``kernels.attention``) choose their
kernels from keyword arguments; :func:`lower` gives every such call in a rewritten model the
arguments its ``LoweringOptions`` ask for (``batched_linear(x, w, gemv = True, pdl = True)``), so
the choice belongs to the transform, shows in the graph's code, and two transforms in one process
can differ. :func:`restricted` narrows a model's choices for one block (an ONNX export: no
kernel) and puts them back afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx

from .. import markers
from ..kernels.layer_ops import (
    batched_linear,
    batched_linear_dynamic,
    layer_marked,
    layer_matmul,
    linear_lowering,
    matmul_lowering,
)
from ..options import LoweringOptions
from .graph_utils import graph_modules

NO_KERNELS = LoweringOptions(
    gemv_kernel=False,
    attention_kernel=False,
    decode_attention=False,
    decode_attention_in_layers=False,
    pdl=False,
)
"""Plain ATen ops everywhere (an ONNX export, a package for a runtime without Triton)."""

_LAYER_OPS: dict[Callable[..., Any], markers.Lowering] = {
    batched_linear: linear_lowering,
    batched_linear_dynamic: linear_lowering,
    layer_matmul: matmul_lowering,
}


def _lowered(node: fx.Node) -> tuple[Callable[..., Any], markers.Lowering] | None:
    """The function a call runs and its options-to-arguments map, for calls that choose kernels."""
    if node.op != "call_function":
        return None
    if node.target in _LAYER_OPS:
        return node.target, _LAYER_OPS[node.target]
    if node.target is layer_marked:
        marked = markers.MARKED[node.args[0]]
        if marked.layer_function is not None:
            return marked.layer_function, marked.layer_lowering
        return marked.function, marked.lowering
    for marked in markers.MARKED.values():  # an inlined marker op (``passes.cleanup``)
        if node.target is marked.function:
            return marked.function, marked.lowering
    return None


Rewrite = Callable[[fx.Node, Callable[..., Any], markers.Lowering], dict[str, Any]]


def _rewrite(gm: torch.nn.Module, new_kwargs: Rewrite) -> int:
    """Give every kernel-choosing call in ``gm`` and its graphs ``new_kwargs(node, function,
    lowering)`` as its keyword arguments; returns how many calls."""
    count = 0
    for module in graph_modules(gm):
        changed = False
        for node in module.graph.nodes:
            found = _lowered(node)
            if found is not None:
                node.kwargs = new_kwargs(node, *found)
                changed = True
                count += 1
        if changed:
            module.recompile()
    return count


def lower(gm: torch.nn.Module, options: LoweringOptions) -> int:
    """Every kernel-choosing call in ``gm`` (and its solve's graphs) gets ``options``' choices as
    keyword arguments, in place; returns how many calls."""
    return _rewrite(gm, lambda node, _, lowering: {**node.kwargs, **lowering(options)})


@contextlib.contextmanager
def restricted(gm: torch.nn.Module, limit: LoweringOptions) -> Iterator[None]:
    """Inside the block, each kernel-choosing call of ``gm`` uses a kernel only where it did and
    ``limit`` allows it too (``LoweringOptions(gemv_kernel=False)``: no kernel at all); the
    calls' arguments are restored afterwards. For exporting a transformed model whose lowering
    the export cannot carry, without transforming it again."""
    saved: dict[fx.Node, dict[str, Any]] = {}

    def narrowed(node: fx.Node, function: Callable[..., Any], lowering: markers.Lowering) -> dict[str, Any]:
        saved[node] = dict(node.kwargs)
        params = inspect.signature(function).parameters
        allowed = {k: bool(node.kwargs.get(k, params[k].default)) and v for k, v in lowering(limit).items()}
        return {**node.kwargs, **allowed}

    _rewrite(gm, narrowed)
    try:
        yield
    finally:
        for module in graph_modules(gm):
            touched = [n for n in module.graph.nodes if n in saved]
            for node in touched:
                node.kwargs = saved[node]
            if touched:
                module.recompile()
