"""Pass infrastructure in the style of torch.fx.passes.infra: a pass maps a GraphModule to a
result saying whether it changed anything; a small manager runs a list of them and counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    detail: str = ""


GraphPass = Callable[[fx.GraphModule], PassResult]


def run_passes(
    gm: fx.GraphModule, passes: Sequence[GraphPass]
) -> tuple[fx.GraphModule, list[tuple[str, PassResult]]]:
    """Run passes in order; returns the final module and each pass's result, by name."""
    results = []
    for p in passes:
        result = p(gm)
        gm = result.graph_module
        results.append((getattr(p, "__name__", type(p).__name__), result))
    return gm, results
