"""Emit: replace the parallel layers' regions in the captured graph by one call to the solve.

The top-level graph keeps everything before the chain (embedding, sequential prefix layers, the
externals the layers read) as it was, calls ``snlp_solve`` once, reads the solved trace where the
original read hidden states (final norm, backout readers), and keeps the suffix as it was.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

from ..config import SNLPConfig, chunk_sizes
from ..errors import SNLPRefusal
from ..ir import LayerChain
from ..solve.solver import LAST_ROW_SOLVE, ExtMode, LayerParallelSolve, row_block_start
from .batch_layers import _einsum_linear, batch_body
from .graph_utils import ancestors, descendants
from .skip_split import Const, emit_coefficient

SOLVE_NAME = "snlp_solve"
aten = torch.ops.aten


def external_names(chain: LayerChain) -> list[str]:
    """The body's placeholder names for the template layer's externals (after "h"), unique and
    readable; the rewrite and the training regulariser build the same body with them."""
    taken: set[str] = {"h"}
    return [_external_name(e, chain.template.module_path, taken) for e in chain.template.externals]


def _external_name(node: fx.Node, layer_path: str, taken: set[str]) -> str:
    """A readable placeholder name: weights by their path inside the layer, else the node name."""
    base = node.name
    if node.op == "get_attr":
        target = str(node.target)
        base = target[len(layer_path) + 1 :] if target.startswith(layer_path + ".") else target
    elif node.target in (torch.ops.aten.select.int, operator.getitem) and node.args:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            base = f"{src.target}_l"
    elif node.op == "call_function":
        base = _derived_name(node, layer_path) or base
    name = re.sub(r"\W", "_", base).strip("_") or "ext"
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _derived_name(node: fx.Node, layer_path: str) -> str | None:
    """A value computed from weights alone (e.g. mHC's static H: a Sinkhorn projection of a
    parameter) named after what it reads and its last op, ``hc_attn_h_res_div``, instead of the
    node name (``div_279``); None when it reads an input or no weight."""
    reads = ancestors([node])
    if any(n.op == "placeholder" for n in reads):
        return None
    prefix = layer_path + "."
    weights = sorted({str(n.target).removeprefix(prefix) for n in reads if n.op == "get_attr"})
    if not weights:
        return None
    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return "_".join([*weights[:2], op])


def evaluate_static(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[Any]:
    """Values of nodes that depend only on parameters and constants (folded at transform time)."""
    needed = ancestors(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in nodes))
    with torch.no_grad():
        return list(fx.GraphModule(gm, graph)())


def _is_static(node: fx.Node) -> bool:
    return not any(a.op == "placeholder" for a in ancestors([node]))


def _template_graph(chain: LayerChain, names: list[str]) -> tuple[fx.Graph, dict[fx.Node, Any]]:
    """The template layer's region copied into a fresh graph with placeholders (h, *externals)."""
    t = chain.template
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {t.hidden_in: graph.placeholder("h")}
    env[t.hidden_in].meta = dict(t.hidden_in.meta)
    placeholders = [graph.placeholder(name) for name in names]
    for ph, ext in zip(placeholders, t.externals):
        ph.meta = dict(ext.meta)
    env.update(zip(t.externals, placeholders))
    for n in t.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    return graph, env


def build_side_body(chain: LayerChain, names: list[str]) -> fx.GraphModule | None:
    """The part of the template computing its side outputs (e.g. a decode step's new K/V), as a
    function (h, *externals) -> tuple of side values; None when the layers hand out none.

    The solve evaluates it once more at the corrected layer inputs, so what the layers hand out is
    consistent with the solved trace (and, in exact mode, equal to the sequential model's)."""
    if not chain.template.side_outputs:
        return None
    graph, env = _template_graph(chain, names)
    graph.output(tuple(env[n] for n in chain.template.side_outputs))
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="LayerSideOutputs")


