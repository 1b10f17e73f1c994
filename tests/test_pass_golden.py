"""Per-pass Before/Expected tests (TVM's style): a small Before graph, the pass, the Expected graph
(its code) or the Expected plan fields. Reading one teaches what the pass does. The other passes'
tests: ``test_pass_golden_more.py``."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import snlp_compile
from snlp_compile.ir.coef import Ext
from snlp_compile.ir.plan import SolveOptions
from snlp_compile.kernels.layer_ops import batched_linear
from snlp_compile.passes.batch_layers import batch_body
from snlp_compile.passes.fuse_linears import fuse_shared_input_linears
from snlp_compile.passes.plan import plan_solve

aten = torch.ops.aten


def _code(gm: fx.GraphModule) -> str:
    return gm.code.strip()


def _expected(code: str) -> str:
    lines = code.strip("\n").splitlines()
    return "\n".join(line[4:] if line.startswith("    ") else line for line in lines).strip()


def _graph(build) -> fx.GraphModule:  # type: ignore[no-untyped-def]
    graph = fx.Graph()
    build(graph)
    graph.lint()
    return fx.GraphModule(nn.Module(), graph)


def _val(node: fx.Node, *shape: int) -> fx.Node:
    node.meta["val"] = torch.empty(shape)
    return node


# -- fuse_linears ----------------------------------------------------------------------------------


def test_fuse_linears_reads_one_concatenated_weight() -> None:
    """Before: q, k, v linears of one input x with stacked weights of their own.
    Expected: one linear of x with the weights concatenated at transform time, split after; the
    originals become row-block views of the fused weight; the graph takes the fused weight last."""

    def before(g: fx.Graph) -> None:
        x, wq, wk, wv = (g.placeholder(name) for name in ("x", "q_weight", "k_weight", "v_weight"))
        g.output(tuple(g.call_function(batched_linear, (x, w)) for w in (wq, wk, wv)))

    gm = _graph(before)
    stacked = {
        "q_weight": torch.randn(3, 4, 8),
        "k_weight": torch.randn(3, 2, 8),
        "v_weight": torch.randn(3, 2, 8),
    }
    names, modes = ["q_weight", "k_weight", "v_weight"], ["stacked"] * 3
    added = fuse_shared_input_linears([gm], names, modes, stacked)  # type: ignore[arg-type]

    assert added == ["fused_q_k_v"] and names[-1] == "fused_q_k_v" and modes[-1] == "stacked"
    assert _code(gm) == _expected(
        """
    def forward(self, x, q_weight, k_weight, v_weight, fused_q_k_v):
        batched_linear_3 = snlp_compile_kernels_layer_ops_batched_linear(x, fused_q_k_v);  x = fused_q_k_v = None
        split = torch.functional.split(batched_linear_3, [4, 2, 2], -1);  batched_linear_3 = None
        getitem = split[0]
        getitem_1 = split[1]
        getitem_2 = split[2];  split = None
        return (getitem, getitem_1, getitem_2)
    """
    )
    fused = stacked["fused_q_k_v"]
    assert fused.shape == (3, 8, 8)
    assert all(stacked[n]._base is fused for n in ("q_weight", "k_weight", "v_weight"))


def test_fuse_linears_leaves_linears_of_different_inputs() -> None:
    """Before: two linears of two different inputs. Expected: unchanged (nothing to share)."""

    def before(g: fx.Graph) -> None:
        x, y, wa, wb = (g.placeholder(name) for name in ("x", "y", "a_weight", "b_weight"))
        g.output((g.call_function(batched_linear, (x, wa)), g.call_function(batched_linear, (y, wb))))

    gm = _graph(before)
    code = _code(gm)
    stacked = {"a_weight": torch.randn(2, 4, 8), "b_weight": torch.randn(2, 4, 8)}
    assert fuse_shared_input_linears([gm], ["a_weight", "b_weight"], ["stacked"] * 2, stacked) == []  # type: ignore[arg-type]
    assert _code(gm) == code


# -- batch_layers ----------------------------------------------------------------------------------


def test_batch_body_turns_a_layer_into_all_layers() -> None:
    """Before: one layer h + scale * relu(linear(h, w)), w per layer (stacked), scale shared.
    Expected: the linear becomes the layer op over stacked weights, elementwise ops stay, the
    shared scale broadcasts; no vmap fallback."""

    def before(g: fx.Graph) -> None:
        h, w, scale = (
            _val(g.placeholder("h"), 2, 8),
            _val(g.placeholder("w"), 8, 8),
            _val(g.placeholder("scale")),
        )
        y = _val(g.call_function(aten.linear.default, (h, w)), 2, 8)
        r = _val(g.call_function(aten.relu.default, (y,)), 2, 8)
        m = _val(g.call_function(aten.mul.Tensor, (r, scale)), 2, 8)
        g.output(_val(g.call_function(aten.add.Tensor, (h, m)), 2, 8))

    batched, fallbacks = batch_body(_graph(before), [True, True, False], 3, [False, True, False])
    assert fallbacks == []
    assert _code(batched) == _expected(
        """
    def forward(self, h, w, scale):
        batched_linear = snlp_compile_kernels_layer_ops_batched_linear(h, w);  w = None
        relu_default = torch.ops.aten.relu.default(batched_linear);  batched_linear = None
        mul_tensor = torch.ops.aten.mul.Tensor(relu_default, scale);  relu_default = scale = None
        add_tensor = torch.ops.aten.add.Tensor(h, mul_tensor);  h = mul_tensor = None
        return add_tensor
    """
    )
    h, w, scale = torch.randn(3, 2, 8), torch.randn(3, 8, 8), torch.tensor(0.5)
    want = torch.stack([h[i] + scale * torch.relu(h[i] @ w[i].T) for i in range(3)])
    torch.testing.assert_close(batched(h, w, scale), want)


# -- plan ------------------------------------------------------------------------------------------


class _ScaledBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.lam = nn.Parameter(torch.tensor(0.9))

    def forward(self, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.lam * h + torch.tanh(self.fc(h)) + 0.1 * x0


class _Stack(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ScaledBlock() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h, x)
        return h


def test_plan_of_a_scaled_stack() -> None:
    """Before: four scaled residual layers lam_i * h + tanh(fc_i(h)) + 0.1 * x0.
    Expected plan: the weights and lam stacked (folded at transform time), 0.1 * x0 (computed
    before the chain, after CSE one value for all layers) shared; a scaled
    skip whose per-layer coefficient (lam) is static, so the solve gets it folded; one stage."""
    model = _Stack().eval()
    x = torch.randn(2, 3, 8)
    gm, chain, report = snlp_compile.api.analyse(model, (x,), snlp_compile.SNLPConfig(dynamic_shapes=False))
    assert chain is not None, report.refusal
    plan = plan_solve(gm, chain, SolveOptions(iterations=2))

    assert [(e.name, e.mode) for e in plan.externals] == [
        ("lam", "stacked"),
        ("fc_weight", "stacked"),
        ("fc_bias", "stacked"),
        ("mul_1", "shared"),
    ]
    assert plan.skip_kind == "elementwise" and plan.skip_constant is None and plan.stream_layout is None
    assert plan.num_layers == 4 and plan.stage_sizes == (4,) and plan.layers_short is None
    assert plan.static_skip is not None
    torch.testing.assert_close(
        plan.static_skip.reshape(4), torch.stack([b.lam.detach() for b in model.blocks])
    )
    assert plan.side_layers is None and plan.fused == () and plan.fallbacks == ()
    assert plan.last_row_only  # only the last layer's output is read


# -- find_chain + skip_analysis --------------------------------------------------------------------


def test_analysis_of_a_scaled_stack() -> None:
    """Before: the same four scaled residual layers. Expected LayerChain: all four layers parallel,
    the last one the template, a scaled skip whose coefficient is the template's own lam, and the
    readers of hidden states outside the chain (x0's product reads the chain input, the output the
    last layer's)."""
    model = _Stack().eval()
    _, chain, report = snlp_compile.api.analyse(
        model, (torch.randn(2, 3, 8),), snlp_compile.SNLPConfig(dynamic_shapes=False)
    )
    assert chain is not None, report.refusal
    assert chain.container == "blocks" and chain.first_parallel == 0
    assert [layer.module_path for layer in chain.layers] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert chain.template is chain.layers[-1]
    assert chain.skip.kind == "elementwise"
    assert isinstance(chain.skip.coefficient, Ext) and chain.skip.coefficient.node.target == "blocks.3.lam"
    assert chain.skip.description == (
        "scaled skip h -> blocks.3.lam * h (scaled IDN): correction is an elementwise affine prefix scan"
    )
    assert [(r.layer_index, r.node.name) for r in chain.readers if r.node.op != "output"][-1] == (-1, "mul_1")
    assert any(r.layer_index == 3 and r.node.op == "output" for r in chain.readers)
