"""Graph clean-ups: common subexpressions merged before analysis (so that equal computations look
equal to the matcher), marker ops inlined after the rewrite."""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass

from .. import markers
from .graph_utils import graph_modules


def common_subexpressions(gm: fx.GraphModule) -> int:
    """Merge identical pure computations in ``gm``, in place: e.g. per-layer slices of one rotary
    table become one shared input instead of N equal ones that would have to be stacked at run
    time. Returns the number of nodes merged away."""
    before = len(gm.graph.nodes)
    result = CSEPass()(gm)
    new = None if result is None else result.graph_module
    if result is None or not isinstance(new, fx.GraphModule) or not result.modified:
        return 0
    # CSEPass builds a fresh GraphModule; keep the captured module (pytree specs, guards) and
    # move the new graph into it.
    new.graph._codegen = gm.graph._codegen
    gm.graph = new.graph
    gm.recompile()
    return before - len(gm.graph.nodes)


def drop_unused_outputs(gm: fx.GraphModule) -> int:
    """Erase unread ``getitem`` picks of multi-output ops (e.g. the indices of ``max(dim)`` when
    only its values are used, as in GPT-OSS's attention), in place: they read a layer's
    intermediate value without using it. Returns the number of nodes erased."""
    dead = [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem and not n.users
    ]
    for n in dead:
        gm.graph.erase_node(n)
    if dead:
        gm.recompile()
    return len(dead)


def inline_marker_ops(gm: fx.GraphModule) -> int:
    """Replace every marker op (``markers``) left in ``gm`` and its submodules by the function it
    stands for, which exports and compiles as its own ops (or its kernel, where one applies).
    Returns the number of ops replaced."""
    count = 0
    for module in graph_modules(gm):
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in markers.MARKED:
                node.target = markers.MARKED[node.target].function
                changed = True
                count += 1
        if changed:
            module.recompile()
    return count