def _as_layer_slice(graph: fx.Graph, column: list[fx.Node], env: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """``select(X, 0, i), select(X, 0, i+1), ...`` as one view ``X[i : i+N]``, which saves
    torch.stack copying (e.g.) a stacked KV cache on every call; None for any other column."""
    first = column[0]
    if not all(c.op == "call_function" and c.target is aten.select.int and len(c.args) == 3 for c in column):
        return None
    src, dim, start = first.args
    if dim != 0 or not isinstance(start, int) or isinstance(start, bool):
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


def fuse_shared_input_linears(
    graphs: list[fx.GraphModule], names: list[str], modes: list[ExtMode], stacked: dict[str, torch.Tensor]
) -> list[str]:
    """Batched linears that read one input with stacked weights (q, k, v) become one einsum over
    weights concatenated at transform time, split after: one weight stream per input instead of
    several small batched GEMVs, which matters in decoding where each is bandwidth- and
    launch-bound. The new stacked weights are appended to ``names``/``modes``/``stacked`` and every
    graph gets their placeholders (the graphs share one calling convention). Returns the new names."""
    added: list[str] = []
    for gm in graphs:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        name_of = {ph: names[i - 1] for i, ph in enumerate(placeholders) if 0 < i <= len(names)}
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is _einsum_linear and len(n.args) == 2 and not n.kwargs:
                x, w = n.args
                weight = stacked.get(name_of.get(w, ""))
                if isinstance(x, fx.Node) and weight is not None and weight.dim() == 3:
                    groups.setdefault(x, []).append(n)
        for x, members in groups.items():
            weights = [stacked[name_of[m.args[1]]] for m in members]
            if len(members) < 2 or len({(w.shape[0], w.shape[2], w.dtype, w.device) for w in weights}) != 1:
                continue
            fused = "fused_" + "_".join(re.sub(r"_weight$", "", name_of[m.args[1]]) for m in members)
            if fused not in stacked:
                stacked[fused] = _adjacent_rows(weights)
                if stacked[fused] is None:
                    stacked[fused] = torch.cat(weights, dim=1).contiguous()
                names.append(fused)
                modes.append("stacked")
                added.append(fused)
                _alias_into(stacked, [name_of[m.args[1]] for m in members], fused)
            ph = _placeholder(gm.graph, fused, stacked[fused])
            with gm.graph.inserting_before(members[0]):
                out = gm.graph.call_function(_einsum_linear, (x, ph))
                parts = gm.graph.call_function(torch.split, (out, [w.shape[1] for w in weights], -1))
                for k, m in enumerate(members):
                    m.replace_all_uses_with(gm.graph.call_function(operator.getitem, (parts, k)))
            for m in members:
                gm.graph.erase_node(m)
    for gm in graphs:  # the shared calling convention: every graph takes every new weight, in order
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][len(names) - len(added)]
        for name in added:
            ph = _placeholder(gm.graph, name, stacked[name])
            anchor.append(ph)
            anchor = ph
        gm.graph.lint()
        gm.recompile()
    return added


