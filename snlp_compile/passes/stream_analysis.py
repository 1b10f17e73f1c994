"""Stream-mixing skip paths (HC-Newton): the linearity analysis for hyper-connection layers.

In a hyper-connection layer the residual stream is n streams and the skip path mixes them with an
n x n matrix H_res, an einsum/matmul of the stream tensor with something that does not depend on
it (static H) or that does and is frozen at the current iterate (dynamic, per-token H). This
module follows the hidden state h through such a layer and finds the matrix A of the skip path
h -> from_streams(A @ to_streams(h)), which is the HCN surrogate Jacobian of docs/DESIGN.md.

How values are tracked (all at transform time, on the example's concrete shapes):

- Before the first stream mixing a value linear in h is a re-arrangement of c * h: ``Pre`` keeps
  the index of the h element at every position and the layout ops that produced it.
- The first mixing fixes the stream view Z = (*batch, n, m) of h (its contracted axis is the
  stream axis) and with it ``StreamLayout``, the replayable h -> Z map.
- From then on a linear value is ``Mixed``: at every position p it equals
  sum_k A[batch(p), row(p), k] Z[batch(p), k, col(p)], stored as coordinate tensors
  (batch..., row, col) and a matrix expression A. Layout and indexing ops act on the
  coordinates, mixings multiply A, sums combine rows.

At the layer output the coordinates must be those of h itself with each stream's row mapped to
one row of A; anything else is not a stream mixing and the caller treats it as branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from ..ir.coef import ONE, BinOp, Const, add, is_scalar, mul
from ..ir.matexpr import MAdd, MatExpr, MEye, MNode, product, scale, take_rows
from ..ir.stream_layout import (
    LayoutOp,
    Permute,
    Reshape,
    Squeeze,
    StreamLayout,
    Unsqueeze,
    apply_op,
    concrete_size,
    reshape_groups,
)
from .graph_utils import call_args, call_kwargs, call_target, target_name

aten = torch.ops.aten

# A contracted axis wider than this is a feature projection, not a set of residual streams.
MAX_STREAMS = 64


# -- linear values -------------------------------------------------------------------------------


@dataclass(eq=False)
class Pre:
    """scale * (a re-arrangement of h): ``index`` holds the flat h index at every position."""

    index: Tensor
    ops: tuple[LayoutOp, ...]
    scale: Any
    # False after a reshape whose run-time sizes cannot be derived from h's (e.g. OPT's
    # ``(B*T, C) -> (B, T, C)``): the index is still right (a reshape keeps the flat order), but
    # ``ops`` no longer replay the value, so it cannot define a stream layout
    replayable: bool = True

    @property
    def is_identity(self) -> bool:
        """Every element of h in its own place (e.g. a view and its inverse)."""
        return torch.equal(self.index.reshape(-1), torch.arange(self.index.numel()))


@dataclass(eq=False)
class Mixed:
    """sum_k A[b(p), row(p), k] Z[b(p), k, col(p)]: coords = (b_0, .., b_{nb-1}, row, col)."""

    coords: tuple[Tensor, ...]
    matrix: MatExpr


@dataclass
class _Streams:
    layout: StreamLayout
    z_shape: tuple[int, ...]
    coords_h: tuple[Tensor, ...]  # per Z axis, the coordinate of every h element (h's shape)

    @property
    def nb(self) -> int:
        return len(self.z_shape) - 2


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: Any) -> tuple[int, ...] | None:
    val = _val(node)
    if isinstance(val, torch.Tensor):
        return tuple(concrete_size(s) for s in val.shape)
    return None


def _dynamic(node: fx.Node) -> tuple[bool, ...]:
    return tuple(not isinstance(s, int) for s in _val(node).shape)


def _live(node: fx.Node) -> tuple[bool, ...]:
    """Per axis: not a broadcast unit (symbolic sizes are live even where the example has 1)."""
    return tuple(not isinstance(s, int) or s != 1 for s in _val(node).shape)


_PASS = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to", "_to_copy", "type_as"}
_LAYOUT = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "numpy_T",
           "unsqueeze", "squeeze", "movedim", "expand", "slice", "select", "narrow"}  # fmt: skip
_MIXING = {"einsum", "matmul", "mm", "bmm"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class StreamAnalysis:
    """Tracks values linear in ``hidden_in`` through layout ops and stream mixings."""

    hidden_in: fx.Node
    h_dependent: set[fx.Node]
    streams: _Streams | None = None
    notes: list[str] = field(default_factory=list)

    # conversions ------------------------------------------------------------------------------
    def as_pre(self, value: Any, is_scalar: Any) -> Pre | Mixed | None:
        """A scalar-domain coefficient (c * h) as a Pre value; None when c is not a scalar."""
        if isinstance(value, (Pre, Mixed)):
            return value
        if not is_scalar(value):
            return None
        shape = _shape(self.hidden_in)
        if shape is None:
            return None
        index = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64).reshape(shape)
        return Pre(index, (), value)

    def as_mixed(self, value: Pre | Mixed) -> Mixed | None:
        if isinstance(value, Mixed):
            return value
        if self.streams is None:
            return None
        coords = tuple(c.flatten()[value.index] for c in self.streams.coords_h)
        return Mixed(coords, scale(value.scale, MEye(self.streams.layout.n)))

    # rules ------------------------------------------------------------------------------------
    def visit(self, node: fx.Node, of: Any, is_linear: Any, factor: Any) -> Pre | Mixed | None:
        """The linear value of ``node``, or None (the node is branch territory).

        of(a): the linear value of argument a (Pre, Mixed, or a scalar-domain coefficient);
        is_linear(a): whether a is linear in h; factor(a): a as a scalar coefficient if it does
        not depend on h and has one element, else None.
        """
        if node.op != "call_function":
            return None
        name = target_name(node)
        args = list(call_args(node))
        try:
            if name in _PASS or (name == "dropout" and len(args) >= 3 and args[2] is False):
                return self.as_pre(of(args[0]), is_scalar) if is_linear(args[0]) else None
            if name in _LAYOUT:
                if not is_linear(args[0]) or any(is_linear(a) for a in node.all_input_nodes[1:]):
                    return None
                v = self.as_pre(of(args[0]), is_scalar)
                return None if v is None else self.layout(node, name, v)
            if name in _MIXING:
                return self.mixing(node, name, of, is_linear, is_scalar)
            if name in ("add", "sub") and len(args) >= 2:
                alpha = call_kwargs(node).get("alpha", 1)
                sign = -1.0 if name == "sub" else 1.0
                terms = []
                for k, a in enumerate(args[:2]):
                    if is_linear(a):
                        v = self.as_pre(of(a), is_scalar)
                        if v is None:
                            return None
                        s = 1.0 if k == 0 else sign * float(alpha)
                        terms.append((v, s))
                return self.combine(node, terms, mul, add) if terms else None
            if name == "neg":
                v = self.as_pre(of(args[0]), is_scalar)
                return None if v is None else self.scaled(node, v, Const(-1.0), mul)
            if name in ("mul", "div") and len(args) >= 2 and not node.kwargs.get("rounding_mode"):
                lin = [k for k, a in enumerate(args[:2]) if is_linear(a)]
                if len(lin) != 1 or (name == "div" and lin[0] != 0):
                    return None
                f = factor(args[1 - lin[0]])
                v = self.as_pre(of(args[lin[0]]), is_scalar)
                if f is None or v is None:
                    return None
                return self.scaled(node, v, f if name == "mul" else ("div", f), mul)
        except _NotLinear:
            return None
        return None

    def scaled(self, node: fx.Node, v: Pre | Mixed, f: Any, mul: Any) -> Pre | Mixed | None:
        out = _shape(node)
        if isinstance(f, tuple):  # ("div", f): multiply by 1 / f
            f = BinOp("div", ONE, f[1])
        if isinstance(v, Pre):
            if tuple(v.index.shape) != out:
                return None
            return Pre(v.index, v.ops, mul(v.scale, f), v.replayable)
        coords = _broadcast(v.coords, out)
        return Mixed(coords, scale(f, v.matrix))

    def combine(
        self, node: fx.Node, terms: list[tuple[Pre | Mixed, float]], mul: Any, add: Any
    ) -> Pre | Mixed | None:
        out = _shape(node)
        if len(terms) == 1:
            v, s = terms[0]
            return v if s == 1.0 else self.scaled(node, v, Const(s), mul)
        (v1, s1), (v2, s2) = terms
        if (
            isinstance(v1, Pre)
            and isinstance(v2, Pre)
            and tuple(v1.index.shape) == out == tuple(v2.index.shape)
            and torch.equal(v1.index, v2.index)
        ):
            scale_sum = add(mul(Const(s1), v1.scale), mul(Const(s2), v2.scale))
            return Pre(v1.index, v1.ops, scale_sum, v1.replayable and v2.replayable)
        m1, m2 = self.as_mixed(v1), self.as_mixed(v2)
        if m1 is None or m2 is None:
            return None
        c1, c2 = _broadcast(m1.coords, out), _broadcast(m2.coords, out)
        if not all(torch.equal(a, b) for a, b in zip(c1[:-2] + c1[-1:], c2[:-2] + c2[-1:])):
            return None  # the two terms read different (batch, column) positions: not a stream mix
        r2 = m2.matrix.shape[-2]
        pair = c1[-2] * r2 + c2[-2]
        uniq, inverse = torch.unique(pair, return_inverse=True)
        rows1 = tuple(int(x) for x in uniq // r2)
        rows2 = tuple(int(x) for x in uniq % r2)
        a1 = take_rows(m1.matrix, rows1)
        a2 = take_rows(m2.matrix, rows2)
        a1, a2 = scale(Const(s1), a1), scale(Const(s2), a2)
        coords = (*c1[:-2], inverse.reshape(out), c1[-1])
        return Mixed(coords, MAdd(a1, a2))

    def layout(self, node: fx.Node, name: str, v: Pre | Mixed) -> Pre | Mixed | None:
        if isinstance(v, Mixed):
            args = _concrete_args(node)
            fn = call_target(node)
            coords = tuple(fn(c, *args[1:], **_concrete_kwargs(node)) for c in v.coords)
            return Mixed(coords, v.matrix)
        ops = _layout_ops(node, name)
        out_shape = _shape(node)
        if ops is None and name in _RESHAPES and out_shape is not None:
            if v.index.numel() != _numel(out_shape):
                return None
            return Pre(v.index.reshape(out_shape), v.ops, v.scale, replayable=False)
        if ops is None:
            return None
        index = v.index
        for op in ops:
            index = apply_op(op, index, index.dim())
        if tuple(index.shape) != _shape(node):
            return None
        return Pre(index, v.ops + tuple(ops), v.scale, v.replayable)

    def mixing(self, node: fx.Node, name: str, of: Any, is_linear: Any, is_scalar: Any) -> Mixed | None:
        labels = _mixing_labels(node, name)
        if labels is None:
            return None
        (lhs, rhs), out_labels = labels
        args = call_args(node)
        operands = [args[1][0], args[1][1]] if name == "einsum" else [args[0], args[1]]
        lin = [k for k, a in enumerate(operands) if is_linear(a)]
        if len(lin) != 1:
            return None  # h-free, or quadratic in h: branch
        v_node, m_node = operands[lin[0]], operands[1 - lin[0]]
        if not isinstance(m_node, fx.Node):
            return None
        lv, lm = (lhs, rhs) if lin[0] == 0 else (rhs, lhs)
        sv, sm, so = _shape(v_node), _shape(m_node), _shape(node)
        if sv is None or sm is None or so is None:
            return None
        assert isinstance(v_node, fx.Node)  # it has a shape: only nodes do
        v = self.as_pre(of(v_node), is_scalar)
        if v is None:
            return None
        return self.mix(node, v, lv, v_node, lm, m_node, out_labels)

    def reject(self, node: fx.Node, why: str) -> Mixed | None:
        """Note why ``node`` is not a stream mixing; None, so that ``return self.reject(..)`` ends a rule."""
        self.notes.append(f"{node.name}: {why}")
        return None

    def mix(self, node: fx.Node, v: Pre | Mixed, lv: list[str], v_node: fx.Node, lm: list[str],
            m_node: fx.Node, lo: list[str]) -> Mixed | None:  # fmt: skip
        """The mixing out = M (x) V: its contracted axes (one, or a group such as the (fraction,
        stream) pairs of frac-connections) are the streams; M's own output axes are the rows."""
        sv, sm, so = _shape(v_node), _shape(m_node), _shape(node)
        assert sv is not None and sm is not None and so is not None
        v_live, m_live_axes, o_live = _live(v_node), _live(m_node), _live(node)
        size_v, size_m = dict(zip(lv, sv)), dict(zip(lm, sm))
        m_live = [lab for lab, live in zip(lm, m_live_axes) if live]  # unit axes of M broadcast
        contracted = [lab for lab in lv if lab in m_live and lab not in lo]
        if not contracted:
            return self.reject(node, "contracts no axis of the hidden state")
        n_k = 1
        for lab in contracted:
            n_k *= size_v[lab]
        if n_k > MAX_STREAMS:
            return self.reject(
                node, f"contracts {n_k} > {MAX_STREAMS} values per position: a projection, not streams"
            )
        for lab, live in zip(lv, v_live):
            if lab not in lo and lab not in contracted and live:
                return self.reject(node, "sums the hidden state over an axis the mixing matrix does not have")
            if lab in m_live and not live:
                return self.reject(node, "broadcasts the hidden state against the mixing matrix")
        rows = [lab for lab in lo if lab in m_live and lab not in lv]
        if any(lab in m_live and lab not in lv and lab not in lo for lab in lm):
            return self.reject(node, "sums the mixing matrix over one of its own axes")
        if any(lab not in lv and lab not in rows and live for lab, live in zip(lo, o_live)):
            return self.reject(node, "the output has axes the hidden state does not have")
        qks = [lv.index(lab) for lab in contracted]
        if isinstance(v, Pre):
            if self.streams is None and not self.define_streams(v, qks, _dynamic(v_node)):
                return self.reject(
                    node, "its stream operand is not a re-arrangement of the whole hidden state"
                )
            m = self.as_mixed(v)
            if m is None:
                return None
            v = m
        st = self.streams
        assert st is not None
        coords = v.coords
        # the contracted axes must run over whole streams, the same ones at every position
        others = [d for d in range(len(lv)) if d not in qks]
        row_k = coords[-2].permute(others + qks).reshape(-1, n_k)
        rho = row_k[0]
        constant = all(_constant_along(c, q) for c in coords[:-2] + coords[-1:] for q in qks)
        if not bool((row_k == rho).all()) or not constant:
            return self.reject(node, f"its contracted axes are not the stream axis ({st.layout.describe()})")
        # M's other axes are per (batch position) of Z: find which Z batch axis each one is
        batch_axis: dict[str, int] = {}
        for lab in m_live:
            if lab in contracted or lab in rows:
                continue
            a = _z_axis_along(coords, lv.index(lab), st.nb)
            if a is None:
                return self.reject(
                    node, "the mixing matrix varies along an axis that is not a batch axis of the streams"
                )
            batch_axis[lab] = a
        m_expr = _canonical(m_node, lm, sm, batch_axis, rows, contracted, st.nb)
        matrix = product(m_expr, take_rows(v.matrix, tuple(int(x) for x in rho)))
        # output coordinates: V's coordinates at the kept axes, re-ordered as the output's
        keep = [i for i, lab in enumerate(lv) if lab in lo]
        out = []
        for c in coords[:-2] + coords[-1:]:
            t = c
            for i in sorted((i for i in range(len(lv)) if i not in keep), reverse=True):
                t = t.select(i, 0)
            out.append(_arrange(t, [lv[i] for i in keep], lo, so))
        row_coord = torch.zeros(so, dtype=torch.int64)
        stride = 1
        for lab in reversed(rows):  # the row index runs over M's output axes, last fastest
            shape = [1] * len(lo)
            shape[lo.index(lab)] = size_m[lab]
            row_coord = row_coord + stride * torch.arange(size_m[lab]).reshape(shape)
            stride *= size_m[lab]
        return Mixed((*out[:-1], row_coord.expand(so), out[-1]), matrix)

    def define_streams(self, v: Pre, qks: list[int], dynamic: tuple[bool, ...]) -> bool:
        """The first mixing: its contracted axes are the streams. Z = V with the other axes in
        order, the contracted ones merged into one stream axis before the last axis."""
        if not v.replayable:
            return False
        index = v.index
        rank = index.dim()
        rest = [d for d in range(rank) if d not in qks]
        if not rest:
            return False
        perm = [*rest[:-1], *qks, rest[-1]]
        ops = list(v.ops)
        if perm != list(range(rank)):
            ops.append(Permute(tuple(perm)))
            index = index.permute(perm)
        if len(qks) > 1:
            n = 1
            for q in qks:
                n *= int(v.index.shape[q])
            groups = [(1, (None if dynamic[d] else int(v.index.shape[d]),)) for d in rest[:-1]]
            groups += [(len(qks), (n,)), (1, (None if dynamic[rest[-1]] else int(v.index.shape[rest[-1]]),))]
            merge = Reshape(tuple(groups))
            ops.append(merge)
            index = index.reshape(merge.out_shape(tuple(index.shape)))
        flat = index.reshape(-1)
        if not torch.equal(torch.sort(flat).values, torch.arange(flat.numel())):
            return False  # not every element of h, exactly once: not a view of the whole state
        h_shape = _shape(self.hidden_in)
        assert h_shape is not None
        z_shape = tuple(index.shape)
        layout = StreamLayout(tuple(ops), len(h_shape), z_shape[-2])
        grids = []
        for axis, size in enumerate(z_shape):
            shape = [1] * len(z_shape)
            shape[axis] = size
            grids.append(layout.from_streams(torch.arange(size).reshape(shape).expand(z_shape), h_shape))
        self.streams = _Streams(layout, z_shape, tuple(grids))
        return True

    def finish(self, value: Pre | Mixed) -> tuple[MatExpr, StreamLayout] | str:
        """The skip matrix of the layer output ``value`` (n x n per batch position), or why not."""
        st = self.streams
        if st is None:
            return "the output is a re-arrangement of the input (no stream mixing einsum/matmul found)"
        m = self.as_mixed(value)
        assert m is not None
        h = st.coords_h
        if any(tuple(c.shape) != tuple(h[0].shape) for c in m.coords):
            return "the output's linear part does not have the input's shape"
        if not all(torch.equal(a, b) for a, b in zip(m.coords[:-2] + m.coords[-1:], h[:-2] + h[-1:])):
            return (
                "the output's linear part moves values across positions or features, not only across "
                f"the {st.layout.n} streams ({st.layout.describe()})"
            )
        rows = []
        for s in range(st.layout.n):
            at = m.coords[-2][h[-2] == s].unique()
            if at.numel() != 1:
                return f"stream {s} of the output is laid out inconsistently"
            rows.append(int(at))
        return take_rows(m.matrix, tuple(rows)), st.layout


