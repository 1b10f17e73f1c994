"""Find the chain of residual layers in a captured graph.

Layers are the children of one module container (``transformer.h.0``, ``model.layers.3``...),
identified through ``nn_module_stack``. Each layer is then re-defined by dependencies, not by
module membership: its region is every node that depends on the hidden state entering the layer
and feeds the hidden state leaving it. That captures code users write around their blocks (e.g.
nanochat's ``resid_lambda * x + x0_lambda * x0`` in the model's loop) as part of the layer.

The last layer is the template; every other layer is matched against it node by node, walking
back from its output. The match yields the layer's hidden input and its externals aligned with
the template's, and proves the layers structurally identical (same ops, same non-tensor
arguments), which is what lets one batched body evaluate them all.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.fx as fx

from ..errors import SNLPRefusal
from ..ir import HiddenReader, Layer
from .graph_utils import ancestors, arg_structure, descendants, innermost_module, module_paths

aten = torch.ops.aten
_INDEXED = re.compile(r"^(?:(.*)\.)?(\d+)$")  # 'model.layers.3', or '3' (a root nn.Sequential)


def _member_paths(node: fx.Node) -> set[str]:
    """Every module a node was traced under, with the modules holding them: a node of
    ``layers.0.1`` (a sublayer of a ModuleList entry the model unpacks, ``for norm, f in
    self.layers``, so that ``layers.0`` itself is never called) belongs to ``layers.0`` too."""
    found: set[str] = set()
    for path in module_paths(node):
        parts = path.split(".") if path else []
        found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return found


def _is_assert(node: fx.Node) -> bool:
    name = str(node.target)
    return node.op == "call_function" and len(node.users) == 0 and ("assert" in name or "check" in name)


def find_container(gm: fx.GraphModule, requested: str | None) -> tuple[str, list[str]]:
    """The module container whose indexed children cover the most graph nodes."""
    coverage: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for node in gm.graph.nodes:
        for path in _member_paths(node):
            m = _INDEXED.match(path)
            if m:
                coverage[m.group(1) or ""][int(m.group(2))] += 1
    if requested is not None:
        if requested not in coverage:
            found = ", ".join(sorted(coverage)) or "none"
            raise SNLPRefusal(
                f"SNLPConfig.layers={requested!r} names no layer container in the captured graph "
                f"(indexed containers found: {found})"
            )
        parent = requested
    else:
        candidates = [(sum(c.values()), p) for p, c in coverage.items() if len(c) >= 2]
        if not candidates:
            raise SNLPRefusal(
                "no layer stack found: no module container (nn.ModuleList/Sequential) with two or "
                "more children appears in the captured graph"
            )
        parent = max(candidates)[1]
    indices = sorted(coverage[parent])
    if indices != list(range(len(indices))):
        raise SNLPRefusal(
            f"layers of '{parent}' seen in the graph are {indices}, not 0..n-1", module_path=parent
        )
    return parent, [f"{parent}.{i}" if parent else str(i) for i in indices]


def values_read_outside(gm: fx.GraphModule, layer_paths: list[str]) -> list[list[fx.Node]]:
    """Per layer module, its nodes that are read outside that module, in graph order."""
    members: dict[str, list[fx.Node]] = {p: [] for p in layer_paths}
    for node in gm.graph.nodes:
        paths = _member_paths(node)
        for p in layer_paths:
            if p in paths:
                members[p].append(node)
    result = []
    for p in layer_paths:
        inside = set(members[p])
        outs = [n for n in members[p] if any(u not in inside for u in n.users)]
        if not outs:
            raise SNLPRefusal(f"layer '{p}' hands no value to the rest of the model", module_path=p)
        result.append(outs)
    return result


def layer_outputs(gm: fx.GraphModule, layer_paths: list[str]) -> list[fx.Node]:
    """The hidden state each layer module hands on: its last value read outside it.

    Other values read outside are either independent of the hidden state (e.g. a rotary slice
    that CSE now shares with later layers; check_chain proves it) or side outputs, values of the
    layer's region the rest of the model reads (e.g. a decode step's new K/V for the cache), which
    find_layers records on each Layer and the rewrite returns from the solve.
    """
    return [outs[-1] for outs in values_read_outside(gm, layer_paths)]


def _region(hidden_in: fx.Node, output: fx.Node) -> set[fx.Node]:
    return (descendants([hidden_in]) & ancestors([output])) - {hidden_in}


class _Mismatch(Exception):
    pass


def _sizes(node: fx.Node) -> list[str] | None:
    """A tensor value's sizes (symbolic ones by name): layers of different widths do not match."""
    val = node.meta.get("val")
    return [str(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def match_layer(template: Layer, output: fx.Node) -> tuple[fx.Node, list[fx.Node], list[fx.Node]]:
    """Map the template's region onto the layer ending at ``output``.

    Returns (hidden input, region nodes in the template's order, externals aligned with the
    template's). Raises _Mismatch naming the first difference.
    """
    region = set(template.nodes)
    ext_index = {n: i for i, n in enumerate(template.externals)}
    mapping: dict[fx.Node, fx.Node] = {template.output: output}
    hidden: fx.Node | None = None
    externals: list[fx.Node | None] = [None] * len(template.externals)

    def bind(t: fx.Node, c: fx.Node) -> None:
        nonlocal hidden
        if t in region:
            prev = mapping.setdefault(t, c)
            if prev is not c:
                raise _Mismatch(f"template node {t.name} maps to both {prev.name} and {c.name}")
        elif t is template.hidden_in:
            if hidden is not None and hidden is not c:
                raise _Mismatch(f"hidden input maps to both {hidden.name} and {c.name}")
            hidden = c
        else:
            k = ext_index[t]
            known = externals[k]
            if known is not None and known is not c:
                raise _Mismatch(f"input {t.name} maps to both {known.name} and {c.name}")
            externals[k] = c

    for t in reversed(template.nodes):
        c = mapping.get(t)
        if c is None:
            raise _Mismatch(f"nothing corresponds to template node {t.name}")
        if (t.op, t.target) != (c.op, c.target):
            raise _Mismatch(f"{c.name} is {c.op} {c.target}, the template's {t.name} is {t.op} {t.target}")
        if _sizes(t) != _sizes(c):
            raise _Mismatch(f"{c.name} has shape {_sizes(c)} where the template's {t.name} has {_sizes(t)}")
        t_leaves, t_shape = arg_structure(t)
        c_leaves, c_shape = arg_structure(c)
        if t_shape != c_shape:
            raise _Mismatch(f"{c.name} and template {t.name} take differently shaped arguments")
        for tl, cl in zip(t_leaves, c_leaves):
            if isinstance(tl, fx.Node) != isinstance(cl, fx.Node):
                raise _Mismatch(f"{c.name} argument {cl!r} differs from the template's {tl!r}")
            if isinstance(tl, fx.Node):
                bind(tl, cl)
            elif type(tl) is not type(cl) or tl != cl:
                raise _Mismatch(f"{c.name} has argument {cl!r} where template {t.name} has {tl!r}")
    if hidden is None or any(e is None for e in externals):
        raise _Mismatch("the layer does not read every input the template reads")
    nodes = [mapping[t] for t in template.nodes]
    if len(set(nodes)) != len(nodes):
        raise _Mismatch("two template nodes map to one node")
    return hidden, nodes, externals  # type: ignore[return-value]


def _absorbable(node: fx.Node, region: set[fx.Node]) -> bool:
    """An input computed only for this layer from run-time values (e.g. ``x0_lambdas[i] * x0``):
    evaluating it inside the batched body beats stacking N copies of it at run time."""
    if node.op != "call_function" or node.is_impure() or not node.users:
        return False
    if node.target is aten.select.int:
        # a layer's pick of a stacked run-time input (e.g. ``k_cache[i]``) stays an external: its
        # index differs per layer, and the rewrite passes all layers' picks as one slice view
        return False
    if not all(u in region for u in node.users):
        return False
    return any(a.op == "placeholder" for a in ancestors([node]))


def build_template(hidden_in: fx.Node, output: fx.Node, module_path: str, index: int) -> Layer:
    region = _region(hidden_in, output)
    changed = True
    while changed:
        changed = False
        for n in list(region):
            for a in n.all_input_nodes:
                if a not in region and a is not hidden_in and _absorbable(a, region):
                    region.add(a)
                    changed = True
    order = [n for n in output.graph.nodes if n in region]
    externals: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for n in order:
        for a in n.all_input_nodes:
            if a not in region and a is not hidden_in and a not in seen:
                seen.add(a)
                externals.append(a)
    return Layer(index, module_path, hidden_in, output, order, externals)


def _entry_inputs(nodes_of: set[fx.Node]) -> set[fx.Node]:
    return {a for n in nodes_of for a in n.all_input_nodes if a not in nodes_of}


def residual_outputs(gm: fx.GraphModule, paths: list[str], outputs: list[fx.Node]) -> list[fx.Node]:
    """The hidden state after each entry where the residual add sits outside the entries, in the
    loop of the module holding them (``for norm, f in self.layers: x = x + f(norm(x))``): there an
    entry's last value is its branch, and the hidden state is ``x + branch``. Where every entry but
    the last hands on such an add of its own input and its branch (which is all the next entry
    reads of it), those adds are the outputs, and the last entry's add the one that follows its
    branch the same way; else ``outputs`` unchanged."""
    members: dict[str, set[fx.Node]] = {p: set() for p in paths}
    for node in gm.graph.nodes:
        for p in paths:
            if p in _member_paths(node):
                members[p].add(node)
    lifted = []
    for i in range(len(paths) - 1):
        reads = _entry_inputs(members[paths[i + 1]]) & descendants([outputs[i]])
        if len(reads) != 1:
            return outputs
        (after,) = reads
        ins = _entry_inputs(members[paths[i]])
        if after is outputs[i] or outputs[i] not in after.all_input_nodes:
            return outputs
        if not any(a in ins for a in after.all_input_nodes if a is not outputs[i]):
            return outputs
        lifted.append(after)
    # the last entry's add: its branch's user with the same op, reading the last entry's input
    prev = lifted[-1]
    ins = _entry_inputs(members[paths[-1]])
    same = [
        u
        for u in outputs[-1].users
        if (u.op, u.target) == (prev.op, prev.target) and any(a in ins for a in u.all_input_nodes)
    ]
    return [*lifted, same[0]] if len(same) == 1 else outputs


MAX_PERIOD = 4  # entries per layer tried for repeating patterns (attention/FFN entries, "SSSL")


def _group_matches(outputs: list[fx.Node], paths: list[str], last: int, period: int) -> int:
    """How many layers of ``period`` consecutive entries, ending at entry ``last`` and going
    back, match the one ending there (each reading the previous one's output)."""
    if last - period < 0:
        return 0
    template = build_template(outputs[last - period], outputs[last], paths[last], last)
    count = 1
    for i in range(last - period, -1, -period):
        try:
            hidden, _, _ = match_layer(template, outputs[i])
        except _Mismatch:
            break
        if i - period >= 0 and hidden is not outputs[i - period]:
            break
        count += 1
    return count


def choose_template(outputs: list[fx.Node], paths: list[str]) -> tuple[int, int]:
    """(last entry, period) of the template layer: a layer is ``period`` consecutive entries of
    the container (1 unless the entries alternate kinds, e.g. attention and feed-forward entries,
    or three sliding-window layers and a full one), and the template is the last layer its
    predecessor matches: entries after it that differ (a head at the end of a root
    ``nn.Sequential``) stay outside the chain, downstream of it. Of the candidates, the one
    covering the most entries in parallel; (last entry, 1) when no two layers match."""
    best = (0, len(outputs) - 1, -1)  # (entries covered, last entry, -period)
    for period in range(1, min(MAX_PERIOD, len(outputs) // 2) + 1):
        for last in range(len(outputs) - 1, 2 * period - 2, -1):
            count = _group_matches(outputs, paths, last, period)
            if count >= 2:
                best = max(best, (count * period, last, -period))
                break
    _, last, period = best
    return last, -period


def find_layers(gm: fx.GraphModule, requested_container: str | None) -> tuple[str, list[Layer], list[str]]:
    """All layers of the chain that match the template, plus notes on those that do not.

    A layer is usually one entry of the container; where entries alternate kinds it is a group of
    ``period`` consecutive entries, named by its last entry (whose output is the layer's)."""
    container, paths = find_container(gm, requested_container)
    read_outside = values_read_outside(gm, paths)
    outputs = [outs[-1] for outs in read_outside]
    if len(outputs) < 2:
        raise SNLPRefusal(
            f"'{container}' holds a single layer: nothing to solve in parallel", module_path=container
        )
    outputs = residual_outputs(gm, paths, outputs)
    last, p = choose_template(outputs, paths)
    notes: list[str] = []
    if p > 1:
        notes.append(
            f"entries alternate kinds: each layer solved in parallel is {p} consecutive entries of "
            f"'{container}' (named by its last entry)"
        )
    if last < len(outputs) - 1:
        notes.append(
            f"layers {last + 1}..{len(outputs) - 1} stay sequential after the chain: layer "
            f"'{paths[last + 1]}' differs from '{paths[last]}'"
        )
    template = build_template(outputs[last - p], outputs[last], paths[last], last)
    in_template = set(template.nodes)
    group_side = [n for j in range(last - p + 1, last + 1) for n in read_outside[j][:-1]]
    template.side_outputs = [n for n in group_side if n in in_template]
    position = {n: k for k, n in enumerate(template.nodes)}
    layers = [template]
    for i in range(last - p, -1, -p):
        try:
            hidden, nodes, externals = match_layer(template, outputs[i])
        except _Mismatch as why:
            notes.append(
                f"layers 0..{i} stay sequential: layer '{paths[i]}' differs from the template "
                f"'{paths[last]}' ({why})"
            )
            break
        if i - p >= 0 and hidden is not outputs[i - p]:
            notes.append(
                f"layers 0..{i} stay sequential: layer '{paths[i]}' reads {hidden.name}, not the "
                f"previous layer's output {outputs[i - p].name}"
            )
            break
        layer = Layer(i, paths[i], hidden, outputs[i], nodes, externals)
        layer.side_outputs = [nodes[position[n]] for n in template.side_outputs]
        layers.append(layer)
    layers.reverse()
    return container, layers, notes


_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
           "normal", "randperm", "poisson", "uniform", "exponential", "geometric", "log_normal", "cauchy",
           "random"}  # fmt: skip
_DROPOUTS = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}


def _draws(n: fx.Node) -> bool:
    """Whether ``n`` draws random numbers: a random op, dropout in train mode, or attention with
    dropout."""
    target = n.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target._opname.rstrip("_")
    if name in _DROPOUTS:
        return len(n.args) >= 3 and n.args[2] is not False and not _is_zero(n.args[1])
    if name == "scaled_dot_product_attention":
        p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        return not _is_zero(p)
    return name in _RANDOM


def _is_zero(p: object) -> bool:
    return isinstance(p, (int, float)) and p == 0


def _refuse_random_ops(template: Layer) -> None:
    """A layer that draws random numbers (``randn_like``, dropout in train mode) is not one
    function of its input: the solve evaluates each layer several times, each with a new draw."""
    for n in template.nodes:
        if _draws(n):
            raise SNLPRefusal(
                f"layer '{template.module_path}' draws random numbers ({n.target}): the parallel solve "
                "evaluates each layer several times, each with a new draw, where the model draws once; "
                "compute the noise outside the layers and pass it in",
                node=n.name,
                module_path=innermost_module(n) or template.module_path,
            )


def check_chain(gm: fx.GraphModule, layers: list[Layer]) -> list[HiddenReader]:
    """Prove the hidden state is the only path between consecutive parallel layers.

    Every external a layer reads must be computable before the solve (it may not depend on any
    hidden state of the chain), and nothing outside the layers may read a layer's intermediate
    values. Returns the readers of hidden states outside the chain (final norm, backout...).
    """
    _refuse_random_ops(layers[-1])
    start = layers[0].hidden_in
    region_of: dict[fx.Node, Layer] = {}
    for layer in layers:
        for n in layer.nodes:
            region_of[n] = layer
    downstream = descendants(region_of) - set(region_of)
    outputs = {layer.output: layer.index for layer in layers}
    side_outputs = {n for layer in layers for n in layer.side_outputs}
    for layer in layers:
        for ext in layer.externals:
            if ext in downstream or ext in region_of:
                sources = sorted({region_of[a].index for a in ancestors([ext]) if a in region_of})
                source = (
                    layers[[lay.index for lay in layers].index(sources[-1])].module_path if sources else "?"
                )
                raise SNLPRefusal(
                    f"layer '{layer.module_path}' reads {ext.name} (module '{innermost_module(ext) or '<root>'}'), "
                    f"which is computed from the hidden state of layer '{source}': the layers are not a chain "
                    "linked only by their hidden state, so they cannot be solved in parallel",
                    node=ext.name,
                    module_path=innermost_module(ext),
                )
    readers: list[HiddenReader] = []
    for n in gm.graph.nodes:
        if n in region_of or n is start:
            continue
        for a in n.all_input_nodes:
            if a in region_of and a not in outputs and a not in side_outputs:
                if _is_assert(n):
                    continue
                owner = region_of[a]
                raise SNLPRefusal(
                    f"{n.name} (module '{innermost_module(n)}') reads {a.name}, an intermediate value "
                    f"of layer '{owner.module_path}', not its output: the layer's result is used in an "
                    "unexpected place",
                    node=n.name,
                    module_path=innermost_module(n),
                )
            if (a in outputs or a is start) and not _is_assert(n):
                idx = outputs.get(a, layers[0].index - 1)
                readers.append(HiddenReader(idx, n, innermost_module(n)))
    return readers
