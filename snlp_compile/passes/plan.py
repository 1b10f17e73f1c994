"""Plan the solve: from a LayerChain to the SolvePlan the runtime runs (``ir.plan``).

Names the body's externals, classifies each (shared by all layers, stacked and folded into the
solve at transform time, or passed stacked at run time), builds the template layer's body (and
the part computing its side outputs), batches it over the layer axis once per distinct stage
size, fuses linears sharing an input, and evaluates what is static: the skip coefficients that
depend on folded weights alone (nanochat's scalars, static H). The training regulariser builds
its solves through the same entry point (``build_solve``).
"""

from __future__ import annotations

import dataclasses
import keyword
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..config import stage_sizes
from ..errors import SNLPRefusal
from ..ir.chain import Layer, LayerChain
from ..ir.coef import Const, emit_coefficient
from ..ir.matexpr import LAYER_INVARIANT, StreamMix, emit_matrix
from ..ir.plan import External, ExtMode, SolveOptions, SolvePlan, WeightSources
from ..ir.stream_layout import StreamLayout
from ..solve.solver import LayerParallelSolve
from .batch_layers import batch_body
from .fuse_linears import fuse_shared_input_linears, row_blocks
from .graph_utils import ancestors
from .wide_layers import check_fusable, wide_layers


@dataclass(frozen=True)
class PlanOptions:
    """What the plan is for.

    fold_static: values every layer reads that are known at transform time (weights) become the
        solve's stacked buffers; False passes every per-layer value at run time (training: the
        gradient reaches the live weights, and nothing is copied).
    fuse_linears: linears sharing one input read one concatenated weight (``fuse_linears``).
    side_outputs: evaluate the layers' side outputs (a decode step's K/V) after the solve.
    last_row: the solve may return only the trace's last row when the graph reads nothing else.
    """

    fold_static: bool = True
    fuse_linears: bool = True
    side_outputs: bool = True
    last_row: bool = True


TRAINING = PlanOptions(fold_static=False, fuse_linears=False, side_outputs=False, last_row=False)


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
    if not name.isidentifier() or keyword.iskeyword(name):  # e.g. Dynamo's "0_model_rotary_emb_..."
        name = f"ext_{name}"
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


def build_body(
    chain: LayerChain, names: list[str]
) -> tuple[fx.GraphModule, float | None, StreamLayout | None]:
    """The template layer as a function (h, *externals) -> out [, skip coefficient]; the
    coefficient when it is a number (else None: the body returns it); the stream layout of a
    "matrix" (HCN) skip."""
    t = chain.template
    graph, env = _template_graph(chain, names)
    coefficient = chain.skip.coefficient
    constant: float | None = None
    layout: StreamLayout | None = None
    if isinstance(coefficient, Const):
        graph.output(env[t.output])
        constant = coefficient.value
    elif isinstance(coefficient, StreamMix):
        graph.output((env[t.output], emit_matrix(graph, coefficient.matrix, env, coefficient.hidden_in)))
        layout = coefficient.layout
    else:
        graph.output((env[t.output], emit_coefficient(graph, coefficient, env)))
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="LayerBody"), constant, layout


def classify_externals(
    gm: fx.GraphModule, chain: LayerChain, names: list[str], fold_static: bool = True
) -> tuple[list[External], dict[str, torch.Tensor]]:
    """Each external of the parallel layers: "shared" (one value for every layer), "stacked"
    (every layer's value known at transform time: evaluated and stacked, with ``fold_static``) or
    "runtime" (stacked by the graph when it runs). Returns them and the stacked values."""
    par = chain.parallel_layers
    externals: list[External] = []
    stacked: dict[str, torch.Tensor] = {}
    for k, name in enumerate(names):
        column = tuple(layer.externals[k] for layer in par)
        if all(c is column[0] for c in column):
            externals.append(External(name, "shared", column))
            continue
        if any(c.meta.get("val") is not None and not isinstance(c.meta["val"], torch.Tensor) for c in column):
            raise SNLPRefusal(
                f"the layers read different non-tensor values for '{name}' ({', '.join(c.name for c in column)})",
                node=column[0].name,
            )
        _refuse_shape_mismatch(name, column, par)  # issue 22: a refusal, not a stacking error
        if fold_static and all(_is_static(c) for c in column):
            values = evaluate_static(gm, list(column))
            stacked[name] = torch.stack([v.detach().clone() for v in values])
            externals.append(External(name, "stacked", column))
        else:
            externals.append(External(name, "runtime", column))
    return externals, stacked


