"""More per-pass Before/Expected tests (TVM's style, siblings of ``test_pass_golden.py``): a small
Before graph, the pass, the Expected graph written by hand and compared structurally
(``helpers.assert_same_graph``: same ops, targets and argument topology, names ignored), and the
pass's ``PassResult`` where it returns one. Reading one teaches what the pass does."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
from helpers import assert_same_graph
from torch import nn

import snlp_compile.kernels.ops  # noqa: F401  (registers the marker op snlp::cached_attention)
from snlp_compile import LoweringOptions, SNLPConfig, SNLPRefusal
from snlp_compile.ir.chain import SkipPath
from snlp_compile.ir.coef import Const
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.kernels.attention import cached_attention
from snlp_compile.kernels.layer_ops import batched_linear, layer_marked, layer_matmul
from snlp_compile.passes.lowering import NO_KERNELS, restricted
from snlp_compile.passes.state_writes import local_writes, state_write
from snlp_compile.passes.wide_layers import find_split, split_body
from snlp_compile.pipeline import (
    ANALYSIS,
    Compilation,
    compilation,
    cse_pass,
    emit_pass,
    inline_markers_pass,
    lower_pass,
    plan_pass,
    run,
)
from snlp_compile.report import ExplainReport, PassResult

aten = torch.ops.aten
MARKER = torch.ops.snlp.cached_attention.default

Build = Callable[[fx.Graph], None]


def _graph(build: Build) -> fx.Graph:
    graph = fx.Graph()
    build(graph)
    graph.lint()
    return graph


def _module(build: Build) -> fx.GraphModule:
    return fx.GraphModule(nn.Module(), _graph(build))


def _state(gm: fx.GraphModule, config: SNLPConfig | None = None) -> Compilation:
    """A compilation holding ``gm`` as its captured graph, for running one pipeline pass on it."""
    return Compilation(nn.Module(), (), None, config or SNLPConfig(), ExplainReport(model="Before"), gm=gm)


def _placeholders(g: fx.Graph, *names: str) -> list[fx.Node]:
    return [g.placeholder(name) for name in names]


# -- cleanup: common subexpressions, unused outputs ------------------------------------------------


def test_cse_merges_equal_computations() -> None:
    """Before: relu(x) computed twice, the two summed. Expected: relu(x) once, added to itself;
    the pass counts one node merged."""

    def before(g: fx.Graph) -> None:
        (x,) = _placeholders(g, "x")
        a = g.call_function(aten.relu.default, (x,))
        b = g.call_function(aten.relu.default, (x,))
        g.output(g.call_function(aten.add.Tensor, (a, b)))

    def expected(g: fx.Graph) -> None:
        (x,) = _placeholders(g, "x")
        r = g.call_function(aten.relu.default, (x,))
        g.output(g.call_function(aten.add.Tensor, (r, r)))

    gm = _module(before)
    result = cse_pass(_state(gm))
    assert result == PassResult(True, {"nodes merged": 1, "unused outputs dropped": 0})
    assert_same_graph(gm.graph, _graph(expected))
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), 2 * torch.relu(x))


def test_cse_drops_unread_picks_and_leaves_the_rest() -> None:
    """Before: max(x, 1) with both its values and its (unread) indices picked. Expected: the
    indices' pick erased, nothing merged (no two computations are equal)."""

    def before(g: fx.Graph) -> None:
        (x,) = _placeholders(g, "x")
        m = g.call_function(aten.max.dim, (x, 1))
        values = g.call_function(operator.getitem, (m, 0))
        g.call_function(operator.getitem, (m, 1))
        g.output(g.call_function(aten.neg.default, (values,)))

    def expected(g: fx.Graph) -> None:
        (x,) = _placeholders(g, "x")
        m = g.call_function(aten.max.dim, (x, 1))
        g.output(g.call_function(aten.neg.default, (g.call_function(operator.getitem, (m, 0)),)))

    gm = _module(before)
    result = cse_pass(_state(gm))
    assert result == PassResult(True, {"nodes merged": 0, "unused outputs dropped": 1})
    assert_same_graph(gm.graph, _graph(expected))
    assert cse_pass(_state(gm)) == PassResult(False, {"nodes merged": 0, "unused outputs dropped": 0})


# -- inline_markers --------------------------------------------------------------------------------