def _adjacent_rows(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one view when they are consecutive row blocks of one fused weight (a decode
    step's side outputs read k and v, already views of the fused q/k/v weight): the side output's
    fused k/v weight then costs no memory. None when they are not."""
    base = weights[0]._base
    start = None if base is None else row_block_start(weights[0], base)
    if start is None:
        return None
    at = start
    for w in weights:  # each weight is the next block of rows, in order
        if row_block_start(w, base) != at:
            return None
        at += w.shape[1]
    return base[:, start:at]


def _alias_into(stacked: dict[str, torch.Tensor], parts: list[str], fused: str) -> None:
    """The stacked weights just concatenated into ``fused`` become views of it, so the solve holds
    each weight once (the originals stay readable under their names: explain(), other graphs).
    A weight already a view of an earlier fused weight keeps that storage."""
    offset = 0
    for name in parts:
        weight = stacked[name]
        rows = weight.shape[1]
        if weight._base is None:
            stacked[name] = stacked[fused][:, offset : offset + rows]
        offset += rows


def _placeholder(graph: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
    """The placeholder ``name`` of ``graph``, appended after the existing ones if missing."""
    existing = [n for n in graph.nodes if n.op == "placeholder"]
    for n in existing:
        if n.target == name:
            return n
    with graph.inserting_after(existing[-1]):
        ph = graph.placeholder(name)
    ph.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return ph


def build_body(chain: LayerChain, names: list[str]) -> tuple[fx.GraphModule, float | None]:
    """The template layer as a function (h, *externals) -> out [, skip coefficient]."""
    t = chain.template
    graph, env = _template_graph(chain, names)
    coefficient = chain.skip.coefficient
    if isinstance(coefficient, Const):
        graph.output(env[t.output])
        constant: float | None = coefficient.value
    else:
        a = emit_coefficient(graph, coefficient, env)
        graph.output((env[t.output], a))
        constant = None
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="LayerBody"), constant


def rewrite(gm: fx.GraphModule, chain: LayerChain, config: SNLPConfig) -> fx.GraphModule:
    """Rewrite ``gm`` (a private capture) in place and return it."""
    par = chain.parallel_layers
    start = par[0].hidden_in
    names = external_names(chain)

    modes: list[ExtMode] = []
    stacked: dict[str, torch.Tensor] = {}
    runtime: list[tuple[str, list[fx.Node]]] = []  # (mode, nodes) passed to the solve, in order
    for k, name in enumerate(names):
        column = [layer.externals[k] for layer in par]
        if all(c is column[0] for c in column):
            modes.append("shared")
            runtime.append(("shared", column))
            continue
        if any(c.meta.get("val") is not None and not isinstance(c.meta["val"], torch.Tensor) for c in column):
            raise SNLPRefusal(
                f"the layers read different non-tensor values for '{name}' ({', '.join(c.name for c in column)})",
                node=column[0].name,
            )
        if all(_is_static(c) for c in column):
            values = evaluate_static(gm, column)
            stacked[name] = torch.stack([v.detach().clone() for v in values])
            modes.append("stacked")
        else:
            modes.append("runtime")
            runtime.append(("runtime", column))

    body, constant = build_body(chain, names)
    batched = [True, *(m != "shared" for m in modes)]
    fixed = [False, *(m == "stacked" for m in modes)]  # values known at transform time
    # one batched body per distinct chunk size (the body fixes its layer count): the first chunk's
    # (all N layers without chunks), and the smaller size when the chunks are uneven
    sizes = chunk_sizes(chain.num_parallel, config.chunks)
    layers, fallbacks = batch_body(body, batched, sizes[0], fixed)
    layers_short = None
    if sizes[-1] != sizes[0]:
        layers_short, short_fallbacks = batch_body(body, batched, sizes[-1], fixed)
        fallbacks += [f for f in short_fallbacks if f not in fallbacks]
    side_body = build_side_body(chain, names)
    side_layers = None
    if side_body is not None:  # evaluated once over all N layers after the solve, chunked or not
        side_layers, side_fallbacks = batch_body(side_body, batched, chain.num_parallel, fixed)
        side_layers.graph.eliminate_dead_code()  # batching leaves the rest of the layer dead here
        side_layers.recompile()
        fallbacks += [f for f in side_fallbacks if f not in fallbacks]
    chain.notes.extend(f"no batching rule for {f}: evaluated with torch.vmap" for f in fallbacks)
    batched_graphs = [g for g in (layers, layers_short, side_layers) if g is not None]
    fused = fuse_shared_input_linears(batched_graphs, names, modes, stacked)
    chain.notes.extend(f"linears sharing one input read one concatenated weight: {f}" for f in fused)
    solve = LayerParallelSolve(
        body,
        layers,
        names,
        modes,
        stacked,
        num_layers=chain.num_parallel,
        skip_kind=chain.skip.kind,
        skip_constant=constant,
        iterations=config.iterations,
        init=config.init,
        damping=config.damping,
        side_body=side_body,
        side_layers=side_layers,
        chunk_sizes=sizes,
        layers_short=layers_short,
    )

    region = {n for layer in par for n in layer.nodes}
    after = descendants(region) - region
    outputs = {layer.output: j for j, layer in enumerate(par)}

    gm.add_submodule(SOLVE_NAME, solve)
    old = gm.graph
    graph = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls)
    graph._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    for n in old.nodes:
        if n not in region and n not in after:
            env[n] = graph.node_copy(n, lambda a: env[a])
    args: list[fx.Node] = [env[start]]
    for mode, column in runtime:
        if mode == "shared":
            args.append(env[column[0]])
        else:
            view = _as_layer_slice(graph, column, env)
            args.append(
                view if view is not None else graph.call_function(torch.stack, ([env[c] for c in column],))
            )
    trace = graph.call_module(SOLVE_NAME, tuple(args))
    sides: list[fx.Node] = []
    if side_layers is not None:  # the solve returns (trace, *side outputs stacked over layers)
        solved = trace
        trace = graph.call_function(operator.getitem, (solved, 0))
        for s, template_side in enumerate(chain.template.side_outputs):
            sides.append(graph.call_function(operator.getitem, (solved, 1 + s)))
            sides[-1].name = f"{template_side.name}_layers"
            for j, layer in enumerate(par):
                env[layer.side_outputs[s]] = graph.call_function(operator.getitem, (sides[-1], j))
    read = {j for out_node, j in outputs.items() if any(u not in region for u in out_node.users)}
    # only the last layer's output read (a forward): the solve may return that row alone
    solve.last_row_only = read == {len(par) - 1} and side_layers is None and LAST_ROW_SOLVE
    if solve.last_row_only:
        chain.notes.append("only the last layer's output is read: the solve corrects that row alone")
    for out_node, j in outputs.items():
        if j in read:
            index = -1 if solve.last_row_only else j
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
    gm.graph = graph
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


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
