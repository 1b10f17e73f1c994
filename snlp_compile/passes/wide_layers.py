"""Wide-layer fusion (``SNLPConfig.fused_layers``): M consecutive layers as one wide layer.

The paper's fused layer reads one input x for M layers: their Q/K/V and MLP-in weights
concatenated along output rows, O and MLP-out along input columns, one attention with M*H heads,
the branch outputs summed, the MLPs reading x plus the sum of all attention outputs. Concatenated
heads with their own output projections are the sum of the layers' attention branches, so the
same function is, per group of layers j = 1..M at input x:

    y   = x + sum_j (first_j(x) - x)        first_j(h) = h + attention_j(h)   (the body's first half)
    out = y + sum_j (second_j(y) - y)       second_j(s) = s + mlp_j(s)        (its second half)

Here each half is batched over all N layers at the group's input repeated M times (one batched
evaluation per half, whatever N). For a layer with a scaled skip (nanochat's re-mix
``lambda h + mu x0`` before the attention) the first half's increment includes the re-mix's.

This rewrite needs the body to be two residual halves: its output an addition ``s + r`` where the
rest ``r`` reads the layer input only through ``s`` (shapes aside), and ``s`` itself an addition.
Anything else (a single branch, parallel attention and MLP reading the same input, hyper-connection
streams) is refused, naming the node and the layer.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import SNLPRefusal
from ..ir.chain import LayerChain
from ..ir.plan import WideLayers
from .batch_layers import batch_body

aten = torch.ops.aten

_ADDS = (aten.add.Tensor, operator.add, torch.add)
# ops that read only a tensor's shape: the second half may read the layer input's (the same as s's)
_SHAPE_OPS = (aten.sym_size.int, aten.size.default, aten.sym_numel.default)
# checks of a value's metadata (torch.export's dtype/shape asserts): reading a layer output inside a
# wide layer for them is no read of its value (the wide layer's output has the same metadata)
_METADATA_CHECKS = (aten._assert_tensor_metadata.default,)


def value_reads(layer_output: fx.Node, region: set[fx.Node]) -> list[fx.Node]:
    """The nodes outside ``region`` that read ``layer_output``'s value (metadata checks aside)."""
    return [u for u in layer_output.users if u not in region and u.target not in _METADATA_CHECKS]


def _is_add(n: object) -> bool:
    return (
        isinstance(n, fx.Node)
        and n.op == "call_function"
        and n.target in _ADDS
        and len(n.args) == 2
        and bool(n.kwargs.get("alpha", 1) == 1)
    )


def _output_value(body: fx.GraphModule) -> fx.Node:
    out = next(n for n in body.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)):  # (out, skip coefficient)
        value = value[0]
    assert isinstance(value, fx.Node)
    return value


def _reads_only_through(out: fx.Node, split: fx.Node, h: fx.Node) -> bool:
    """Whether every path from ``h`` to ``out`` passes through ``split`` (shape reads aside), and
    the rest reads ``split`` at all."""
    seen: set[fx.Node] = set()
    todo = [out]
    reads_split = False
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a is split:
                reads_split = True
            elif a is h:
                if n.target not in _SHAPE_OPS:
                    return False
            else:
                todo.append(a)
    return reads_split


def find_split(body: fx.GraphModule, module_path: str) -> fx.Node:
    """The node between the body's two residual halves (see the module docstring), or a refusal."""
    h = next(n for n in body.graph.nodes if n.op == "placeholder")
    out = _output_value(body)
    if _is_add(out):
        for s in out.args:
            if _is_add(s) and s is not h and _reads_only_through(out, s, h):  # type: ignore[arg-type]
                assert isinstance(s, fx.Node)
                return s
    raise SNLPRefusal(
        "SNLPConfig.fused_layers needs layers made of two residual halves, out = s + mlp(s) with "
        "s = h + attention(h) (the second half reading the layer input only through s), so that a "
        f"wide layer can sum each half's branches; the output of '{module_path}' ({out.name}) is not "
        "of that form (a single branch, or branches that read the same input in parallel?): use "
        "fused_layers=1",
        node=out.name,
        module_path=module_path,
    )


def split_body(body: fx.GraphModule, split: fx.Node) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The body's halves as bodies of their own, with the body's placeholders (h, *externals):
    first (h -> split), second (split's value as h -> the body's output)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    h, out = placeholders[0], _output_value(body)

    first = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in body.graph.nodes:
        if n.op == "output":
            break
        env[n] = first.node_copy(n, lambda a: env[a])
    first.output(env[split])
    first.eliminate_dead_code()

    second = fx.Graph()
    env = {}
    for n in placeholders:
        env[n] = second.node_copy(n, lambda a: env[a])
    env[h].meta = dict(split.meta)  # the second half's input: the stream after the first half
    env[split] = env[h]
    for n in body.graph.nodes:
        if n.op in ("placeholder", "output") or n is split:
            continue
        env[n] = second.node_copy(n, lambda a: env[a])
    second.output(env[out])
    second.eliminate_dead_code()  # (shape reads of h became shape reads of s: the same shape)
    for g in (first, second):
        g.lint()
    return (
        fx.GraphModule(body, first, class_name="LayerFirstHalf"),
        fx.GraphModule(body, second, class_name="LayerSecondHalf"),
    )


def check_fusable(chain: LayerChain, group: int) -> None:
    """Refusals before any work: N must be a multiple of ``group``, HCN streams are not fused, and
    the rest of the model may read only outputs of whole wide layers."""
    par = chain.parallel_layers
    region = {n for layer in par for n in layer.nodes}
    reads = {j for j, layer in enumerate(par) if value_reads(layer.output, region)}
    path = chain.template.module_path
    if len(par) % group:
        raise SNLPRefusal(
            f"SNLPConfig.fused_layers={group} must divide the {len(par)} parallel layers "
            f"({par[0].module_path} .. {par[-1].module_path}) into whole wide layers",
            module_path=path,
        )
    if chain.skip.kind == "matrix":
        raise SNLPRefusal(
            f"SNLPConfig.fused_layers={group}: layers with hyper-connection streams ({chain.skip.description}) "
            "are not fused (identity and scalar skips only)",
            node=chain.template.output.name,
            module_path=path,
        )
    for j in sorted(reads):
        if (j + 1) % group:
            raise SNLPRefusal(
                f"SNLPConfig.fused_layers={group}: the model reads the output of '{par[j].module_path}', "
                f"which lies inside a wide layer of {group} layers (only every {group}-th layer's output exists)",
                node=par[j].output.name,
                module_path=par[j].module_path,
            )


def wide_layers(
    body: fx.GraphModule,
    module_path: str,
    group: int,
    batched: list[bool],
    num_layers: int,
    fixed: list[bool],
) -> tuple[WideLayers, list[str]]:
    """The body's two halves batched over ``num_layers`` layers, as ``WideLayers`` of ``group``,
    and the ops that needed the vmap fallback."""
    split = find_split(body, module_path)
    first, second = split_body(body, split)
    first_layers, fallbacks = batch_body(first, batched, num_layers, fixed)
    second_layers, more = batch_body(second, batched, num_layers, fixed)
    fallbacks += [f for f in more if f not in fallbacks]
    return WideLayers(group, first_layers, second_layers, split.name), fallbacks
