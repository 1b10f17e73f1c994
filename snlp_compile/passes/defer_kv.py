"""Deferred K/V: a decode step's corrected keys/values computed one step late, in the next step's
first batched evaluation, where they share its q/k/v weight read (``SNLPConfig.deferred_kv``).

Why: the K/V a solved decode step hands out must be what each layer computes from its *corrected*
input, known only after the correction, so the plain rewrite reads the k/v projection weights a
second time after the solve (``LayerParallelSolve.side_layers``): 12-16% of a batch-1 step's bytes.
Token t's corrected inputs are known when token t+1's step starts, and token t+1's first evaluation
streams the same fused q/k/v weight, so both become rows of one GEMV. The cache slot of token t
must hold them before token t+1's attention reads it, so the step writes them itself, in place,
at the position of the previous call; the K/V the step returns for its own token are those at its
uncorrected inputs, provisional, replaced by the next step (or by ``flush``). The cache contents
are what the plain rewrite gives, one call later, so exact mode stays exact.

The step must follow the KV-cache protocol of ``models.kv.CachedStep``:
``forward(idx, pos, k_cache, v_cache) -> (logits, new_k, new_v)``, new K/V (L, B, H_kv, 1, D)
written by the caller into the caches (L, B, H_kv, T_max, D) at ``pos`` along dim 3, every layer
in the parallel chain (the step's new K/V are the solve's side outputs). Anything else is refused
with the reason.

``build_deferred_layers`` makes the merged batched evaluation, one graph:
    (u, *externals, u_prev, *prev side externals, pos_prev) -> (*body outputs, *provisional sides)
in which the previous token's side values (computed from ``u_prev``) are written into the caches
at ``pos_prev`` before any node reading a cache runs, and every linear of theirs that reads a row
block of a body linear's weight is computed by that linear's GEMV with their input stacked as an
extra row.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.fx as fx

from ..errors import SNLPRefusal
from ..ir.plan import DeferredPlan
from ..kernels.layer_ops import batched_linear
from ..solve.solver import LayerParallelSolve
from .cleanup import common_subexpressions
from .graph_utils import descendants, flatten_args

aten = torch.ops.aten

SEQ_DIM = 3  # the caches' time axis, (L, B, H_kv, T_max, D), as models.kv.write_cache writes it


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _copy_nodes(graph: fx.Graph, source: fx.GraphModule, env: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """Copy ``source``'s computation into ``graph`` (placeholders bound in ``env``); its outputs."""
    out: list[fx.Node] = []
    for n in source.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            res = n.args[0]
            out = [env[r] for r in (res if isinstance(res, (tuple, list)) else (res,))]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    return out


