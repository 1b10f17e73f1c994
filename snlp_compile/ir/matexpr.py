"""Matrix expressions: the skip matrix A of a stream-mixing (HCN) skip path, and its emission.

The stream analysis (``passes.stream_analysis``) finds A as an expression over graph values of
the template layer (``MNode``), the identity, row selections, products, sums and scalar scales;
``StreamMix`` is the coefficient of a "matrix" ``SkipPath``; ``emit_matrix`` writes A into the
layer body, where each layer's own values are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from .coef import ONE, Coef, Const, emit_coefficient
from .stream_layout import StreamLayout, concrete_size

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class MEye:
    n: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, self.n)


@dataclass(frozen=True, eq=False)
class MNode:
    """A graph value rearranged to the canonical (*batch, rows, cols) form by ``ops``:
    ("select", dim) picks index 0 of a unit axis, ("permute", dims), ("flatten", start, end),
    ("unsqueeze", dim)."""

    node: fx.Node
    ops: tuple[tuple[Any, ...], ...]
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class MRows:
    a: MatExpr
    rows: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-2], len(self.rows), self.a.shape[-1])


@dataclass(frozen=True, eq=False)
class MMul:
    a: MatExpr
    b: MatExpr

    @property
    def shape(self) -> tuple[int, ...]:
        batch = torch.broadcast_shapes(self.a.shape[:-2], self.b.shape[:-2])
        return (*batch, self.a.shape[-2], self.b.shape[-1])


@dataclass(frozen=True, eq=False)
class MAdd:
    a: MatExpr
    b: MatExpr

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(self.a.shape, self.b.shape))


@dataclass(frozen=True, eq=False)
class MScale:
    scale: Coef  # a scalar coefficient (ir.coef)
    a: MatExpr

    @property
    def shape(self) -> tuple[int, ...]:
        return self.a.shape


MatExpr = MEye | MNode | MRows | MMul | MAdd | MScale


def mat_nodes(m: MatExpr) -> list[fx.Node]:
    """The graph values the matrix is computed from."""
    if isinstance(m, MNode):
        return [m.node]
    if isinstance(m, (MRows, MScale)):
        return mat_nodes(m.a)
    if isinstance(m, (MMul, MAdd)):
        return mat_nodes(m.a) + mat_nodes(m.b)
    return []


def describe_matrix(m: MatExpr, name: Any = None) -> str:
    """A readable formula for A; ``name`` maps graph values to names (default: node names)."""
    if isinstance(m, MEye):
        return "I"
    if isinstance(m, MNode):
        return name(m.node) if name is not None else m.node.name
    if isinstance(m, MRows):
        rows = m.rows
        span = (
            f"{rows[0]}..{rows[-1]}"
            if rows == tuple(range(rows[0], rows[-1] + 1))
            else ",".join(map(str, rows))
        )
        inner = describe_matrix(m.a, name)
        return f"({inner})[rows {span}]" if isinstance(m.a, (MMul, MAdd)) else f"{inner}[rows {span}]"
    if isinstance(m, MMul):
        return f"{describe_matrix(m.a, name)} @ {describe_matrix(m.b, name)}"
    if isinstance(m, MAdd):
        return f"({describe_matrix(m.a, name)} + {describe_matrix(m.b, name)})"
    return f"c * {describe_matrix(m.a, name)}"


def take_rows(a: MatExpr, rows: tuple[int, ...]) -> MatExpr:
    """Rows of A, pushed into the left factor of products and sums (fewer rows to multiply)."""
    if rows == tuple(range(a.shape[-2])):
        return a
    if isinstance(a, MMul):
        return MMul(take_rows(a.a, rows), a.b)
    if isinstance(a, MAdd):
        return MAdd(take_rows(a.a, rows), take_rows(a.b, rows))
    if isinstance(a, MScale):
        return MScale(a.scale, take_rows(a.a, rows))
    if isinstance(a, MRows):
        return take_rows(a.a, tuple(a.rows[r] for r in rows))
    return MRows(a, rows)


def scale(c: Coef, a: MatExpr) -> MatExpr:
    """c * A, with constant factors multiplied out."""
    if isinstance(a, MScale) and isinstance(c, Const) and isinstance(a.scale, Const):
        c, a = Const(c.value * a.scale.value), a.a
    return a if c == ONE else MScale(c, a)


def product(a: MatExpr, b: MatExpr) -> MatExpr:
    if isinstance(b, MEye):
        return a
    if isinstance(a, MEye):
        return b
    if isinstance(b, MScale) and isinstance(b.a, MEye):
        return scale(b.scale, a)
    if isinstance(a, MScale) and isinstance(a.a, MEye):
        return scale(a.scale, b)
    return MMul(a, b)


@dataclass(frozen=True, eq=False)
class StreamMix:
    """The coefficient of a "matrix" SkipPath: h -> from_streams(matrix @ to_streams(h)).

    ``dynamic``: the matrix depends on h (per-token H, frozen at the iterate), else it is static."""

    matrix: MatExpr
    layout: StreamLayout
    hidden_in: fx.Node
    dynamic: bool

    @property
    def n(self) -> int:
        return self.layout.n


def _concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(concrete_size(s) for s in val.shape)
    return None


def eye_like(ref: Tensor, n: int) -> Tensor:
    """The n x n identity in ref's dtype and device (the same for every layer)."""
    return torch.eye(n, dtype=ref.dtype, device=ref.device)


