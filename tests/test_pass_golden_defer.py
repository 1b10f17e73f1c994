"""Before/Expected tests (siblings of ``test_pass_golden_more.py``) for the two passes that had none:
the HCN stream analysis of a hyper-connection skip path (``passes.stream_analysis``, run by
``analyse_skip``) and deferred K/V of a decode step (``passes.defer_kv``). The Before is a small
hand-built body or the smallest reference decode step, the Expected the pass's typed result written
by hand, plus one refusal each with its message."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
from helpers import reference_model, step_inputs
from torch import nn

from snlp_compile import SNLPConfig, SNLPRefusal
from snlp_compile.ir.chain import Layer
from snlp_compile.ir.matexpr import MNode, StreamMix
from snlp_compile.ir.plan import SOLVE_NAME, DeferredPlan
from snlp_compile.ir.stream_layout import StreamLayout
from snlp_compile.models.kv import CachedStep
from snlp_compile.passes.skip_analysis import analyse_skip
from snlp_compile.pipeline import compilation, pipeline, run
from snlp_compile.report import PassResult

aten = torch.ops.aten

# -- stream_analysis: an mHC-style skip path h -> H h --------------------------------------------

B, T, N, D = 1, 2, 2, 4  # hidden state (batch, sequence, streams, features)


def _node(g: fx.Graph, target: Any, args: tuple[Any, ...], val: torch.Tensor, module: str) -> fx.Node:
    """A call with its example value (the analysis reads shapes) and the module it was traced in."""
    node = g.call_function(target, args)
    node.meta["val"] = val
    node.meta["nn_module_stack"] = {module: (module, nn.Module)}
    return node


def _layer(mix_equation: str) -> tuple[Layer, fx.Node]:
    """Before: layer 'layers.0' of an mHC-style stack, h (B, T, n, D) with its n streams mixed by a
    small matrix H (an input of the model): out = einsum(mix_equation, H, h) + tanh(h) (per stream
    position when the einsum keeps h's shape, else its mix broadcast against tanh(h))."""
    g = fx.Graph()
    h, mix = g.placeholder("h"), g.placeholder("mix_matrix")
    hv, mv = torch.randn(B, T, N, D), torch.randn(N, N)
    h.meta["val"], mix.meta["val"] = hv, mv
    mixed_val = torch.einsum(mix_equation, mv, hv)
    mixed = _node(g, aten.einsum.default, (mix_equation, [mix, h]), mixed_val, "layers.0.mix")
    branch = _node(g, aten.tanh.default, (h,), hv.tanh(), "layers.0.branch")
    if mixed_val.shape == hv.shape:
        out = _node(g, aten.add.Tensor, (mixed, branch), mixed_val + hv.tanh(), "layers.0")
        nodes = [mixed, branch, out]
    else:  # a mix without the feature axis: it gates the branch (quadratic in h: no skip path)
        gate = _node(g, aten.unsqueeze.default, (mixed, -1), mixed_val.unsqueeze(-1), "layers.0")
        out = _node(g, aten.mul.Tensor, (gate, branch), mixed_val.unsqueeze(-1) * hv.tanh(), "layers.0")
        nodes = [mixed, branch, gate, out]
    g.output(out)
    g.lint()
    return Layer(0, "layers.0", h, out, nodes, [mix]), mix


def test_stream_analysis_finds_the_mixing_matrix_of_the_skip_path() -> None:
    """Expected: a "matrix" SkipPath whose StreamMix is H itself (an MNode of the input H, viewed
    as (batch 1, time 1, rows 2, streams 2)), streams on axis -2 of h (no layout ops), static H."""
    layer, mix = _layer("ij,btjd->btid")
    skip = analyse_skip(layer)
    assert skip.kind == "matrix"
    found = skip.coefficient
    assert isinstance(found, StreamMix)
    assert (found.layout, found.hidden_in, found.dynamic, found.n) == (
        StreamLayout(ops=(), rank=4, n=N),
        layer.hidden_in,
        False,
        N,
    )
    matrix = found.matrix
    assert isinstance(matrix, MNode)  # matrix expressions compare by identity: their fields here
    assert (matrix.node, matrix.ops, matrix.shape) == (
        mix,
        (("unsqueeze", 0), ("unsqueeze", 1)),
        (1, 1, N, N),
    )
    assert skip.description == (
        "stream-mixing skip h -> H h (HCN) over 2 streams, H = H(mix_matrix) static (independent of h), computed "
        "from the model's inputs before the solve, streams on axis -2 of the hidden state: HCN correction, "
        "the 2 x 2 matrix affine recurrence over the layers by a log-depth prefix scan"
    )


def test_stream_analysis_refuses_a_mixing_that_sums_the_features() -> None:
    """Before: the same layer, its einsum also summing h's feature axis (which H does not have).
    Expected: a refusal naming the einsum node and its module, saying why it is not a mixing."""
    layer, _ = _layer("ij,btjd->bti")
    with pytest.raises(SNLPRefusal) as refused:
        analyse_skip(layer)
    assert str(refused.value) == (
        "layer 'layers.0' mixes its input with aten.einsum (einsum_default), which HC-Newton cannot use as its skip "
        "path: it sums the hidden state over an axis the mixing matrix does not have. HCN needs a skip "
        "path h -> H h with H an n x n matrix (per layer, or per token) over one stream axis (or one "
        "group of axes) of h [node 'einsum_default', module 'layers.0.mix']"
    )


# -- defer_kv: the smallest reference decode step -------------------------------------------------


def _decode_step() -> Any:
    """Before: nanochat-tiny with 2 layers as a decode step (``CachedStep``: idx, pos, k_cache,
    v_cache -> logits, k, v), through the whole pipeline with ``deferred_kv``."""
    torch.manual_seed(0)
    model = reference_model("nanochat-tiny", n_layer=2).eval()
    config = SNLPConfig(iterations=1, deferred_kv=True, dynamic_shapes=False, verify=False)
    c = compilation(CachedStep(model), step_inputs(model, batch=1, t_max=8, pos=3, seed=1), config, None)
    result = run(c, pipeline(config))
    assert result.refusal is None, result.refusal
    return c


def test_defer_kv_merges_the_previous_tokens_kv_into_the_first_evaluation() -> None:
    """Expected: the pass runs after emit and records its note (K/V written into both caches, the
    k/v rows of the fused q/k/v weight read once); its DeferredPlan keeps the previous call's values
    of the per-token externals (the normed x0, the rotary tables' rows), shares that weight block,
    and its merged layers take (u, the body's externals, u_prev, those previous externals, pos_prev)
    and return the body's outputs (next hidden state, skip scale) and the provisional K and V."""
    c = _decode_step()
    records = dict(c.report.passes)
    assert [name for name, _ in c.report.passes][5:8] == ["emit", "defer_kv", "inline_markers"]
    assert records["defer_kv"] == PassResult(
        True,
        {},
        (
            "K/V deferred: each step writes the previous token's corrected K/V into k_cache, v_cache at its "
            "position, computed by the first evaluation's GEMVs (fused_attn_c_q_attn_c_k_attn_c_v[64:128])",
        ),
    )
    solve = c.graph_module().get_submodule(SOLVE_NAME)
    plan = solve.deferred_plan
    assert isinstance(plan, DeferredPlan)
    assert (plan.saved, plan.shared) == ((2, 6, 7, 8), ("fused_attn_c_q_attn_c_k_attn_c_v[64:128]",))
    assert [solve.ext_names[i] for i in plan.saved] == ["rms_norm", "index", "index_1", "neg"]
    assert solve.deferred_layers is plan.layers and solve.deferred_saved == [2, 6, 7, 8]
    graph = plan.layers.graph
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    assert inputs == [
        "h",
        *solve.ext_names,
        "u_prev",
        *(f"prev_{solve.ext_names[i]}" for i in plan.saved),
        "pos_prev",
    ]
    (outputs,) = graph.output_node().args
    assert [(n.op, n.target) for n in outputs] == [
        ("call_function", aten.add.Tensor),  # the next hidden state
        ("placeholder", "model_resid_lambdas_l"),  # the layer's skip scale
        ("call_function", aten.transpose.int),  # provisional K
        ("call_function", aten.transpose.int),  # provisional V
    ]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(h))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


def test_defer_kv_refuses_a_model_that_is_not_a_decode_step() -> None:
    """Before: a residual stack without caches, ``deferred_kv`` asked for. Expected: the pipeline
    stops in defer_kv (after emit) saying there is no K/V to defer."""
    torch.manual_seed(0)
    config = SNLPConfig(iterations=1, deferred_kv=True, dynamic_shapes=False, verify=False)
    c = compilation(_Stack().eval(), (torch.randn(2, 8),), config, None)
    refused = run(c, pipeline(config))
    assert refused.refused_in == "defer_kv"
    assert [r.name for r in refused.records][-1] == "emit"
    assert str(refused.refusal) == "deferred_kv: the layers hand out no K/V (no side outputs) to defer"