def _attention_inputs() -> tuple[torch.Tensor, ...]:
    """q (1, 2, 1, 4) over a cache of 3 (one kv head), one new token, no masking."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 4, generator=g)
    k, v = torch.randn(1, 1, 1, 4, generator=g), torch.randn(1, 1, 1, 4, generator=g)
    k_cache, v_cache = torch.randn(1, 1, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
    return q, k, v, k_cache, v_cache, torch.zeros(1, 4)


_ATTENTION_ARGS = ("q", "k", "v", "k_cache", "v_cache", "bias")


def test_inline_markers_replaces_the_marker_op_by_its_function() -> None:
    """Before: the marker op ``snlp::cached_attention`` (capture keeps the attention whole), in the
    top-level graph and in a submodule's graph (the solve's). Expected: both calls of the function
    it stands for, ``kernels.attention.cached_attention``, with the same arguments."""

    def with_target(target: object) -> Build:
        def build(g: fx.Graph) -> None:
            g.output(g.call_function(target, tuple(_placeholders(g, *_ATTENTION_ARGS))))  # type: ignore[arg-type]

        return build

    gm = _module(with_target(MARKER))
    gm.add_submodule(SOLVE_NAME, _module(with_target(MARKER)))
    args = _attention_inputs()
    want = gm(*args)

    result = inline_markers_pass(_state(gm))
    assert result == PassResult(True, {"marker ops inlined": 2})
    assert_same_graph(gm.graph, _graph(with_target(cached_attention)))
    solve = gm.get_submodule(SOLVE_NAME)
    assert isinstance(solve, fx.GraphModule)
    assert_same_graph(solve.graph, _graph(with_target(cached_attention)))
    torch.testing.assert_close(gm(*args), want)
    torch.testing.assert_close(solve(*args), want)
    assert inline_markers_pass(_state(gm)) == PassResult(False, {"marker ops inlined": 0})


# -- lowering: lower, restricted -------------------------------------------------------------------


def _layer_calls(kwargs: list[dict[str, bool]]) -> Build:
    """x @ w over stacked weights, a @ b of two layer-batched activations, one decode attention
    (inlined marker) and its layer-batched form, then a plain op; ``kwargs`` per kernel call."""

    def build(g: fx.Graph) -> None:
        x, w, a, b = _placeholders(g, "x", "w", "a", "b")
        attention = _placeholders(g, *_ATTENTION_ARGS)
        y = g.call_function(batched_linear, (x, w), kwargs[0])
        z = g.call_function(layer_matmul, (a, b), kwargs[1])
        o = g.call_function(cached_attention, tuple(attention), kwargs[2])
        lo = g.call_function(layer_marked, (MARKER, *attention), kwargs[3])
        g.output((g.call_function(aten.relu.default, (y,)), z, o, lo))

    return build


def test_lower_writes_the_options_into_the_calls() -> None:
    """Before: kernel-choosing calls without keyword arguments. Expected, for LoweringOptions(
    attention_kernel=False, pdl=False): each call with its own map of the options (the linear may
    use the GEMV kernel, the attention products may not, the fused decode attention only outside
    the layer-batched step, no PDL anywhere); the plain relu untouched."""
    options = LoweringOptions(attention_kernel=False, pdl=False)
    gm = _module(_layer_calls([{}, {}, {}, {}]))
    result = lower_pass(_state(gm, SNLPConfig(lowering=options)))
    assert result == PassResult(True, {"calls lowered": 4})
    assert_same_graph(
        gm.graph,
        _graph(
            _layer_calls(
                [
                    {"gemv": True, "pdl": False},
                    {"gemv": False, "pdl": False},
                    {"fused": True, "pdl": False},
                    {"fused": False, "gemv": False, "pdl": False},
                ]
            )
        ),
    )


def test_lower_leaves_a_graph_without_kernel_calls() -> None:
    """Before: aten ops only. Expected: the same graph, the pass unchanged."""

    def build(g: fx.Graph) -> None:
        x, w = _placeholders(g, "x", "w")
        g.output(g.call_function(aten.linear.default, (x, w)))

    gm = _module(build)
    assert lower_pass(_state(gm, SNLPConfig(lowering=NO_KERNELS))) == PassResult(False, {"calls lowered": 0})
    assert_same_graph(gm.graph, _graph(build))


def test_restricted_narrows_the_choices_inside_the_block_only() -> None:
    """Before: a lowered linear (GEMV kernel, PDL) and a matmul lowered without its kernel.
    Expected inside ``restricted(gm, LoweringOptions(pdl=False))``: no PDL, and the matmul still
    without its kernel (a limit only takes choices away); inside ``restricted(gm, NO_KERNELS)``:
    nothing; after the blocks: the Before graph again."""

    def calls(linear: dict[str, bool], matmul: dict[str, bool]) -> Build:
        def build(g: fx.Graph) -> None:
            x, w, a, b = _placeholders(g, "x", "w", "a", "b")
            g.output(
                (
                    g.call_function(batched_linear, (x, w), linear),
                    g.call_function(layer_matmul, (a, b), matmul),
                )
            )

        return build

    before = calls({"gemv": True, "pdl": True}, {"gemv": False, "pdl": True})
    gm = _module(before)
    with restricted(gm, LoweringOptions(pdl=False)):
        assert_same_graph(
            gm.graph, _graph(calls({"gemv": True, "pdl": False}, {"gemv": False, "pdl": False}))
        )
    with restricted(gm, NO_KERNELS):
        assert_same_graph(
            gm.graph, _graph(calls({"gemv": False, "pdl": False}, {"gemv": False, "pdl": False}))
        )
        assert "gemv = False, pdl = False" in gm.code  # (recompiled: the module runs what the graph says)
    assert_same_graph(gm.graph, _graph(before))
    assert "batched_linear(x, w, gemv = True, pdl = True)" in gm.code


# -- wide_layers: find_split, split_body -----------------------------------------------------------


def _two_halves(g: fx.Graph) -> None:
    """A body h -> s = h + linear(h, w1) -> s + relu(linear(s, w2)): two residual halves."""
    h, w1, w2 = _placeholders(g, "h", "w1", "w2")
    s = g.call_function(aten.add.Tensor, (h, g.call_function(aten.linear.default, (h, w1))))
    r = g.call_function(aten.relu.default, (g.call_function(aten.linear.default, (s, w2)),))
    g.output(g.call_function(aten.add.Tensor, (s, r)))


def test_split_body_into_its_two_residual_halves() -> None:
    """Before: the two-half body. Expected: the split at s; the first half h -> s, the second
    half s (as its h) -> the output; both keep the body's placeholders (h, *externals), and
    composed they are the body."""

    def first(g: fx.Graph) -> None:
        h, w1, _ = _placeholders(g, "h", "w1", "w2")
        g.output(g.call_function(aten.add.Tensor, (h, g.call_function(aten.linear.default, (h, w1)))))

    def second(g: fx.Graph) -> None:
        h, _, w2 = _placeholders(g, "h", "w1", "w2")
        r = g.call_function(aten.relu.default, (g.call_function(aten.linear.default, (h, w2)),))
        g.output(g.call_function(aten.add.Tensor, (h, r)))

    body = _module(_two_halves)
    split = find_split(body, "blocks.1")
    assert split.target is aten.add.Tensor and split in body.graph.output_node().args[0].args  # type: ignore[union-attr]
    halves = split_body(body, split)
    assert_same_graph(halves[0].graph, _graph(first))
    assert_same_graph(halves[1].graph, _graph(second))
    h, w1, w2 = torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(halves[1](halves[0](h, w1, w2), w1, w2), body(h, w1, w2))


def test_find_split_refuses_a_single_branch() -> None:
    """Before: h + relu(linear(h, w)), one residual branch. Expected: a refusal naming the output
    node and the layer (fused_layers needs two halves)."""

    def before(g: fx.Graph) -> None:
        h, w = _placeholders(g, "h", "w")
        r = g.call_function(aten.relu.default, (g.call_function(aten.linear.default, (h, w)),))
        g.output(g.call_function(aten.add.Tensor, (h, r)))

    with pytest.raises(
        SNLPRefusal, match=r"the output of 'blocks\.1' \(add_tensor\) is not of that form"
    ) as info:
        find_split(_module(before), "blocks.1")
    assert info.value.node == "add_tensor" and info.value.module_path == "blocks.1"


# -- find_chain + analyse_skip + emit on a tiny stack ----------------------------------------------


class _Block(nn.Module):
    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gated = gated

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        branch = torch.tanh(self.fc(h))
        return h + (torch.sigmoid(branch) if self.gated else branch)


class _Net(nn.Module):
    """embed -> four residual blocks (the first of another kind) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Block(gated=True), _Block(), _Block(), _Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _analysed() -> tuple[nn.Module, torch.Tensor, Compilation]:
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 4)
    c = compilation(model, (x,), SNLPConfig(dynamic_shapes=False, iterations=3), None)
    analysis = run(c, ANALYSIS)
    assert analysis.refusal is None, analysis.refusal
    return model, x, c