class _NotLinear(Exception):
    pass


def _broadcast(coords: tuple[Tensor, ...], shape: tuple[int, ...] | None) -> tuple[Tensor, ...]:
    if shape is None:
        raise _NotLinear
    return tuple(torch.broadcast_to(c, shape) for c in coords)


def _constant_along(t: Tensor, axis: int) -> bool:
    return bool((t == t.narrow(axis, 0, 1)).all())


def _z_axis_along(coords: tuple[Tensor, ...], q: int, nb: int) -> int | None:
    """The Z batch axis that V's axis q runs over (0, 1, 2, ... along q, every other coordinate
    constant along q), or None."""
    size = coords[0].shape[q]
    ramp = torch.arange(size)
    found = None
    for a, c in enumerate(coords):
        if _constant_along(c, q):
            continue
        if a >= nb or found is not None:
            return None
        moved = c.movedim(q, -1)
        if not bool((moved == ramp).all()):
            return None
        found = a
    return found


def _canonical(node: fx.Node, lm: list[str], sm: tuple[int, ...], batch_axis: dict[str, int], rows: list[str],
               contracted: list[str], nb: int) -> MNode:  # fmt: skip
    """M as (*Z batch, rows, streams): drop unit axes, order the rest, merge the row axes and the
    stream axes into one each, unsqueeze the missing ones."""
    ops: list[tuple[Any, ...]] = []
    labels = list(lm)
    sizes = dict(zip(lm, sm))
    for i in reversed(range(len(labels))):
        if labels[i] not in batch_axis and labels[i] not in rows and labels[i] not in contracted:
            ops.append(("select", i))
            del labels[i]
    batch = sorted((lab for lab in labels if lab in batch_axis), key=lambda lab: batch_axis[lab])
    order = [*batch, *rows, *contracted]
    perm = tuple(labels.index(lab) for lab in order)
    if perm != tuple(range(len(perm))):
        ops.append(("permute", perm))
    b = len(batch)
    if not rows:
        ops.append(("unsqueeze", b))  # a single output row (e.g. H_pre)
    elif len(rows) > 1:
        ops.append(("flatten", b, b + len(rows) - 1))
    if len(contracted) > 1:
        ops.append(("flatten", b + 1, b + len(contracted)))
    present = [batch_axis[lab] for lab in batch]
    for pos in range(nb):
        if pos not in present:
            ops.append(("unsqueeze", pos))
    n_rows, n_cols = 1, 1
    for lab in rows:
        n_rows *= sizes[lab]
    for lab in contracted:
        n_cols *= sizes[lab]
    shape = [1] * (nb + 2)
    for lab in batch:
        shape[batch_axis[lab]] = sizes[lab]
    shape[nb], shape[nb + 1] = n_rows, n_cols
    return MNode(node, tuple(ops), tuple(shape))


