"""Graph clean-ups run before analysis, so that equal computations look equal to the matcher."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass

from .infra import PassResult


def common_subexpressions(gm: fx.GraphModule) -> PassResult:
    """Merge identical pure computations: e.g. per-layer slices of one rotary table become one
    shared input instead of N equal ones that would have to be stacked at run time."""
    before = len(gm.graph.nodes)
    result = CSEPass()(gm)
    new = result.graph_module
    if not isinstance(new, fx.GraphModule) or not result.modified:
        return PassResult(gm, False)
    # CSEPass builds a fresh GraphModule; keep the captured module (pytree specs, guards) and
    # move the new graph into it.
    new.graph._codegen = gm.graph._codegen
    gm.graph = new.graph
    gm.recompile()
    return PassResult(gm, True, f"{before - len(gm.graph.nodes)} nodes merged")