def test_find_chain_of_a_tiny_stack() -> None:
    """Before: embed, a gated block, three plain blocks h + tanh(fc(h)), head. Expected
    LayerChain: blocks 1..3 parallel (the gated block 0 differs: sequential, with a note), the
    last the template, each reading the previous one's output and its own fc weight and bias, an
    identity skip, and one reader of a hidden state outside the chain (the head, of layer 3)."""
    _, _, c = _analysed()
    records = dict(c.report.passes)
    assert records["find_chain"] == PassResult(
        False,
        {"layers": 4, "matching": 3, "parallel": 3},
        (
            "layers 0..0 stay sequential: layer 'blocks.0' differs from the template 'blocks.3' "
            "(sigmoid is call_function aten.sigmoid.default, the template's tanh_3 is call_function "
            "aten.tanh.default)",
        ),
    )
    assert records["analyse_skip"] == PassResult(False, {"hidden-state readers": 1})

    chain = c.layer_chain()
    assert chain.container == "blocks" and chain.first_parallel == 0
    layers = chain.layers
    assert [(layer.index, layer.module_path) for layer in layers] == [
        (1, "blocks.1"),
        (2, "blocks.2"),
        (3, "blocks.3"),
    ]
    assert chain.template is layers[-1] and chain.parallel_layers == layers
    block0 = layers[0].hidden_in  # embed + sigmoid(tanh(fc(embed))), the sequential block's output
    assert block0.target is aten.add.Tensor
    assert [a.target for a in block0.all_input_nodes] == [aten.linear.default, aten.sigmoid.default]
    assert all(layers[i].hidden_in is layers[i - 1].output for i in (1, 2))
    for layer in layers:
        assert [e.target for e in layer.externals] == [
            f"{layer.module_path}.fc.weight",
            f"{layer.module_path}.fc.bias",
        ]
        assert [n.target for n in layer.nodes] == [aten.linear.default, aten.tanh.default, aten.add.Tensor]
        assert layer.side_outputs == []
    assert chain.skip == SkipPath(
        "identity", Const(1.0), "identity skip (IDN): correction is a prefix sum over layers"
    )
    (reader,) = chain.readers
    assert (reader.layer_index, reader.node.target, reader.node.args[0], reader.module_path) == (
        3,
        aten.linear.default,
        layers[-1].output,
        "head",
    )