# call targets whose value is the same for every layer although they read the hidden state (for
# its dtype and device only): batching copies them unbatched, and a skip matrix reading h only
# through them is static
LAYER_INVARIANT: frozenset[object] = frozenset({eye_like})


def emit_matrix(graph: fx.Graph, m: MatExpr, env: dict[fx.Node, Any], hidden: fx.Node) -> fx.Node:
    """Emit A into ``graph`` (env maps template nodes to the body's); every node gets a meta
    value of A's canonical shape, which the batching pass reads for ranks."""
    dtype = getattr(hidden.meta.get("val"), "dtype", torch.float32)

    def node(fn: Any, args: tuple[Any, ...], shape: tuple[int, ...]) -> fx.Node:
        out = graph.call_function(fn, args)
        out.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def emit(m: MatExpr) -> fx.Node:
        if isinstance(m, MEye):
            return node(eye_like, (env[hidden], m.n), m.shape)
        if isinstance(m, MNode):
            x = env[m.node]
            shape = list(_concrete_shape(m.node) or ())
            for op in m.ops:
                if op[0] == "select":
                    del shape[op[1]]
                    x = node(aten.select.int, (x, op[1], 0), tuple(shape))
                elif op[0] == "permute":
                    shape = [shape[d] for d in op[1]]
                    x = node(aten.permute.default, (x, list(op[1])), tuple(shape))
                elif op[0] == "flatten":
                    start, end = op[1], op[2]
                    merged = 1
                    for size in shape[start : end + 1]:
                        merged *= size
                    shape[start : end + 1] = [merged]
                    x = node(aten.flatten.using_ints, (x, start, end), tuple(shape))
                else:
                    shape.insert(op[1], 1)
                    x = node(aten.unsqueeze.default, (x, op[1]), tuple(shape))
            return x
        if isinstance(m, MRows):
            a = emit(m.a)
            runs: list[tuple[int, int]] = []
            for r in m.rows:
                if runs and runs[-1][1] == r:
                    runs[-1] = (runs[-1][0], r + 1)
                else:
                    runs.append((r, r + 1))
            parts = []
            for start, stop in runs:
                part_shape = (*m.a.shape[:-2], stop - start, m.a.shape[-1])
                parts.append(node(aten.slice.Tensor, (a, -2, start, stop), part_shape))
            return parts[0] if len(parts) == 1 else node(aten.cat.default, (parts, -2), m.shape)
        if isinstance(m, MMul):
            return node(torch.matmul, (emit(m.a), emit(m.b)), m.shape)
        if isinstance(m, MAdd):
            return node(torch.add, (emit(m.a), emit(m.b)), m.shape)
        scale = emit_coefficient(graph, m.scale, env)
        return node(torch.mul, (emit(m.a), scale), m.shape)

    return emit(m)
