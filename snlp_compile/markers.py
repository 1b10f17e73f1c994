"""Ops that capture keeps whole, so that a pass can rewrite them as one node.

``transform()`` captures a model with torch.export, which records the ATen ops a function runs.
A few functions of ours have a faster lowering than their ops (``models.kv.cached_attention``: one
fused kernel instead of four); they check :func:`keeping_whole` and, while capture runs, call a
custom op that stands for the whole function. The batching pass maps that op to a layer-batched
call, and ``transform()`` replaces any op left in the graph by the function itself, so the
rewritten graph exports to ONNX and compiles as before. Outside capture nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .options import LoweringOptions

_keep_whole = False


def keeping_whole() -> bool:
    """Whether the functions that have a marker op should emit it (true only while capturing)."""
    return _keep_whole


@contextlib.contextmanager
def keep_whole(enabled: bool = True) -> Iterator[None]:
    """Inside the block, marked functions emit their marker op (``passes.capture`` uses this);
    ``keep_whole(False)``: they run as themselves (a marker op's own implementation)."""
    global _keep_whole
    previous, _keep_whole = _keep_whole, enabled
    try:
        yield
    finally:
        _keep_whole = previous


Lowering = Callable[[LoweringOptions], dict[str, bool]]
"""A transform's ``LoweringOptions`` as the keyword arguments its rewritten graph passes a function."""


def _no_lowering(options: LoweringOptions) -> dict[str, bool]:
    return {}


@dataclass(frozen=True)
class Marked:
    """A function with a marker op: ``folded`` are the positions of its arguments that carry the
    batch as their first dim (the batching pass folds the layer axis into it); the others are
    shared by the whole batch. ``layer_function``, if given, is what the batching pass calls on
    the folded arguments instead of ``function`` (a lowering measured faster for all layers).
    ``lowering`` / ``layer_lowering``: the keyword arguments (kernel choices) a rewritten graph
    passes ``function`` / ``layer_function`` for a transform's options (``passes.lowering``)."""

    function: Callable[..., Any]
    folded: tuple[int, ...]
    layer_function: Callable[..., Any] | None = None
    lowering: Lowering = _no_lowering
    layer_lowering: Lowering = _no_lowering


MARKED: dict[Any, Marked] = {}


def register(
    op: Any,
    function: Callable[..., Any],
    folded: tuple[int, ...],
    layer_function: Callable[..., Any] | None = None,
    lowering: Lowering = _no_lowering,
    layer_lowering: Lowering = _no_lowering,
) -> None:
    """Record that the captured op ``op`` (an OpOverload) stands for ``function``."""
    MARKED[op] = Marked(function, folded, layer_function, lowering, layer_lowering)