def _arrange(t: Tensor, src: list[str], dst: list[str], shape: tuple[int, ...]) -> Tensor:
    """t with axes labelled ``src`` laid out as ``dst`` (missing labels broadcast) and expanded."""
    order = [lab for lab in dst if lab in src]
    t = t.permute([src.index(lab) for lab in order]) if order else t
    view = [t.shape[order.index(lab)] if lab in order else 1 for lab in dst]
    return t.reshape(view).expand(shape)


def _concrete(a: Any) -> Any:
    if isinstance(a, fx.Node):
        val = _val(a)
        if isinstance(val, torch.Tensor):
            raise _NotLinear  # an op indexed by a tensor: not a fixed re-arrangement
        return concrete_size(val) if isinstance(val, (int, torch.SymInt)) else val
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def _concrete_args(node: fx.Node) -> list[Any]:
    return [None, *(_concrete(a) for a in call_args(node)[1:])]


def _concrete_kwargs(node: fx.Node) -> dict[str, Any]:
    return {k: _concrete(v) for k, v in call_kwargs(node).items()}


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _layout_ops(node: fx.Node, name: str) -> list[LayoutOp] | None:
    """The replayable layout op(s) of ``node`` (bijective re-arrangements only)."""
    args = call_args(node)
    x = args[0]
    in_shape, out_shape = _shape(x), _shape(node)
    if in_shape is None or out_shape is None:
        return None
    rank = len(in_shape)
    if name in _RESHAPES:
        op = reshape_groups(in_shape, out_shape, _dynamic(x), _dynamic(node))
        return None if op is None else [op]
    if name == "permute":
        return [Permute(tuple(_norm_dim(d, rank) for d in args[1]))]
    if name in ("transpose", "t", "numpy_T", "movedim"):
        if name in ("t", "numpy_T"):
            a, b = rank - 2, rank - 1
        else:
            a, b = _norm_dim(args[1], rank), _norm_dim(args[2], rank)
        perm = list(range(rank))
        if name == "movedim":
            perm.remove(a)
            perm.insert(b, a)
        else:
            perm[a], perm[b] = perm[b], perm[a]
        return [Permute(tuple(perm))]
    if name == "unsqueeze":
        return [Unsqueeze(_norm_dim(args[1], rank + 1))]
    if name == "squeeze":
        dims = args[1] if len(args) > 1 else [i for i, s in enumerate(in_shape) if s == 1]
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted((_norm_dim(d, rank) for d in dims if in_shape[_norm_dim(d, rank)] == 1), reverse=True)
        return [Squeeze(d) for d in dims]
    return None  # expand, slice, select, narrow: not bijective on the whole hidden state


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _mixing_labels(node: fx.Node, name: str) -> tuple[tuple[list[str], list[str]], list[str]] | None:
    """Per-axis labels of the two operands and the output of an einsum/matmul node."""
    if name == "einsum":
        args = call_args(node)
        eq, operands = args[0], args[1]
        if not isinstance(eq, str) or "->" not in eq or len(operands) != 2:
            return None
        ins, out = eq.replace(" ", "").split("->")
        subs = ins.split(",")
        ranks = [len(_shape(o) or ()) for o in operands]
        ell = [r - (len(s) - 3) if "..." in s else 0 for s, r in zip(subs, ranks)]
        n_ell = max(ell)

        def expand(s: str, count: int) -> list[str]:
            if "..." not in s:
                return list(s)
            head, tail = s.split("...")
            return [*head, *(f"...{i}" for i in range(n_ell - count, n_ell)), *tail]

        lhs, rhs = expand(subs[0], ell[0]), expand(subs[1], ell[1])
        lo = expand(out, n_ell)
        return (lhs, rhs), lo
    args = call_args(node)
    ra, rb = len(_shape(args[0]) or ()), len(_shape(args[1]) or ())
    if ra < 2 or rb < 2:
        return None
    nbatch = max(ra, rb) - 2
    batch = [f"...{i}" for i in range(nbatch)]
    lhs = [*batch[nbatch - (ra - 2) :], "i", "k"]
    rhs = [*batch[nbatch - (rb - 2) :], "k", "m"]
    return (lhs, rhs), [*batch, "i", "m"]


__all__ = ["MAX_STREAMS", "Mixed", "Pre", "StreamAnalysis"]
