"""Batch the layer body over a leading layer axis: one graph evaluates all N parallel layers.

Every value of the body is either *batched* (a leading axis of N layers: the hidden state, the
stacked weights, everything computed from them) or *shared* (the same for every layer: x0, rotary
tables, masks, sizes). Each op is rewritten by a small rule that knows where that axis is:
dims shift by one, weights stacked per layer turn ``linear`` into one einsum (a batched matmul),
attention takes the layer axis as one more batch dim. The result is plain batched ops that eager
PyTorch, Inductor and ONNX all handle, with an op count independent of N. An op without a rule
falls back to ``torch.vmap`` of that op alone, and explain() lists it.

This is what torch.vmap does, written out: vmap itself loops over layers for attention on CPU
(no batching rule for the CPU flash kernel), refuses ``view`` on strided batched inputs, and its
fallback would unroll N ops into exported graphs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import markers
from ..ir.matexpr import LAYER_INVARIANT
from ..kernels.layer_ops import (
    batched_linear,
    batched_linear_dynamic,
    fold_batched_mask,
    fold_shared_mask,
    layer_attention,
    layer_marked,
    layer_matmul,
)
from .graph_utils import call_args, call_kwargs, call_target, target_name

aten = torch.ops.aten

_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "relu", "square", "gelu", "silu", "tanh", "sigmoid", "exp", "log",
    "pow", "rsqrt", "sqrt", "reciprocal", "clamp", "clamp_min", "clamp_max", "where", "maximum", "minimum",
    "_to_copy", "to", "type_as", "abs", "sin", "cos", "erf", "softplus", "eq", "ne", "gt", "lt", "ge", "le",
    "masked_fill", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "logical_not", "sign",
    "leaky_relu", "hardtanh", "elu", "mish", "rsub", "remainder", "floor_divide", "bitwise_and",
    "log1p", "expm1", "tan", "atan", "sinh", "cosh",
}  # fmt: skip

# op name -> (positions of dim arguments, default for each when omitted)
_DIM_ARGS: dict[str, list[tuple[int | str, int | None]]] = {
    "transpose": [(1, None), (2, None)],
    "softmax": [(1, None)],
    "_softmax": [(1, None)],
    "log_softmax": [(1, None)],
    "_log_softmax": [(1, None)],
    "sum": [(1, None)],
    "mean": [(1, None)],
    "amax": [(1, None)],
    "amin": [(1, None)],
    "var": [(1, None)],
    "std": [(1, None)],
    "cat": [(1, 0)],
    "concat": [(1, 0)],
    "split": [(2, 0)],
    "split_with_sizes": [(2, 0)],
    "chunk": [(2, 0)],
    "unbind": [(1, 0)],
    "slice": [(1, 0)],
    "select": [(1, None)],
    "narrow": [(1, None)],
    "unsqueeze": [(1, None)],
    "squeeze": [(1, None)],
    "repeat_interleave": [(2, None)],
    "flatten": [(1, 0), (2, -1)],
    "sym_size": [(1, None)],
    "cumsum": [(1, None)],
    "argmax": [(1, None)],
    "topk": [(2, -1)],
    "roll": [(2, None)],
    "flip": [(1, None)],
    "linalg_vector_norm": [(2, None)],
    "unflatten": [(1, None)],
}

# scatters of a source into a copy of a tensor: op name -> (position of dim, its default)
_SCATTERS = {"slice_scatter": (2, 0), "select_scatter": (2, None)}


def _rank(node: Any) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _shift(d: Any) -> Any:
    if isinstance(d, (list, tuple)):
        return type(d)(_shift(x) for x in d)
    if isinstance(d, int) and d >= 0:
        return d + 1
    return d


def _vmap_op(
    op: Callable[..., Any], in_dims: tuple[Any, Any], args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """Fallback for ops without a rule: torch.vmap over this one op."""
    return torch.vmap(lambda a, k: op(*a, **k), in_dims=in_dims)(args, kwargs)


class _Batcher:
    def __init__(
        self,
        body: fx.GraphModule,
        batched_inputs: list[bool],
        num_layers: int,
        constant_inputs: list[bool] | None = None,
    ):
        self.body = body
        self.n = num_layers
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.batched: dict[fx.Node, bool] = {}
        self.expanded: dict[fx.Node, fx.Node] = {}
        self.fallbacks: list[str] = []
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for node, is_batched in zip(placeholders, batched_inputs):
            self.env[node] = self.graph.placeholder(node.name)
            self.env[node].meta = dict(node.meta)
            self.batched[node] = is_batched
        # placeholders whose values are fixed at transform time (stacked weights)
        self.constant = {n for n, c in zip(placeholders, constant_inputs or []) if c}

    # helpers -----------------------------------------------------------------------------------
    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def is_batched(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and self.batched.get(a, False)

    def any_batched(self, node: fx.Node) -> bool:
        return any(self.batched.get(a, False) for a in node.all_input_nodes)

    def lift(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: self.env[x])

    def align(self, a: Any, rank: int) -> Any:
        """A batched value of original rank r, unsqueezed after the layer axis to rank ``rank``."""
        if not self.is_batched(a):
            return self.env[a] if isinstance(a, fx.Node) else a
        out = self.env[a]
        for _ in range(rank - _rank(a)):
            out = self.call(torch.unsqueeze, out, 1)
        return out

    def expand(self, a: Any) -> Any:
        """A shared tensor given the layer axis (for ops that need every operand batched): one
        view per value, so linears reading the same shared input still see one input node."""
        if self.is_batched(a):
            return self.env[a]
        if a not in self.expanded:
            self.expanded[a] = self.call(
                torch.Tensor.expand, self.call(torch.unsqueeze, self.env[a], 0), self.n, *([-1] * _rank(a))
            )
        return self.expanded[a]

    # rules -------------------------------------------------------------------------------------
    def run(self) -> tuple[fx.GraphModule, list[str]]:
        for node in self.body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outs = call_args(node)[0]
                flat = outs if isinstance(outs, (tuple, list)) else (outs,)
                lifted = tuple(self.expand(o) if isinstance(o, fx.Node) else o for o in flat)
                self.graph.output(lifted if isinstance(outs, (tuple, list)) else lifted[0])
                continue
            if not self.any_batched(node) or node.target in LAYER_INVARIANT:
                self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])
                self.batched[node] = False
                continue
            self.env[node] = self.rule(node)
            self.batched[node] = target_name(node) not in ("sym_size", "size")
        self.graph.lint()
        return fx.GraphModule(torch.nn.Module(), self.graph, class_name="BatchedLayers"), self.fallbacks

    def rule(self, node: fx.Node) -> Any:
        name = target_name(node)
        args, kw = call_args(node), call_kwargs(node)
        if node.target is operator.getitem:
            return self.call(operator.getitem, self.env[args[0]], args[1])
        if name == "copy":  # the functional copy(dst, src) has dst's shape: dst needs the layer axis
            dst, src, *rest = args
            return self.graph.call_function(
                call_target(node),
                (self.expand(dst), self.align(src, _rank(node)), *rest),
                self.lift(dict(kw)),
            )
        if name in _ELEMENTWISE or (name == "dropout" and args[2] is False):
            if name == "dropout":
                return self.env[args[0]]
            rank = _rank(node)
            new_args = [self.align(a, rank) if isinstance(a, fx.Node) else self.lift(a) for a in args]
            new_kwargs = {
                k: self.align(v, rank) if isinstance(v, fx.Node) else self.lift(v) for k, v in kw.items()
            }
            return self.graph.call_function(call_target(node), tuple(new_args), new_kwargs)
        if name in ("view", "reshape", "_unsafe_view"):
            x, shape = args[0], args[1]
            return self.call(torch.reshape, self.env[x], [self.n, *self.lift(list(shape))])
        if name == "expand":  # sizes may add leading dims: they go after the layer axis
            x, shape = args[0], args[1]
            return self.call(
                torch.Tensor.expand, self.align(x, len(shape)), [self.n, *self.lift(list(shape))]
            )
        if name == "permute":
            dims = [0] + [d + 1 if d >= 0 else d for d in args[1]]
            return self.call(torch.permute, self.env[args[0]], dims)
        if name in ("t", "numpy_T"):  # t() of a 0-D or 1-D value is the value itself
            rank = _rank(args[0])
            if rank < 2:
                return self.env[args[0]]
            if name == "numpy_T":  # x.T reverses every dim
                return self.call(torch.permute, self.env[args[0]], [0, *range(rank, 0, -1)])
            return self.call(torch.transpose, self.env[args[0]], -1, -2)
        if name == "addmm":
            bias, a, b = args[:3]
            if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
                return self.fallback(node)
            rank = max(_rank(a), _rank(b))
            out = self.call(torch.matmul, self.align(a, rank), self.align(b, rank))
            return self.call(torch.add, out, self.align(bias, _rank(node)))
        if name in ("linear", "matmul", "mm", "bmm"):
            return self.matmul_rule(node, name)
        if name in ("layer_norm", "rms_norm"):
            return self.norm_rule(node, name)
        if name == "scaled_dot_product_attention":
            return self.attention_rule(node)
        if node.target in markers.MARKED:
            return self.marked_rule(node, markers.MARKED[node.target])
        if name == "einsum":
            return self.einsum_rule(node)
        if name == "expand_as":
            return self.call(torch.Tensor.expand_as, self.align(args[0], _rank(node)), self.expand(args[1]))
        if name in _SCATTERS:
            return self.scatter_rule(node, name)
        if name in _DIM_ARGS and self.is_batched(args[0] if name not in ("cat", "concat") else args[0][0]):
            return self.dim_rule(node, name)
        return self.fallback(node)

    def dim_rule(self, node: fx.Node, name: str) -> Any:
        args = list(call_args(node))
        for pos, default in _DIM_ARGS[name]:
            assert isinstance(pos, int)
            if pos < len(args):
                args[pos] = _shift(args[pos])
            elif pos == len(args) and default is not None:
                args.append(_shift(default))
            else:
                return self.fallback(node)
        first = [self.expand(t) for t in args[0]] if name in ("cat", "concat") else self.env[args[0]]
        rest = [self.lift(a) for a in args[1:]]
        kwargs = {} if name == "sym_size" else self.lift(dict(call_kwargs(node)))
        return self.graph.call_function(call_target(node), (first, *rest), kwargs)

    def scatter_rule(self, node: fx.Node, name: str) -> Any:
        """``slice_scatter``/``select_scatter`` (functionalised ``buf[..., a:b].copy_(src)``): both
        operands given the layer axis, the dim shifted past it."""
        pos, default = _SCATTERS[name]
        args = list(call_args(node))
        dim = args[pos] if pos < len(args) else call_kwargs(node).get("dim", default)
        if not isinstance(dim, int):
            return self.fallback(node)
        kwargs = {k: self.lift(v) for k, v in call_kwargs(node).items() if k != "dim"}
        rest = [self.lift(a) for a in args[2:]]
        if pos < len(args):
            rest[pos - 2] = _shift(dim)
        else:
            kwargs["dim"] = _shift(dim)
        return self.graph.call_function(
            call_target(node), (self.expand(args[0]), self.expand(args[1]), *rest), kwargs
        )

    def einsum_rule(self, node: fx.Node) -> Any:
        """One more subscript, in front, on the batched operands and the output (HC stream mixing)."""
        args = call_args(node)
        eq, operands = args[0], args[1]
        if not isinstance(eq, str) or "->" not in eq:
            return self.fallback(node)
        ins, out = eq.replace(" ", "").split("->")
        label = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq)
        subs = [label + s if self.is_batched(o) else s for s, o in zip(ins.split(","), operands)]
        new_eq = ",".join(subs) + "->" + label + out
        return self.call(aten.einsum.default, new_eq, [self.env[o] for o in operands])

    def matmul_rule(self, node: fx.Node, name: str) -> Any:
        args, kw = call_args(node), call_kwargs(node)
        a, b = args[0], args[1]
        if name == "linear":
            bias = args[2] if len(args) > 2 else kw.get("bias")
            if self.is_batched(b):
                linear = batched_linear if b in self.constant else batched_linear_dynamic
                out = self.call(linear, self.expand(a), self.env[b])
            else:
                out = self.call(F.linear, self.env[a], self.env[b])
            if bias is not None:
                out = self.call(torch.add, out, self.align(bias, _rank(node)))
            return out
        ra, rb = _rank(a), _rank(b)
        if min(ra, rb) == 1:
            return self.matvec_rule(a, b, ra, rb)
        rank = max(ra, rb)
        if self.is_batched(a) and self.is_batched(b):
            return self.call(layer_matmul, self.align(a, rank), self.align(b, rank))
        return self.call(torch.matmul, self.align(a, rank), self.align(b, rank))

    def matvec_rule(self, a: fx.Node, b: fx.Node, ra: int, rb: int) -> Any:
        """matmul with a 1-D operand: as a matrix (so that the layer axis is not taken for the
        vector's), then the unit axis dropped again, as torch.matmul does."""
        xa, xb = self.env[a], self.env[b]
        if ra == 1:
            xa = self.call(torch.unsqueeze, xa, -2)
        if rb == 1:
            xb = self.call(torch.unsqueeze, xb, -1)
        ra2, rb2 = max(ra, 2), max(rb, 2)
        rank = max(ra2, rb2)
        for _ in range(rank - ra2 if self.is_batched(a) else 0):
            xa = self.call(torch.unsqueeze, xa, 1)
        for _ in range(rank - rb2 if self.is_batched(b) else 0):
            xb = self.call(torch.unsqueeze, xb, 1)
        out = self.call(torch.matmul, xa, xb)
        if rb == 1:
            out = self.call(torch.squeeze, out, -1)
        if ra == 1:
            out = self.call(torch.squeeze, out, -1 if rb == 1 else -2)
        return out

    def norm_rule(self, node: fx.Node, name: str) -> Any:
        args, kw = call_args(node), call_kwargs(node)
        x, shape = args[0], args[1]
        weight = args[2] if len(args) > 2 else kw.get("weight")
        bias = args[3] if name == "layer_norm" and len(args) > 3 else kw.get("bias")
        eps_pos = 4 if name == "layer_norm" else 3
        eps = args[eps_pos] if len(args) > eps_pos else kw.get("eps")
        affine_batched = self.is_batched(weight) or self.is_batched(bias)
        fn = F.layer_norm if name == "layer_norm" else F.rms_norm
        rank = _rank(node)
        if not affine_batched:
            w = self.env[weight] if isinstance(weight, fx.Node) else weight
            extra = (self.env[bias] if isinstance(bias, fx.Node) else bias,) if name == "layer_norm" else ()
            return self.call(
                fn, self.env[x], list(shape), w, *extra, **({"eps": eps} if eps is not None else {})
            )
        out = self.call(
            fn,
            self.env[x],
            list(shape),
            None,
            *((None,) if name == "layer_norm" else ()),
            **({"eps": eps} if eps is not None else {}),
        )
        if weight is not None:
            out = self.call(torch.mul, out, self.align(weight, rank))
        if bias is not None:
            out = self.call(torch.add, out, self.align(bias, rank))
        return out

    def attention_rule(self, node: fx.Node) -> Any:
        args, kw = call_args(node), call_kwargs(node)
        q, k, v = (self.expand(t) for t in args[:3])
        rest = [self.lift(r) for r in args[3:]]
        kwargs = self.lift(dict(kw))
        if len(args) > 3 and isinstance(args[3], fx.Node):
            rest[0] = self.fold_mask(args[3], _rank(args[0]))
        if isinstance(kw.get("attn_mask"), fx.Node):
            kwargs["attn_mask"] = self.fold_mask(kw["attn_mask"], _rank(args[0]))
        return self.call(layer_attention, node.target, q, k, v, *rest, **kwargs)

    def marked_rule(self, node: fx.Node, marked: markers.Marked) -> Any:
        """A marker op (``markers``, e.g. a decode step's attention): the function it stands for,
        called once with the layer axis folded into the batch axis of its batched arguments."""
        args, kw = call_args(node), call_kwargs(node)
        if kw or any(self.is_batched(a) for i, a in enumerate(args) if i not in marked.folded):
            return self.fallback(node)
        lifted = [self.expand(a) if i in marked.folded else self.lift(a) for i, a in enumerate(args)]
        return self.call(layer_marked, node.target, *lifted)

    def fold_mask(self, mask: fx.Node, rank: int) -> Any:
        """The mask for attention with the layer axis folded into the batch axis (N*B, ...)."""
        if self.is_batched(mask):
            return self.call(fold_batched_mask, self.align(mask, rank + 1), self.n)
        val = mask.meta.get("val")
        batch_is_one = (
            isinstance(val, torch.Tensor)
            and val.dim() == rank
            and isinstance(val.shape[0], int)
            and val.shape[0] == 1
        )
        if _rank(mask) < rank or batch_is_one:
            return self.env[mask]  # broadcasts against N*B as it did against B
        return self.call(fold_shared_mask, self.env[mask], self.n)

    def fallback(self, node: fx.Node) -> Any:
        self.fallbacks.append(f"{target_name(node)} ({node.name})")
        args, kw = call_args(node), call_kwargs(node)

        def dims(a: Any) -> Any:
            return fx.node.map_aggregate(
                a, lambda x: 0 if isinstance(x, fx.Node) and self.batched.get(x, False) else None
            )

        in_dims = (dims(list(args)), dims(dict(kw)))
        return self.call(_vmap_op, node.target, in_dims, self.lift(list(args)), self.lift(dict(kw)))


def batch_body(
    body: fx.GraphModule,
    batched_inputs: list[bool],
    num_layers: int,
    constant_inputs: list[bool] | None = None,
) -> tuple[fx.GraphModule, list[str]]:
    """The body rewritten to evaluate ``num_layers`` layers at once.

    ``batched_inputs`` says, per placeholder (h first), whether it carries the layer axis;
    ``constant_inputs``, whether its value is fixed at transform time (stacked weights: their
    linears are ``batched_linear``, the others' ``batched_linear_dynamic``; default none).
    Returns the batched GraphModule and the ops that needed the vmap fallback.
    """
    return _Batcher(body, batched_inputs, num_layers, constant_inputs).run()
