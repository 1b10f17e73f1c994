"""Small helpers over torch.fx graphs shared by the passes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx


def module_paths(node: fx.Node) -> list[str]:
    """The module paths a node was traced under, outermost first ('' is the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        paths.append(path)
    return paths


def innermost_module(node: fx.Node) -> str:
    paths = [p for p in module_paths(node) if not p.startswith("_")]
    return paths[-1] if paths else ""


def _reach(roots: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(step(n))
    return seen


def descendants(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node reachable from roots through users (roots included)."""
    return _reach(roots, lambda n: n.users)


def ancestors(roots: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node roots depend on (roots included)."""
    return _reach(roots, lambda n: n.all_input_nodes)


def flatten_args(value: Any) -> Iterator[Any]:
    """Leaves of an fx argument structure (lists, tuples, dicts), in a fixed order."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from flatten_args(v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            yield ("key", k)
            yield from flatten_args(value[k])
    else:
        yield value


def arg_structure(node: fx.Node) -> tuple[list[Any], str]:
    """Leaves of (args, kwargs) and a signature of their nesting, for structural comparison."""
    leaves = list(flatten_args((node.args, node.kwargs)))

    def shape(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "(" + ",".join(shape(x) for x in v) + ")"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{shape(v[k])}" for k in sorted(v, key=str)) + "}"
        return "."

    return leaves, shape((node.args, node.kwargs))


def call_args(node: fx.Node) -> tuple[Any, ...]:
    """``node.args`` as plain values: torch.fx types them as its ``Argument`` union, while the
    passes read them by the op's schema (an aten op's dim is an int, its operand a Node)."""
    return node.args


def call_kwargs(node: fx.Node) -> Mapping[str, Any]:
    """``node.kwargs`` as plain values, for the same reason as ``call_args``."""
    return node.kwargs


def call_target(node: fx.Node) -> Callable[..., Any]:
    """The function a ``call_function`` node calls (torch.fx types targets as callable or str)."""
    target = node.target
    assert callable(target), f"{node.name} is a {node.op} node, not a call of a function"
    return target


def target_name(node: fx.Node) -> str:
    """The short name of a node's target, as rules match it: 'linear', 'view', 'add', 'getitem'."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def op_name(node: fx.Node) -> str:
    """A readable name for what a node does: 'aten.linear', 'operator.add', a method name..."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op in ("call_module", "get_attr", "placeholder", "output"):
        return f"{node.op}:{t}"
    if isinstance(t, torch._ops.OpOverload):
        return str(t).rsplit(".", 1)[0]
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", "") or ""
    return f"{mod.split('.')[0]}.{name}" if mod else name


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the current one is 0."""
    if a.type != b.type:
        return False
    if a.index == b.index or a.type in ("cpu", "meta"):
        return True
    current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def graph_modules(gm: torch.nn.Module) -> Iterator[fx.GraphModule]:
    """``gm`` and every GraphModule inside it (a rewritten model's solve and its bodies)."""
    return (m for m in gm.modules() if isinstance(m, fx.GraphModule))


def retarget_devices(gm: fx.GraphModule, old: torch.device, new: torch.device) -> int:
    """Point the ``device=`` of the graph's factory ops (arange, ones, full, ...) captured on
    ``old`` at ``new``, in ``gm`` and every GraphModule inside it; returns how many changed.

    torch.export bakes the capture device into factory calls, so a captured model moved with
    ``.to(device)`` would otherwise mix devices (its weights moved, its masks and positions not)."""
    changed = 0
    for module in graph_modules(gm):
        edited = False
        for node in module.graph.nodes:
            device = node.kwargs.get("device") if node.op == "call_function" else None
            if isinstance(device, (torch.device, str)) and _same_device(torch.device(device), old):
                node.kwargs = {**node.kwargs, "device": new}
                edited = True
                changed += 1
        if edited:
            module.recompile()
    return changed


def source_line(node: fx.Node) -> str:
    """Where a node comes from, in the user's words: ``size 0 of idx`` for a symbolic size, else
    the model's source line that computed it (``nanochat.py:195 `x = norm(...)```), else ''."""
    if node.target is torch.ops.aten.sym_size.int and len(node.args) == 2:
        source, dim = node.args
        return f"size {dim} of {getattr(source, 'name', source)}"
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):  # the innermost frame outside torch itself
        if (
            lines[i].startswith("File ")
            and "/torch/" not in lines[i]
            and not lines[i].startswith('File "torch/')
        ):
            parts = lines[i].split('"')
            where = parts[1].rsplit("/", 1)[-1] if len(parts) > 1 else "?"
            number = lines[i].split(", line ")[-1].split(",")[0] if ", line " in lines[i] else "?"
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{where}:{number} `{code}`" if code else f"{where}:{number}"
    return ""
