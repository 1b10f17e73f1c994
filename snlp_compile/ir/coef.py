"""Scalar skip coefficients: the algebra of the "identity" and "elementwise" skip paths.

A coefficient is a small expression tree over the template layer's externals (values that do not
depend on the hidden state h, e.g. nanochat's ``resid_lambdas[i]``): ``Const | Ext | BinOp``.
The skip analysis (``passes.skip_analysis``) builds it; ``emit_coefficient`` writes it into the
layer body so that each layer's own values are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Ext:
    """A template value that does not depend on h, e.g. the layer's resid_lambdas[i]."""

    node: fx.Node

    @property
    def name(self) -> str:
        return self.node.name


BinOpKind = Literal["add", "mul", "div"]


@dataclass(frozen=True)
class BinOp:
    op: BinOpKind
    lhs: Coef
    rhs: Coef


Coef = Const | Ext | BinOp
ZERO = Const(0.0)
ONE = Const(1.0)


def add(a: Coef, b: Coef) -> Coef:
    """a + b, with zeros dropped and constants added up."""
    if a == ZERO:
        return b
    if b == ZERO:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value + b.value)
    return BinOp("add", a, b)


def mul(a: Coef, b: Coef) -> Coef:
    """a * b, with zeros and ones folded and constants multiplied out."""
    if ZERO in (a, b):
        return ZERO
    if a == ONE:
        return b
    if b == ONE:
        return a
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value * b.value)
    return BinOp("mul", a, b)


def is_scalar(c: Coef) -> bool:
    """Whether c is one number per layer (what may scale a stream-mixing matrix)."""
    if isinstance(c, Const):
        return True
    if isinstance(c, Ext):
        val = c.node.meta.get("val")
        return not isinstance(val, torch.Tensor) or all(isinstance(s, int) and s == 1 for s in val.shape)
    if isinstance(c, BinOp):
        return is_scalar(c.lhs) and is_scalar(c.rhs)
    return False


def describe(c: Coef) -> str:
    """A readable formula, e.g. ``(resid_lambdas[layer] * 1)``."""
    if isinstance(c, Const):
        return f"{c.value:g}"
    if isinstance(c, Ext):
        n = c.node
        if (
            n.op == "call_function"
            and n.args
            and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "get_attr"
        ):
            return f"{n.args[0].target}[layer]"
        return str(n.target) if n.op == "get_attr" else c.name
    sym = {"add": "+", "mul": "*", "div": "/"}[c.op]
    return f"({describe(c.lhs)} {sym} {describe(c.rhs)})"


def emit_coefficient(graph: fx.Graph, c: Coef, env: dict[fx.Node, Any]) -> Any:
    """Emit ``c`` into ``graph``; env maps template nodes to the body graph's nodes. A number when
    c folds to one, else a node."""
    if isinstance(c, Const):
        return c.value
    if isinstance(c, Ext):
        return env[c.node]
    lhs = emit_coefficient(graph, c.lhs, env)
    rhs = emit_coefficient(graph, c.rhs, env)
    fns: dict[str, Callable[..., Any]] = {"add": torch.add, "mul": torch.mul, "div": torch.div}
    fn = fns[c.op]
    if not isinstance(lhs, fx.Node) and not isinstance(rhs, fx.Node):
        return fn(torch.tensor(lhs), torch.tensor(rhs)).item()
    if not isinstance(lhs, fx.Node):
        lhs, rhs = rhs, lhs
        if c.op == "div":
            return graph.call_function(torch.mul, (graph.call_function(torch.reciprocal, (lhs,)), rhs))
    return graph.call_function(fn, (lhs, rhs))
