"""Stream layout: how a hyper-connection model's hidden state is viewed as (*batch, n, m) streams.

HC-Newton's correction h_j = A_j h_{j-1} + d_j multiplies by n x n stream-mixing matrices, so it
needs the hidden state as a tensor whose second-to-last axis is the stream axis. Models store the
streams in their own layout: (B, T, n, D) (the reference mHC model: nothing to do), or folded
into the batch, (B*n, T, D) (the hyper-connections package). ``StreamLayout`` is the sequence of
pure layout ops (reshape, permute, unsqueeze, squeeze) that the model itself applies to its
hidden state before mixing the streams, recorded in a size-generic form and replayed, forwards
(``to_streams``) and backwards (``from_streams``), on tensors with any number of leading axes
(the solve's layer axis) and any batch/sequence sizes.

Everything is plain tensor code on ``x.shape`` arithmetic: it traces under torch.compile,
torch.export and ONNX export like the rest of the solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Shape = tuple[Any, ...]  # ints, or SymInts while tracing


@dataclass(frozen=True)
class Reshape:
    """Regroup dims: each group maps consecutive input dims to consecutive output dims of equal
    total size. Output sizes are static ints, or None for the (at most one per group) size that
    follows the input's run-time sizes (batch, sequence)."""

    groups: tuple[tuple[int, tuple[int | None, ...]], ...]  # (number of input dims, output sizes)

    def out_shape(self, shape: Shape) -> Shape:
        # plain loops, no generators: torch.compile traces this without a graph break
        out: list[Any] = []
        i = 0
        for n_in, sizes in self.groups:
            total: Any = 1
            for k in range(i, i + n_in):
                total = total * shape[k]
            i += n_in
            static = 1
            for size in sizes:
                if size is not None:
                    static *= size
            for size in sizes:
                out.append(total // static if size is None else size)
        return tuple(out)


@dataclass(frozen=True)
class Permute:
    dims: tuple[int, ...]

    def out_shape(self, shape: Shape) -> Shape:
        return tuple([shape[d] for d in self.dims])


@dataclass(frozen=True)
class Unsqueeze:
    dim: int  # position in the output

    def out_shape(self, shape: Shape) -> Shape:
        return (*shape[: self.dim], 1, *shape[self.dim :])


@dataclass(frozen=True)
class Squeeze:
    dim: int  # a unit dim of the input

    def out_shape(self, shape: Shape) -> Shape:
        return (*shape[: self.dim], *shape[self.dim + 1 :])


LayoutOp = Reshape | Permute | Unsqueeze | Squeeze


def apply_op(op: LayoutOp, x: Tensor, rank: int) -> Tensor:
    """``op`` on the trailing ``rank`` dims of ``x`` (leading dims, e.g. the layer axis, ride along)."""
    lead = x.dim() - rank
    if isinstance(op, Reshape):
        return x.reshape(*x.shape[:lead], *op.out_shape(tuple(x.shape[lead:])))
    if isinstance(op, Permute):
        return x.permute([*range(lead), *[lead + d for d in op.dims]])
    if isinstance(op, Unsqueeze):
        return x.unsqueeze(lead + op.dim)
    return x.squeeze(lead + op.dim)


def invert_op(op: LayoutOp, y: Tensor, in_shape: Shape) -> Tensor:
    """The inverse of ``op`` on the trailing dims of ``y``; ``in_shape`` is the op's input shape."""
    lead = y.dim() - len(op.out_shape(in_shape))
    if isinstance(op, Reshape):
        return y.reshape(*y.shape[:lead], *in_shape)
    if isinstance(op, Permute):
        inverse = [op.dims.index(d) for d in range(len(op.dims))]
        return y.permute([*range(lead), *[lead + d for d in inverse]])
    if isinstance(op, Unsqueeze):
        return y.squeeze(lead + op.dim)
    return y.unsqueeze(lead + op.dim)


@dataclass(frozen=True)
class StreamLayout:
    """h (rank ``rank``) -> Z = (*batch, n, m), the stream view of the hidden state, and back."""

    ops: tuple[LayoutOp, ...]
    rank: int  # rank of the hidden state (without leading axes)
    n: int  # number of streams

    def shapes(self, h_shape: Shape) -> list[Shape]:
        """The shape before each op and, last, the stream view's shape."""
        shapes = [tuple(h_shape)]
        for op in self.ops:
            shapes.append(op.out_shape(shapes[-1]))
        return shapes

    def to_streams(self, x: Tensor) -> Tensor:
        rank = self.rank
        for op in self.ops:
            out_rank = len(op.out_shape(tuple(x.shape[x.dim() - rank :])))
            x = apply_op(op, x, rank)
            rank = out_rank
        return x

    def from_streams(self, z: Tensor, h_shape: Shape) -> Tensor:
        """Back to the hidden state's layout; ``h_shape`` is the hidden state's (run-time) shape."""
        shapes = self.shapes(h_shape)
        for op, in_shape in zip(reversed(self.ops), reversed(shapes[:-1])):
            z = invert_op(op, z, in_shape)
        return z

    @property
    def is_identity(self) -> bool:
        return not self.ops

    def describe(self) -> str:
        if not self.ops:
            return "streams on axis -2 of the hidden state"
        return "streams viewed through " + ", ".join(_describe_op(op) for op in self.ops)


def _describe_op(op: LayoutOp) -> str:
    if isinstance(op, Reshape):
        sizes = [s for _, group in op.groups for s in group]
        return "reshape(" + ", ".join("*" if s is None else str(s) for s in sizes) + ")"
    if isinstance(op, Permute):
        return f"permute{op.dims}"
    return f"{type(op).__name__.lower()}({op.dim})"


def reshape_groups(
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    in_dynamic: tuple[bool, ...],
    out_dynamic: tuple[bool, ...],
) -> Reshape | None:
    """A size-generic Reshape for a reshape seen with concrete shapes, or None when the output
    sizes cannot be derived from the input's run-time sizes (two dynamic sizes in one group, or
    a group whose dynamic sizes do not line up, which the example sizes could not tell apart)."""
    groups: list[tuple[int, tuple[int | None, ...]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        n_in, outs = 0, []
        p_in = p_out = 1
        # take one dim from each side (unit dims become their own groups), then balance products
        if i < len(in_shape):
            p_in *= in_shape[i]
            i += 1
            n_in += 1
        if j < len(out_shape):
            p_out *= out_shape[j]
            outs.append(j)
            j += 1
        while p_in != p_out:
            if p_in < p_out and i < len(in_shape):
                p_in *= in_shape[i]
                i += 1
                n_in += 1
            elif p_out < p_in and j < len(out_shape):
                p_out *= out_shape[j]
                outs.append(j)
                j += 1
            else:
                return None
        dynamic = [k for k in outs if out_dynamic[k]]
        if len(dynamic) > 1 or bool(dynamic) != any(in_dynamic[i - n_in : i]):
            return None
        groups.append((n_in, tuple(None if out_dynamic[k] else out_shape[k] for k in outs)))
    return Reshape(tuple(groups))


def concrete_size(s: Any) -> int:
    """The example value of a (possibly symbolic) size, for analysis at transform time."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        hint = getattr(s.node, "hint", None)
        if hint is not None:
            return int(hint)
        from torch.fx.experimental import symbolic_shapes

        for name in ("hint_int", "guarding_hint_or_throw"):
            fn = getattr(symbolic_shapes, name, None)
            if fn is not None:
                return int(fn(s))
    return int(s)