def test_find_chain_pass_refuses_too_many_parallel_layers() -> None:
    """Before: the same stack, ``parallel_layers=4`` asked for. Expected: a refusal naming the
    three layers that match (block 0 differs)."""
    model, x, _ = _analysed()
    c = compilation(model, (x,), SNLPConfig(dynamic_shapes=False, parallel_layers=4), None)
    refused = run(c, ANALYSIS)
    assert refused.refused_in == "find_chain" and [r.name for r in refused.records] == ["capture", "cse"]
    assert str(refused.refusal) == (
        "SNLPConfig.parallel_layers=4 but only the last 3 of 4 layers of 'blocks' can be solved in parallel "
        "[module 'blocks']"
    )


def test_emit_replaces_the_parallel_layers_by_one_solve_call() -> None:
    """Before: the analysed stack. Expected top-level graph: embed and block 0 as they were, one
    call of the solve on block 0's output (the weights of blocks 1..3 stacked inside it), its last
    row read by the head; the parallel blocks' nodes and attributes gone."""
    model, x, c = _analysed()
    lowered = run(c, (plan_pass, emit_pass))
    assert lowered.refusal is None
    emitted = lowered.records[-1].result
    # 3 x (2 weights, linear, tanh, add) removed, the solve's call and its row read added
    assert emitted == PassResult(True, {"nodes removed": 13})

    gm = c.graph_module()
    guarded = any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)

    def expected(g: fx.Graph) -> None:
        names = (
            "embed.weight",
            "embed.bias",
            "blocks.0.fc.weight",
            "blocks.0.fc.bias",
            "head.weight",
            "head.bias",
        )
        attrs = {name: g.get_attr(name) for name in names}
        (xp,) = _placeholders(g, "x")
        if guarded:  # (the input guards of torch.export's module, in newer torch versions)
            g.call_module("_guards_fn", (xp,))
        h = g.call_function(aten.linear.default, (xp, attrs["embed.weight"], attrs["embed.bias"]))
        fc = g.call_function(aten.linear.default, (h, attrs["blocks.0.fc.weight"], attrs["blocks.0.fc.bias"]))
        gate = g.call_function(aten.sigmoid.default, (g.call_function(aten.tanh.default, (fc,)),))
        h0 = g.call_function(aten.add.Tensor, (h, gate))
        trace = g.call_module(SOLVE_NAME, (h0,))
        h3 = g.call_function(operator.getitem, (trace, -1))
        g.output((g.call_function(aten.linear.default, (h3, attrs["head.weight"], attrs["head.bias"])),))

    assert_same_graph(gm.graph, _graph(expected))
    # blocks 1..3 freed: the solve holds their weights stacked
    assert [name for name, _ in gm.named_parameters()] == [
        "embed.weight",
        "embed.bias",
        "blocks.0.fc.weight",
        "blocks.0.fc.bias",
        "head.weight",
        "head.bias",
    ]
    assert [name for name, _ in gm.named_buffers()] == [
        f"{SOLVE_NAME}.stacked_fc_weight",
        f"{SOLVE_NAME}.stacked_fc_bias",
    ]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)  # (K = 3 parallel layers: exact)