def _rebuild(graph: fx.Graph, order: Iterable[fx.Node]) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` emitting nodes as ``order`` asks, each after its inputs (a stable
    topological sort: edits may have put a node after its users)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def visit(n: fx.Node) -> None:
        stack = [(n, False)]
        while stack:
            node, ready = stack.pop()
            if node in env:
                continue
            if ready:
                env[node] = new.node_copy(node, lambda a: env[a])
                continue
            stack.append((node, True))
            stack.extend((a, False) for a in reversed(node.all_input_nodes) if a not in env)

    for n in order:
        visit(n)
    return new, env


def _linears(graph: fx.Graph, within: set[fx.Node]) -> list[fx.Node]:
    return [n for n in graph.nodes if n in within and n.op == "call_function" and n.target is batched_linear]


Block = tuple[str, int, int]  # (fused weight, first row, rows)


def _inside(inner: Block | None, outer: Block | None) -> bool:
    return (
        inner is not None
        and outer is not None
        and inner[0] == outer[0]
        and outer[1] <= inner[1]
        and inner[1] + inner[2] <= outer[1] + outer[2]
    )


def _share_weight_reads(
    graph: fx.Graph, main: set[fx.Node], prev: set[fx.Node], block_of: Callable[[object], Block | None]
) -> list[str]:
    """Each linear of the previous token's side values whose weight is a row block of a body
    linear's weight becomes a second row of that linear's GEMV; a body-input linear reading such a
    block with the same input (the provisional side values, after CSE) becomes a slice of it.
    Returns the weight blocks shared."""
    shared: list[str] = []
    hosts: list[tuple[fx.Node, Block, fx.Node]] = []  # (input, weight block, output) of body GEMVs
    for m in _linears(graph, main):
        blk = block_of(m.args[1])
        if blk is not None and isinstance(m.args[0], fx.Node):
            hosts.append((m.args[0], blk, m))
    for p in _linears(graph, prev):
        blk = block_of(p.args[1])
        k = next((k for k, (_, hb, _) in enumerate(hosts) if _inside(blk, hb)), None)
        if k is None or blk is None:
            continue
        x, hb, m = hosts[k]
        with graph.inserting_before(p):
            rows = graph.call_function(torch.stack, ([x, p.args[0]], -2))
            both = graph.call_function(batched_linear, (rows, m.args[1]))
            mine = graph.call_function(aten.select.int, (both, -2, 0))
            theirs = graph.call_function(aten.select.int, (both, -2, 1))
            block = graph.call_function(
                aten.slice.Tensor, (theirs, -1, blk[1] - hb[1], blk[1] - hb[1] + blk[2])
            )
        m.replace_all_uses_with(mine)
        p.replace_all_uses_with(block)
        graph.erase_node(m)
        graph.erase_node(p)
        hosts[k] = (x, hb, mine)
        shared.append(f"{hb[0]}[{blk[1]}:{blk[1] + blk[2]}]")
    for p in _linears(graph, main):
        blk = block_of(p.args[1])
        k = next(
            (
                k
                for k, (x, hb, out) in enumerate(hosts)
                if out is not p and x is p.args[0] and _inside(blk, hb)
            ),
            None,
        )
        if k is None or blk is None:
            continue
        _, hb, out = hosts[k]
        with graph.inserting_before(p):
            block = graph.call_function(aten.slice.Tensor, (out, -1, blk[1] - hb[1], blk[1] - hb[1] + blk[2]))
        p.replace_all_uses_with(block)
        graph.erase_node(p)
    return shared


def build_deferred_layers(
    layers: fx.GraphModule,
    side_layers: fx.GraphModule,
    ext_names: list[str],
    ext_modes: Sequence[str],
    blocks: dict[str, Block],
    cache_ext: list[int],
) -> tuple[fx.GraphModule, list[int], list[str]]:
    """The merged first evaluation of a deferred-K/V solve (see the module docstring).

    ``cache_ext[s]``: the index (into the externals) of the cache side output s is written to.
    ``blocks``: every stacked 3-D weight's name -> (fused weight it is rows of, first row, rows),
    ``(itself, 0, all rows)`` for a weight of its own. Returns the graph, the externals whose
    previous-call values the solve keeps (non-stacked tensors the side values read), and the
    weight reads it shared."""
    lph, sph = _placeholders(layers), _placeholders(side_layers)
    if len(lph) != len(sph) or len(lph) != 1 + len(ext_names):
        raise SNLPRefusal("deferred_kv: the body and its side outputs do not share one calling convention")
    for s, ci in enumerate(cache_ext):
        if sph[1 + ci].users:
            raise SNLPRefusal(
                f"deferred_kv: side output {s} reads the cache '{ext_names[ci]}' it is written to",
                node=ext_names[ci],
            )
    graph = fx.Graph()
    main_in = [graph.placeholder(str(p.target)) for p in lph]
    for new, old in zip(main_in, lph):
        new.meta = dict(old.meta)
    u_prev = graph.placeholder("u_prev")
    saved = [
        i
        for i, mode in enumerate(ext_modes)
        if mode != "stacked" and sph[1 + i].users and _is_tensor(sph[1 + i])
    ]
    saved_in = {i: graph.placeholder(f"prev_{ext_names[i]}") for i in saved}
    graph.placeholder("pos_prev")

    env: dict[fx.Node, fx.Node] = dict(zip(lph, main_in))
    body_out = _copy_nodes(graph, layers, env)
    env_prev: dict[fx.Node, fx.Node] = {sph[0]: u_prev}
    env_prev.update({sph[1 + i]: saved_in.get(i, main_in[1 + i]) for i in range(len(ext_names))})
    prev_out = _copy_nodes(graph, side_layers, env_prev)
    provisional = _copy_nodes(graph, side_layers, dict(zip(sph, main_in)))
    # the previous token's values ride along as outputs while the edits below may replace them
    graph.output((*body_out, *provisional, *prev_out))
    gm = fx.GraphModule(torch.nn.Module(), graph, class_name="DeferredLayers")
    common_subexpressions(gm)  # e.g. the provisional copy's normalised input is the body's
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    main_in, u_prev, pos_prev = phs[: len(lph)], phs[len(lph)], phs[-1]
    prev = _strict_descendants(phs[len(lph) : -1])  # computed from the previous token's inputs
    main = {n for n in graph.nodes if n.op == "call_function"} - prev
    names = {ph: name for ph, name in zip(main_in[1:], ext_names)}
    shared = _share_weight_reads(
        graph, main, prev, lambda w: blocks.get(names.get(w, "")) if isinstance(w, fx.Node) else None
    )
    out = next(n for n in graph.nodes if n.op == "output")
    results = list(out.args[0])
    n_keep = len(body_out) + len(provisional)
    keep, prev_vals = results[:n_keep], results[n_keep:]
    out.args = (tuple(keep),)

    # the previous token's K/V written at pos_prev, before every node that reads a cache
    caches = [main_in[1 + ci] for ci in cache_ext]
    reads = _strict_descendants(caches)
    with graph.inserting_before(out):
        index = graph.call_function(aten.reshape.default, (pos_prev, [1]))
        writes = [
            graph.call_function(
                aten.index_put_.default,
                (cache, [None] * SEQ_DIM + [index], graph.call_method("type_as", (value, cache))),
            )
            for cache, value in zip(caches, prev_vals)
        ]
    order = [n for n in graph.nodes if n not in reads and n not in writes and n.op != "output"]
    order += writes + [n for n in graph.nodes if n in reads or n.op == "output"]
    graph, _ = _rebuild(graph, order)
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="DeferredLayers"), saved, shared


def _strict_descendants(roots: list[fx.Node]) -> set[fx.Node]:
    """Nodes computed from roots, the roots (placeholders, whose order is the calling convention)
    left out."""
    return descendants(roots) - set(roots)


def _is_tensor(ph: fx.Node) -> bool:
    val = ph.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def protocol_caches(
    gm: fx.GraphModule, solve_node: fx.Node, num_layers: int
) -> tuple[fx.Node, list[fx.Node], list[int]]:
    """Check the rewritten step follows the CachedStep protocol and find, for each side output,
    the cache input it is written to. Returns (position input, cache inputs, cache argument
    indices among the solve's call arguments). Refusals name what does not match."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 4:
        raise SNLPRefusal(
            f"deferred_kv needs a step forward(idx, pos, k_cache, v_cache) (models.kv.CachedStep); "
            f"this one takes {len(inputs)} inputs ({', '.join(n.name for n in inputs)})"
        )
    pos, caches = inputs[1], inputs[2:]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(flatten_args(out.args[0]))
    if len(flat) != 3:
        raise SNLPRefusal(
            f"deferred_kv needs a step returning (logits, new_k, new_v); this one returns {len(flat)} values"
        )
    arg_of: list[int] = []
    for s, (new, cache) in enumerate(zip(flat[1:], caches)):
        if not (
            isinstance(new, fx.Node) and new.target is operator.getitem and new.args == (solve_node, 1 + s)
        ):
            raise SNLPRefusal(
                f"deferred_kv: the step's output {1 + s} ({getattr(new, 'name', new)}) is not the solve's side "
                f"output {s}: every layer must be in the parallel chain and hand out its K/V unchanged",
                node=getattr(new, "name", None),
            )
        val = cache.meta.get("val")
        if isinstance(val, torch.Tensor) and (val.dim() != 5 or int(val.shape[0]) != num_layers):
            raise SNLPRefusal(
                f"deferred_kv: cache '{cache.name}' has shape {tuple(val.shape)}; expected (L={num_layers}, B, H_kv, T_max, D)",
                node=cache.name,
            )
        found = None
        for k, a in enumerate(solve_node.args):
            if a is cache or (
                isinstance(a, fx.Node)
                and a.target is aten.slice.Tensor
                and a.args[:4] == (cache, 0, 0, num_layers)
            ):
                found = k
        if found is None:
            raise SNLPRefusal(
                f"deferred_kv: the solve does not read cache '{cache.name}' as one slice of all layers",
                node=cache.name,
            )
        arg_of.append(found)
    return pos, list(caches), arg_of


def defer_kv(gm: fx.GraphModule, solve_name: str) -> list[str]:
    """Rewrite a transformed decode step (models.kv.CachedStep protocol) in place so that its
    solve defers the K/V side outputs (module docstring); returns notes for the report."""
    solve = gm.get_submodule(solve_name)
    if not isinstance(solve, LayerParallelSolve):
        raise TypeError(f"{solve_name} is not a LayerParallelSolve")
    call = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == solve_name), None)
    if call is None or solve.side_layers is None:
        raise SNLPRefusal("deferred_kv: the layers hand out no K/V (no side outputs) to defer")
    if solve.num_stages != 1:
        raise SNLPRefusal("deferred_kv needs stages=1 (the merged evaluation covers all layers at once)")
    if solve.layers is None:
        raise SNLPRefusal("deferred_kv needs fused_layers=1 (wide layers have no per-layer body to merge)")
    pos, caches, arg_of = protocol_caches(gm, call, solve.num_layers)
    idx = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = idx.meta.get("val")
    if (
        isinstance(val, torch.Tensor)
        and val.dim() == 2
        and not (isinstance(val.shape[1], int) and val.shape[1] == 1)
    ):
        raise SNLPRefusal(
            f"deferred_kv is for decode steps of one new token; this step takes {val.shape[1]} (prefill is "
            "transformed without it)",
            node=idx.name,
        )
    passed = [i for i, mode in enumerate(solve.ext_modes) if mode != "stacked"]
    cache_ext = [passed[k - 1] for k in arg_of]
    args = list(call.args)
    for k, cache in zip(arg_of, caches):
        args[k] = cache  # the whole cache (all layers): an in-place write to it, not to a slice view
    call.args = tuple(args)
    call.kwargs = {**call.kwargs, "position": pos}
    blocks: dict[str, Block] = {}
    for name, mode in zip(solve.ext_names, solve.ext_modes):
        value = getattr(solve, f"stacked_{name}", None) if mode == "stacked" else None
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            view = solve.row_blocks.get(name)
            blocks[name] = (view.base, view.start, view.rows) if view else (name, 0, int(value.shape[1]))
    merged, saved, shared = build_deferred_layers(
        solve.layers, solve.side_layers, solve.ext_names, solve.ext_modes, blocks, cache_ext
    )
    solve.enable_deferred(DeferredPlan(merged, tuple(saved), tuple(shared)))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return [
        "K/V deferred: each step writes the previous token's corrected K/V into "
        + ", ".join(c.name for c in caches)
        + f" at its position, computed by the first evaluation's GEMVs ({', '.join(shared) or 'no weight shared'})"
    ]