def _refuse_shape_mismatch(name: str, column: tuple[fx.Node, ...], layers: list[Layer]) -> None:
    """SNLPRefusal when the parallel layers read values of different shapes for one external
    (e.g. MLP widths that differ): they cannot be stacked on one layer axis."""
    shapes = [tuple(v.shape) if isinstance(v := c.meta.get("val"), torch.Tensor) else None for c in column]
    first = shapes[-1]  # the template is the last layer
    for layer, node, shape in zip(layers, column, shapes):
        if shape is not None and first is not None and str(shape) != str(first):
            raise SNLPRefusal(
                f"the parallel layers are not identical: '{layer.module_path}' reads '{name}' of shape "
                f"{list(shape)}, '{layers[-1].module_path}' of shape {list(first)} (different widths?); "
                "they cannot be stacked on one layer axis: solve only the identical last layers in "
                "parallel (SNLPConfig.parallel_layers)",
                node=node.name,
                module_path=layer.module_path,
            )


def last_row_read(chain: LayerChain) -> bool:
    """Whether the rest of the graph reads the output of the chain's last layer and of no other
    parallel layer (a forward, as opposed to a decode step or a backout reader)."""
    par = chain.parallel_layers
    region = {n for layer in par for n in layer.nodes}
    read = {j for j, layer in enumerate(par) if any(u not in region for u in layer.output.users)}
    return read == {len(par) - 1}


def plan_solve(
    gm: fx.GraphModule,
    chain: LayerChain,
    options: SolveOptions,
    *,
    stages: int | tuple[int, ...] = 1,
    planning: PlanOptions = PlanOptions(),
    fused_layers: int = 1,
) -> SolvePlan:
    """The SolvePlan of ``chain``'s parallel layers in the captured ``gm`` (read, not changed);
    ``fused_layers`` > 1: as wide layers of that many (``passes.wide_layers``)."""
    if fused_layers > 1:
        check_fusable(chain, fused_layers)
    names = external_names(chain)
    externals, stacked = classify_externals(gm, chain, names, planning.fold_static)
    modes = [e.mode for e in externals]
    body, constant, layout = build_body(chain, names)
    batched = [True, *(m != "shared" for m in modes)]
    fixed = [False, *(m == "stacked" for m in modes)]  # values known at transform time
    # one batched body per distinct stage size (the body fixes its layer count): the first stage's
    # (all N layers without stages), and the other size when the stages differ
    sizes = stage_sizes(chain.num_parallel, stages)
    # wide layers (fused_layers > 1, one stage) are solved with their own two halves (below): the
    # per-layer batched body would be built and never called
    layers, fallbacks = (None, []) if fused_layers > 1 else batch_body(body, batched, sizes[0], fixed)
    layers_short = None
    other = [m for m in sizes if m != sizes[0]]
    if other:
        layers_short, short_fallbacks = batch_body(body, batched, other[0], fixed)
        fallbacks += [f for f in short_fallbacks if f not in fallbacks]
    side_body = build_side_body(chain, names) if planning.side_outputs else None
    side_layers = None
    if side_body is not None:  # evaluated once over all N layers after the solve, staged or not
        side_layers, side_fallbacks = batch_body(side_body, batched, chain.num_parallel, fixed)
        side_layers.graph.eliminate_dead_code()  # batching leaves the rest of the layer dead here
        side_layers.recompile()
        fallbacks += [f for f in side_fallbacks if f not in fallbacks]
    wide = None
    if fused_layers > 1:
        wide, wide_fallbacks = wide_layers(
            body, chain.template.module_path, fused_layers, batched, chain.num_parallel, fixed
        )
        fallbacks += [f for f in wide_fallbacks if f not in fallbacks]
    notes = [f"no batching rule for {f}: evaluated with torch.vmap" for f in fallbacks]
    if wide is not None:
        notes.append(
            f"wide layers of {fused_layers} (split after {wide.split}): {chain.num_parallel // fused_layers} "
            "wide layers solved in parallel, the function of the fused model (not verified against the unfused one)"
        )
    fused: list[str] = []
    if planning.fuse_linears:
        wide_graphs = (wide.first, wide.second) if wide is not None else ()
        batched_graphs = [g for g in (layers, layers_short, side_layers, *wide_graphs) if g is not None]
        fused = fuse_shared_input_linears(batched_graphs, names, modes, stacked)
        externals += [External(name, "stacked") for name in fused]
    notes += [f"linears sharing one input read one concatenated weight: {f}" for f in fused]
    last_row_only = planning.last_row and side_layers is None and last_row_read(chain)
    if last_row_only:
        notes.append("only the last layer's output is read: the solve corrects that row alone")
    plan = SolvePlan(
        num_layers=chain.num_parallel,
        skip_kind=chain.skip.kind,
        skip_constant=constant,
        body=body,
        layers=layers,
        externals=tuple(externals),
        stacked=stacked,
        row_blocks=row_blocks(stacked),
        stage_sizes=tuple(sizes),
        layers_short=layers_short,
        side_body=side_body,
        side_layers=side_layers,
        stream_layout=layout,
        options=options,
        last_row_only=last_row_only,
        wide=wide,
        fused=tuple(fused),
        fallbacks=tuple(fallbacks),
        notes=tuple(notes),
    )
    if wide is None and (layout is not None or (chain.skip.kind == "elementwise" and constant is None)):
        plan = dataclasses.replace(plan, static_skip=static_skip(plan))
    return dataclasses.replace(plan, sources=weight_sources(plan.externals, plan.static_skip is not None))