# -- state_writes ----------------------------------------------------------------------------------


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return h + self.fc(h)


class _CountingStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Counting(), _Counting()])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


def test_state_write_refuses_a_buffer_written_in_forward() -> None:
    """Before: a stack whose blocks count their calls in a buffer (``self.calls.add_(1)``).
    Expected: a refusal naming the first writing block, the buffer and the op."""
    ep = torch.export.export(_CountingStack(), (torch.randn(2, 4),), strict=False)
    refusal = state_write(ep)
    assert isinstance(refusal, SNLPRefusal)
    assert (refusal.node, refusal.module_path) == ("add_", "blocks.0")
    assert str(refusal) == (
        "'blocks.0' writes the buffer 'blocks.0.calls' in forward (aten.add_.Tensor): state written during a "
        "forward (a call counter, a running statistic, an in-place update of an input or weight) cannot be "
        "solved in parallel, whose layers run several times per call on copies; compute it out of place and "
        "return it, or keep it outside the model [node 'add_', module 'blocks.0']"
    )
    assert local_writes(ep) == [n for n in ep.graph.nodes if n.target is aten.add_.Tensor]


class _LocalWrite(nn.Module):
    """Writes into a tensor it allocates itself (as DeepSeek-V3's attention does): no state."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        buf = h.new_zeros(h.shape)
        buf[:, :2].copy_(h[:, :2])
        return buf + h


def test_state_write_allows_writes_into_local_tensors() -> None:
    """Before: an in-place copy into a tensor the forward allocates. Expected: no refusal; the
    write is listed as local (capture functionalises such graphs)."""
    ep = torch.export.export(_LocalWrite(), (torch.randn(2, 4),), strict=False)
    assert state_write(ep) is None
    (write,) = local_writes(ep)
    assert write.target is aten.copy_.default


# -- the structural comparison itself ---------------------------------------------------------------


def test_assert_same_graph_tells_graphs_apart() -> None:
    """Names and node order do not matter; a target, a constant argument, sharing versus
    recomputing, and an extra node do."""

    def relu_twice(
        shared: bool, op: object = aten.relu.default, alpha: int = 1, extra: bool = False
    ) -> Build:
        def build(g: fx.Graph) -> None:
            (x,) = _placeholders(g, "x")
            a = g.call_function(op, (x,))  # type: ignore[arg-type]
            b = a if shared else g.call_function(op, (x,))  # type: ignore[arg-type]
            if extra:
                g.call_function(aten.neg.default, (x,))
            g.output(g.call_function(aten.add.Tensor, (a, b), {"alpha": alpha}))

        return build

    def renamed_reordered(g: fx.Graph) -> None:
        (x,) = _placeholders(g, "x")
        b = g.call_function(aten.relu.default, (x,), name="second")
        a = g.call_function(aten.relu.default, (x,), name="first")
        g.output(g.call_function(aten.add.Tensor, (a, b), {"alpha": 1}))

    assert_same_graph(_graph(relu_twice(False)), _graph(renamed_reordered))
    for different in (
        relu_twice(True),
        relu_twice(False, aten.tanh.default),
        relu_twice(False, alpha=2),
        relu_twice(False, extra=True),
    ):
        with pytest.raises(AssertionError, match="graphs differ"):
            assert_same_graph(_graph(relu_twice(False)), _graph(different))
