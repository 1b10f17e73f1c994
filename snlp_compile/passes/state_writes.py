"""Writes into model state during forward (issue 22): refused at capture.

A layer that writes a buffer, a parameter or one of its inputs in place (``self.calls.add_(1)``, a
running statistic, ``x.mul_(...)`` on the input) carries state from one call to the next, or from
one layer to the next, that the layer-parallel solve cannot reproduce: its batched body runs K
times per call on stacked copies. torch.export's graph keeps such writes as in-place ATen ops on
(views of) the lifted buffer, parameter or input placeholders; this finds the first one and names
it, its target and its module path.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import SNLPRefusal

_KINDS = {InputKind.BUFFER: "buffer", InputKind.PARAMETER: "parameter", InputKind.USER_INPUT: "input"}


def _written_args(node: fx.Node) -> list[fx.Node]:
    """The arguments an in-place (or out=) ATen op writes."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def _base(node: fx.Node) -> fx.Node:
    """Follow views (ops whose result aliases their first argument) back to their base."""
    seen = set()
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node not in seen:
        seen.add(node)
        schema = node.target._schema
        if not schema.returns or schema.returns[0].alias_info is None or not node.args:
            break
        first = node.args[0]
        if not isinstance(first, fx.Node):
            break
        node = first
    return node


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def state_write(ep: ExportedProgram) -> SNLPRefusal | None:
    """An SNLPRefusal for the first in-place write into a buffer, parameter or input of ``ep``'s
    graph, else None."""
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    for node in ep.graph.nodes:
        for written in _written_args(node):
            base = _base(written)
            spec = specs.get(base.name) if base.op == "placeholder" else None
            if spec is None or spec.kind not in _KINDS:
                continue
            kind = _KINDS[spec.kind]
            what = f"the {kind} '{spec.target}'" if spec.target else f"the {kind} '{base.name}'"
            path = _module_path(node)
            return SNLPRefusal(
                f"'{path or '<root>'}' writes {what} in forward ({node.target}): state written during a "
                "forward (a call counter, a running statistic, an in-place update of an input or weight) "
                "cannot be solved in parallel, whose layers run several times per call on copies; compute "
                "it out of place and return it, or keep it outside the model",
                node=node.name,
                module_path=path,
            )
    return None


def local_writes(ep: ExportedProgram) -> list[fx.Node]:
    """In-place writes into tensors the forward allocates itself (``buf = new_empty(...);
    buf[..., :k].copy_(a)``, as in DeepSeek-V3's attention). The graph orders them only by node
    order, not by data flow, which the layer analysis follows: the capture functionalises such
    graphs (the writes become out-of-place ``slice_scatter``/``copy`` ops) before analysis."""
    return [n for n in ep.graph.nodes if _written_args(n)]
