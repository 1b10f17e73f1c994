"""Fuse linears that share an input: q, k, v read one concatenated stacked weight.

Batched linears (``batched_linear``) that read one input with stacked weights become one linear
over the weights concatenated at transform time, split after: one weight stream per input
instead of several small batched GEMVs, which matters in decoding where each is bandwidth- and
launch-bound. The original weights become row-block views of the fused one (``RowBlock``), so
the solve holds each weight once.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping

import torch
import torch.fx as fx

from ..ir.plan import ExtMode, RowBlock
from ..kernels.layer_ops import batched_linear


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
            if n.op == "call_function" and n.target is batched_linear and len(n.args) == 2 and not n.kwargs:
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
                adjacent = _adjacent_rows(weights)
                stacked[fused] = torch.cat(weights, dim=1).contiguous() if adjacent is None else adjacent
                names.append(fused)
                modes.append("stacked")
                added.append(fused)
                _alias_into(stacked, [name_of[m.args[1]] for m in members], fused)
            ph = _placeholder(gm.graph, fused, stacked[fused])
            with gm.graph.inserting_before(members[0]):
                out = gm.graph.call_function(batched_linear, (x, ph))
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
    if base is None or start is None:
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


def row_block_start(view: torch.Tensor, base: torch.Tensor) -> int | None:
    """The first row (dim 1) of ``base`` at which ``view`` is a block of whole rows (same layers,
    same row length, same strides), or None when it is not one."""
    if view._base is not base or view.dim() < 2 or view.stride() != base.stride():
        return None
    if view.shape[0] != base.shape[0] or view.shape[2:] != base.shape[2:]:
        return None
    start, rem = divmod(int(view.storage_offset()) - int(base.storage_offset()), base.stride(1))
    return start if rem == 0 else None


def row_blocks(stacked: Mapping[str, torch.Tensor]) -> dict[str, RowBlock]:
    """name -> RowBlock for every stacked weight that is a block of rows (dim 1) of another
    stacked weight, as fuse_shared_input_linears leaves them."""
    roots = {id(v): k for k, v in stacked.items() if v._base is None}
    views: dict[str, RowBlock] = {}
    for name, value in stacked.items():
        base_name = roots.get(id(value._base))
        start = None if base_name is None else row_block_start(value, stacked[base_name])
        if base_name is not None and start is not None:
            views[name] = RowBlock(base_name, start, int(value.shape[1]))
    return views
