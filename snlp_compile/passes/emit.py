"""Emit: replace the parallel layers' regions in the captured graph by one call to the solve.

The solve is built from a ``SolvePlan`` (``passes.plan``); nothing is decided here.

The top-level graph keeps everything before the chain (embedding, sequential prefix layers, the
externals the layers read) as it was, calls ``snlp_solve`` once, reads the solved trace where the
original read hidden states (final norm, backout readers), and keeps the suffix as it was.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir.chain import LayerChain
from ..ir.plan import SOLVE_NAME, SolvePlan
from ..solve.solver import LayerParallelSolve
from .graph_utils import descendants

aten = torch.ops.aten


def _as_layer_slice(graph: fx.Graph, column: list[fx.Node], env: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """``select(X, 0, i), select(X, 0, i+1), ...`` as one view ``X[i : i+N]``, which saves
    torch.stack copying (e.g.) a stacked KV cache on every call; None for any other column."""
    first = column[0]
    if not all(c.op == "call_function" and c.target is aten.select.int and len(c.args) == 3 for c in column):
        return None
    src, dim, start = first.args
    if not isinstance(src, fx.Node) or dim != 0 or not isinstance(start, int) or isinstance(start, bool):
        return None
    if any(c.args[0] is not src or c.args[1] != 0 or c.args[2] != start + j for j, c in enumerate(column)):
        return None
    return graph.call_function(aten.slice.Tensor, (env[src], 0, start, start + len(column)))


def _forward_side_stacks(graph: fx.Graph, sides: list[fx.Node], num_layers: int) -> None:
    """``stack([S[0], ..., S[N-1]])`` of a side output S is S itself: drop the copy."""
    wanted = set(sides)
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in (aten.stack.default, torch.stack):
            continue
        items = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if dim != 0 or not isinstance(items, (list, tuple)) or len(items) != num_layers:
            continue
        srcs = {i.args[0] for i in items if isinstance(i, fx.Node) and i.target is operator.getitem}
        if len(srcs) != 1 or not srcs <= wanted:
            continue
        if all(
            isinstance(i, fx.Node) and i.target is operator.getitem and i.args[1] == j
            for j, i in enumerate(items)
        ):
            n.replace_all_uses_with(next(iter(srcs)))


def emit_solve(gm: fx.GraphModule, chain: LayerChain, plan: SolvePlan) -> fx.GraphModule:
    """Replace ``chain``'s parallel layers in ``gm`` (a private capture) by one call to the solve
    ``plan`` describes, in place, and return ``gm``."""
    gm.add_submodule(SOLVE_NAME, LayerParallelSolve(plan))
    gm.graph = solve_call_graph(gm, chain, plan, SOLVE_NAME)
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


def solve_call_graph(gm: fx.GraphModule, chain: LayerChain, plan: SolvePlan, solve_name: str) -> fx.Graph:
    """A copy of ``gm``'s graph with the parallel layers replaced by one call of the submodule
    ``solve_name`` (which runs ``plan``): the graph surgery of ``emit_solve``, also used by
    ``train.snlp_forward`` (there with the per-layer weights stacked from the live tensors)."""
    par = chain.parallel_layers
    start = par[0].hidden_in
    region = {n for layer in par for n in layer.nodes}
    after = descendants(region) - region
    outputs = {layer.output: j for j, layer in enumerate(par)}
    old = gm.graph
    graph = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    graph._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    for n in old.nodes:
        if n not in region and n not in after:
            env[n] = graph.node_copy(n, lambda a: env[a])
    args: list[fx.Node] = [env[start]]
    for ext in plan.passed:
        column = list(ext.column)
        if ext.mode == "shared":
            args.append(env[column[0]])
        else:
            view = _as_layer_slice(graph, column, env)
            args.append(
                view if view is not None else graph.call_function(torch.stack, ([env[c] for c in column],))
            )
    trace = graph.call_module(solve_name, tuple(args))
    sides: list[fx.Node] = []
    if plan.side_layers is not None:  # the solve returns (trace, *side outputs stacked over layers)
        solved = trace
        trace = graph.call_function(operator.getitem, (solved, 0))
        for s, template_side in enumerate(chain.template.side_outputs):
            sides.append(graph.call_function(operator.getitem, (solved, 1 + s)))
            sides[-1].name = f"{template_side.name}_layers"
            for j, layer in enumerate(par):
                env[layer.side_outputs[s]] = graph.call_function(operator.getitem, (sides[-1], j))
    read = {j for out_node, j in outputs.items() if any(u not in region for u in out_node.users)}
    for out_node, j in outputs.items():
        if j in read:
            index = -1 if plan.last_row_only else plan.trace_row(j)
            env[out_node] = graph.call_function(operator.getitem, (trace, index))
            env[out_node].name = f"h_{par[j].index}"
    for n in old.nodes:
        if n in after:
            if (
                len(n.users) == 0
                and n.op == "call_function"
                and any(a in region and a not in outputs for a in n.all_input_nodes)
            ):
                continue  # a shape assert on a layer intermediate: the layer no longer exists
            env[n] = graph.node_copy(n, lambda a: env[a])
    _forward_side_stacks(graph, sides, len(par))
    for n in reversed(list(graph.nodes)):
        if not n.users and (n.op == "get_attr" or (n.op == "call_function" and not n.is_impure())):
            graph.erase_node(n)
    graph.lint()
    return graph


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Free the per-layer weights the graph no longer reads (the solve holds stacked copies)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(recurse=True)) + list(gm.named_buffers(recurse=True)):
        if name.startswith(SOLVE_NAME + ".") or name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
