"""Split a layer into skip path and branch: a linearity analysis over the template's region.

For every node the analysis computes the coefficient c with which the layer input h enters it
linearly: c(h) = 1; add/sub combine coefficients; a product with (or a division by) a value
that does not depend on h scales it; any other op that consumes h yields 0 (that is branch
territory: attention, MLP, norms). The coefficient of the layer output is the skip map S, the
surrogate Jacobian A = S of docs/DESIGN.md. A zero coefficient means there is no linear path from
input to output (post-norm layers, stacks without skips): refused, naming the op that blocks it.

Coefficients are small expression trees over the template's externals (``ir.coef``), emitted into the body
graph so that each layer's own values (e.g. resid_lambdas[i]) are used.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..errors import SNLPRefusal
from ..ir.chain import Layer, SkipPath
from ..ir.coef import ONE, ZERO, BinOp, Coef, Const, Ext, add, describe, is_scalar, mul
from ..ir.matexpr import StreamMix, describe_matrix, mat_nodes
from .graph_utils import ancestors, descendants, innermost_module, op_name
from .stream_analysis import Mixed, Pre, StreamAnalysis

aten = torch.ops.aten


_ADD = {aten.add.Tensor, aten.add.Scalar, operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {aten.sub.Tensor, aten.sub.Scalar, operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {aten.mul.Tensor, aten.mul.Scalar, operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {aten.div.Tensor, aten.div.Scalar, operator.truediv, torch.div, "div", "div_"}
_NEG = {aten.neg.default, operator.neg, torch.neg, "neg"}
_IDENTITY = {
    aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    "clone", "contiguous", "detach", "to", "type_as", "float",
}  # fmt: skip
# Casts count as the identity: they are linear up to rounding, and a surrogate only has to be
# close to the Jacobian (exactness never depends on it). Note that a cast to the tensor's own
# dtype returns the same tensor, so export may route the residual itself through it.


def analyse_skip(layer: Layer) -> SkipPath:
    """The skip map of ``layer`` (the template), or SNLPRefusal naming what blocks it."""
    h_dependent = descendants([layer.hidden_in])
    coef: dict[fx.Node, Any] = {layer.hidden_in: ONE}  # Coef, or a stream value (Pre / Mixed)
    blockers: list[fx.Node] = []
    stream = StreamAnalysis(layer.hidden_in, h_dependent)

    def of(a: Any) -> Coef:
        if isinstance(a, fx.Node):
            return coef.get(a, ZERO)
        return ZERO

    def factor(a: Any) -> Coef | None:
        """a as a coefficient if it does not depend on h, else None."""
        if isinstance(a, fx.Node):
            return None if a in h_dependent else Ext(a)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return Const(float(a))
        return None

    def is_linear(a: Any) -> bool:
        return isinstance(a, fx.Node) and of(a) != ZERO

    def scalar_factor(a: Any) -> Coef | None:
        f = factor(a)
        return f if f is not None and is_scalar(f) else None

    def visit_stream(n: fx.Node) -> Any:
        found = stream.visit(n, of, is_linear, scalar_factor)
        return ZERO if found is None else found

    for n in layer.nodes:
        key = n.target
        args = list(n.args)
        alpha: Any = n.kwargs.get("alpha", 1)
        c: Coef = ZERO
        linear_inputs = [a for a in n.all_input_nodes if of(a) != ZERO]
        if any(isinstance(coef.get(a), (Pre, Mixed)) for a in n.all_input_nodes):
            c = visit_stream(n)  # layout ops, stream mixings and sums of stream values (HCN)
            if c == ZERO and linear_inputs:
                blockers.append(n)
            coef[n] = c
            continue
        try:
            if key in _ADD and len(args) >= 2:
                c = add(of(args[0]), mul(Const(float(alpha)), of(args[1])))
            elif key in _SUB and len(args) >= 2:
                c = add(of(args[0]), mul(Const(-float(alpha)), of(args[1])))
            elif key in _MUL and len(args) >= 2:
                fa, fb = factor(args[0]), factor(args[1])
                if fb is not None:
                    c = mul(of(args[0]), fb)
                elif fa is not None:
                    c = mul(fa, of(args[1]))
                # both depend on h: quadratic, branch
            elif key in _DIV and len(args) >= 2 and not n.kwargs.get("rounding_mode"):
                fb = factor(args[1])
                if fb is not None and of(args[0]) != ZERO:
                    c = BinOp("div", of(args[0]), fb)
            elif key in _NEG:
                c = mul(Const(-1.0), of(args[0]))
            elif key in _IDENTITY or (key is aten.dropout.default and len(args) >= 3 and args[2] is False):
                c = of(args[0])
        except (TypeError, ValueError):
            c = ZERO
        if c == ZERO and linear_inputs:
            c = visit_stream(n)
        if c == ZERO and linear_inputs:
            blockers.append(n)
        coef[n] = c

    out = coef.get(layer.output, ZERO)
    if isinstance(out, Pre) and out.is_identity and is_scalar(out.scale):
        out = out.scale  # h reached the output through identity-like ops or layout round trips
    if isinstance(out, (Pre, Mixed)):
        return _stream_skip(layer, stream, out, h_dependent)
    if out == ZERO:
        blocker = blockers[-1] if blockers else layer.output
        # an einsum/matmul of h that is not a stream mixing HCN can use explains more than the
        # last op that consumed h (often a branch op)
        noted = {note.split(": ", 1)[0]: note.split(": ", 1)[1] for note in stream.notes}
        mixers = [b for b in blockers if b.name in noted]
        blocker = mixers[-1] if mixers else blocker
        why = [noted[blocker.name]] if mixers else []
        if why:
            raise SNLPRefusal(
                f"layer '{layer.module_path}' mixes its input with {op_name(blocker)} ({blocker.name}), which "
                f"HC-Newton cannot use as its skip path: it {why[-1]}. HCN needs a skip path h -> H h with "
                "H an n x n matrix (per layer, or per token) over one stream axis (or one group of axes) of h",
                node=blocker.name,
                module_path=innermost_module(blocker) or layer.module_path,
            )
        raise SNLPRefusal(
            f"layer '{layer.module_path}' has no residual skip path: its output depends on its input only "
            f"through {op_name(blocker)} ({blocker.name}). SNLP needs layers of the form h + f(h) (or "
            "lambda*h + f(h)); a post-norm layer (norm applied after the residual add) or a layer without "
            "a skip connection has no cheap Jacobian surrogate",
            node=blocker.name,
            module_path=innermost_module(blocker) or layer.module_path,
        )
    if out == ONE:
        return SkipPath("identity", out, "identity skip (IDN): correction is a prefix sum over layers")
    return SkipPath(
        "elementwise",
        out,
        f"scaled skip h -> {describe(out)} * h (scaled IDN): correction is an elementwise affine prefix scan",
    )


def _stream_skip(
    layer: Layer, stream: StreamAnalysis, out: Pre | Mixed, h_dependent: set[fx.Node]
) -> SkipPath:
    """The "matrix" SkipPath of a hyper-connection layer, or a refusal saying what did not match."""
    found = stream.finish(out)
    if isinstance(found, str):
        raise SNLPRefusal(
            f"layer '{layer.module_path}' has a linear skip path that is not a stream mixing HCN can "
            f"solve: {found}",
            node=layer.output.name,
            module_path=layer.module_path,
        )
    matrix, layout = found
    nodes = mat_nodes(matrix)
    dynamic = any(n in h_dependent for n in nodes)
    solver = "a log-depth prefix scan"
    if dynamic:
        how = "dynamic, computed per token from h inside the batched layers and frozen at the iterate"
    elif any(a.op == "placeholder" for a in ancestors(nodes)):
        how = "static (independent of h), computed from the model's inputs before the solve"
    else:
        how = "static (independent of h), folded into the solve's buffers at transform time"
        solver = "precomputed prefix products of the static H (one block matmul)"
    prefix = layer.module_path + "."

    def name(n: fx.Node) -> str:
        if n.op == "get_attr":  # a parameter used as it is: its path inside the layer
            target = str(n.target)
            return f"H({target[len(prefix) :] if target.startswith(prefix) else target})"
        path = innermost_module(n)  # else the sublayer that computes it
        return f"H({path[len(prefix) :].split('.')[0] if path.startswith(prefix) else path or n.name})"

    return SkipPath(
        "matrix",
        StreamMix(matrix, layout, layer.hidden_in, dynamic),
        f"stream-mixing skip h -> H h (HCN) over {layout.n} streams, H = {describe_matrix(matrix, name)} "
        f"{how}, {layout.describe()}: HCN correction, the {layout.n} x {layout.n} matrix affine recurrence "
        f"over the layers by {solver}",
    )