def weight_sources(externals: tuple[External, ...], static_products: bool) -> WeightSources:
    """The attributes the "stacked" externals copy row by row (columns of get_attr nodes) and
    those anything else was folded from (other stacked columns' attributes; every stacked one
    when skip products were computed from them at transform time)."""
    stacked = [e for e in externals if e.mode == "stacked" and e.column]
    rows = {
        e.name: tuple(str(c.target) for c in e.column)
        for e in stacked
        if all(c.op == "get_attr" for c in e.column)
    }
    folded = {
        str(a.target)
        for e in stacked
        if e.name not in rows
        for a in ancestors(list(e.column))
        if a.op == "get_attr"
    }
    if static_products:
        folded.update(t for targets in rows.values() for t in targets)
    return WeightSources(rows, frozenset(folded))


def static_skip(plan: SolvePlan) -> torch.Tensor | None:
    """Every layer's skip coefficient when it depends on stacked weights alone, stage by stage
    (each batched body fixes its layer count), concatenated over the layer axis; else None."""
    parts = []
    start = 0
    for size in plan.stage_sizes:
        rows = {
            k: v if len(plan.stage_sizes) == 1 else v[start : start + size] for k, v in plan.stacked.items()
        }
        layers = plan.layers if size == plan.stage_sizes[0] else plan.layers_short
        assert layers is not None
        part = _static_matrix(layers, plan.ext_names, plan.ext_modes, rows)
        if part is None:
            return None
        parts.append(part)
        start += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _static_matrix(
    layers: fx.GraphModule,
    ext_names: list[str],
    ext_modes: list[ExtMode],
    stacked: Mapping[str, torch.Tensor],
) -> torch.Tensor | None:
    """The batched layers' skip matrix (N, *1, n, n) when it depends on stacked buffers alone
    (static H, folded at transform time), evaluated once; None when it depends on h or inputs."""
    out = next(n for n in layers.graph.nodes if n.op == "output")
    a_node = out.args[0][1]
    placeholders = [n for n in layers.graph.nodes if n.op == "placeholder"]
    need: set[fx.Node] = set()
    todo = [a_node]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(n.all_input_nodes)
    h = placeholders[0]
    if h in need and any(u in need and u.target not in LAYER_INVARIANT for u in h.users):
        return None  # A reads the hidden state: dynamic H
    values: list[torch.Tensor] = []
    for ph, name, mode in zip(placeholders[1:], ext_names, ext_modes):
        if ph in need:
            if mode != "stacked" or name not in stacked:
                return None
            values.append(stacked[name])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in layers.graph.nodes:
        if n in need:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[a_node])
    dtype = next(iter(stacked.values())).dtype if stacked else torch.float32
    args = [torch.empty(0, dtype=dtype) if ph is h else values.pop(0) for ph in placeholders if ph in need]
    with torch.no_grad():
        return fx.GraphModule(layers, graph)(*args)


def build_solve(
    gm: fx.GraphModule,
    chain: LayerChain,
    options: SolveOptions,
    *,
    parallel_layers: int | None = None,
    stages: int | tuple[int, ...] = 1,
    planning: PlanOptions = PlanOptions(),
    fused_layers: int = 1,
) -> tuple[SolvePlan, LayerParallelSolve]:
    """A runnable solve from an ``api.analyse()`` result, in one call: the plan of the last
    ``parallel_layers`` layers of ``chain`` (default: the chain's own parallel layers) and the
    ``LayerParallelSolve`` running it. ``gm`` is read, not changed.

    The solve is called as ``solve(h_in, *values)``, one value per ``plan.passed`` external:
    for a "shared" one its ``column[0]``'s value, for a "runtime" one its column's values stacked
    over the layers. The training regulariser uses ``planning=TRAINING`` (nothing folded, so the
    gradient reaches the live weights).
    """
    if parallel_layers is not None:
        if not 1 <= parallel_layers <= len(chain.layers):
            raise ValueError(f"parallel_layers={parallel_layers}: between 1 and {len(chain.layers)}")
        chain = dataclasses.replace(chain, first_parallel=len(chain.layers) - parallel_layers)
    plan = plan_solve(gm, chain, options, stages=stages, planning=planning, fused_layers=fused_layers)
    return plan, LayerParallelSolve(plan)
