"""HC Newton (issue 3): stream-mixing skip paths of the reference mHC models, the matrix
correction, its scan, and the refusals of stream structures HCN cannot solve."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from conftest import sequential_trace

import snlp_compile
from snlp_compile.models import build_model
from snlp_compile.models.mhc import sinkhorn
from snlp_compile.solve.scan import (
    apply_prefix_products,
    matrix_affine_scan,
    sequential_affine_recurrence,
    static_init_products,
    static_prefix_products,
)
from snlp_compile.solve.solver import identity_surrogate

F64 = torch.float64
FLAVOURS = ["mhc-tiny", "mhc-dyn-tiny"]
# Fewer Sinkhorn iterations than the reference 20 keep torch.export's capture fast; the exact
# recovery test runs the reference configuration itself.
FAST = {"sinkhorn_iters": 4}


def _tokens(model: nn.Module, batch: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Case:
    model: nn.Module
    idx: torch.Tensor
    fast: torch.fx.GraphModule
    expected: torch.Tensor  # the sequential trace, (N, B, T, n, D)


@pytest.fixture(scope="module", params=FLAVOURS)
def case(request: pytest.FixtureRequest) -> Case:
    """A float64 mHC model of each flavour, transformed with K = 1, and its sequential trace."""
    model = build_model(request.param, **FAST).double()
    idx = _tokens(model)
    fast = snlp_compile.transform(model, (idx,), iterations=1)
    return Case(model, idx, fast, sequential_trace(model, list(model.transformer.h), idx))


# -- 1. the scan against the sequential recurrence ---------------------------------------------------


def test_matrix_scan_matches_recurrence_all_lengths_and_stream_counts() -> None:
    """Lengths 1..70, stream counts 1..8, per-layer static A and per-token A with batch shapes."""
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 9):
        for N in range(1, 71):
            batch = [(2, 3), (1, 5), ()][N % 3]
            # per layer (static, broadcast over the batch) or per token (dynamic)
            a_batch = batch if N % 2 else ()
            noise = torch.randn(N, *a_batch, n, n, generator=gen, dtype=F64) / math.sqrt(n)
            a = 0.8 * torch.eye(n, dtype=F64) + 0.3 * noise  # norm ~1: 70-fold products stay finite
            d = torch.randn(N, *batch, n, 3, generator=gen, dtype=F64)
            h0 = torch.randn(*batch, n, 3, generator=gen, dtype=F64)
            ref = sequential_affine_recurrence(a, d, h0, matrix=True)
            tol = 1e-10 * float(ref.abs().max().clamp_min(1.0))
            torch.testing.assert_close(matrix_affine_scan(a, d, h0), ref, rtol=1e-10, atol=tol)
            if not a_batch:  # static A: the precomputed transfer matrices give the same trace
                T, P = static_prefix_products(a, matrix=True), static_init_products(a, matrix=True)
                torch.testing.assert_close(
                    apply_prefix_products(T, d, h0, True, P), ref, rtol=1e-10, atol=tol
                )


# -- the analysis ----------------------------------------------------------------------------------


def test_explain_reports_hcn(case: Case) -> None:
    report = case.fast.snlp_report
    dynamic = case.model.config.dynamic
    assert report.rewritten, report.refusal
    assert report.skip is not None and "(HCN) over 4 streams" in report.skip
    assert "H = H(hc_mlp) @ H(hc_attn)" in report.skip
    assert ("dynamic" in report.skip) == dynamic and ("static" in report.skip) != dynamic
    assert "streams on axis -2 of the hidden state" in report.skip
    assert not [n for n in report.notes if "vmap" in n], report.notes  # no vmap fallback in the mHC bodies
    assert "surrogate: stream-mixing skip" in str(report)
    assert case.fast.snlp_solve.use_prefix_products != dynamic  # static H: precomputed products


def test_static_skip_matrix_is_the_product_of_the_sinkhorn_matrices(case: Case) -> None:
    """The folded A_j is H_res(mlp) @ H_res(attn) of layer j, as the model computes them
    (dynamic H depends on the iterate: nothing is folded)."""
    solve = case.fast.snlp_solve
    if case.model.config.dynamic:
        assert not hasattr(solve, "static_skip")
        return
    for j, block in enumerate(case.model.transformer.h):
        iters = block.hc_attn.mix.iters
        expected = sinkhorn(block.hc_mlp.mix.res_logits, iters) @ sinkhorn(
            block.hc_attn.mix.res_logits, iters
        )
        torch.testing.assert_close(
            solve.static_skip[j].reshape(4, 4), expected.detach(), rtol=1e-12, atol=1e-12
        )


def test_linear_layers_are_solved_in_one_iteration(case: Case) -> None:
    """Branches off (and, for dynamic H, its input dependence too): every parallel layer is
    h -> A_j h, HCN's surrogate is the exact Jacobian, so K = 1 reproduces the sequential model
    and IDN's identity surrogate does not. Dynamic H is then still computed inside the batched
    layers, at the iterate. Layer 0 keeps its branches and runs sequentially, so the streams
    enter the chain different from each other (a stochastic H maps equal streams to themselves)."""
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for block in model.transformer.h[1:]:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if model.config.dynamic:
                block.hc_attn.mix.alpha.zero_()
                block.hc_mlp.mix.alpha.zero_()
    idx = case.idx
    fast = snlp_compile.transform(model, (idx,), iterations=1, parallel_layers=model.config.n_layer - 1)
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)
        if fast.snlp_solve.use_prefix_products:
            fast.snlp_solve.use_prefix_products = False  # the log-depth scan gives the same
            torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)
        expected = sequential_trace(model, list(model.transformer.h), idx)[1:]
        with identity_surrogate(fast.snlp_solve):
            assert _rel(snlp_compile.solve_trace(fast, idx), expected) > 1e-2


# -- 2. exact recovery ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_recovery_float32_reference_config(name: str) -> None:
    """K = number of layers, the reference configuration (20 Sinkhorn iterations), float32;
    the transformed model also runs at batch and sequence sizes other than the example's."""
    model = build_model(name)
    fast = snlp_compile.transform(model, (_tokens(model),), iterations=model.config.n_layer)
    for batch, t in [(2, 12), (1, 5), (3, 17)]:
        idx = _tokens(model, batch, t, seed=batch + t)
        with torch.no_grad():
            torch.testing.assert_close(fast(idx), model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_recovery_with_prefix_damping_and_batch_fwd(name: str) -> None:
    """Two sequential layers then two in parallel, damped, batch_fwd init: still exact."""
    model = build_model(name, **FAST).double()
    idx = _tokens(model)
    fast = snlp_compile.transform(
        model, (idx,), iterations=2, parallel_layers=2, damping=0.7, init="batch_fwd"
    )
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)


# -- 3. triangular convergence ----------------------------------------------------------------------


def test_first_k_layers_exact_after_k_iterations(case: Case) -> None:
    n = len(case.expected)
    for k in range(1, n + 1):
        with torch.no_grad():
            trace = snlp_compile.solve_trace(case.fast, case.idx, iterations=k)
        torch.testing.assert_close(trace[:k], case.expected[:k], rtol=1e-10, atol=1e-10)
        if k < n:
            assert (trace[k] - case.expected[k]).abs().max() > 1e-8


# -- 4. HCN against the identity surrogate ------------------------------------------------------------


def test_hcn_beats_identity_surrogate(case: Case) -> None:
    """At random init, K = 1 and 2: the HCN trace is closer to the sequential one than with the
    skip treated as the identity. The logits (read after summing the streams) agree at K = 1:
    H_res is doubly stochastic, 1^T A = 1^T, so both corrections give the same stream sum."""
    errors: dict[str, list[float]] = {}
    logits: dict[str, torch.Tensor] = {}
    for surrogate in ("hcn", "identity"):
        with (
            torch.no_grad(),
            identity_surrogate(case.fast.snlp_solve) if surrogate == "identity" else nullcontext(),
        ):
            errors[surrogate] = [
                _rel(snlp_compile.solve_trace(case.fast, case.idx, iterations=k), case.expected)
                for k in (1, 2)
            ]
            logits[surrogate] = case.fast(case.idx)
    for k in range(2):
        assert errors["hcn"][k] < errors["identity"][k], errors
    torch.testing.assert_close(logits["hcn"], logits["identity"], rtol=1e-10, atol=1e-10)


# -- 5. op counts --------------------------------------------------------------------------------


def _counts(gm: torch.fx.GraphModule) -> Counter[str]:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", FLAVOURS)
def test_op_counts_do_not_grow_with_layers(name: str) -> None:
    """The exported solve (torch.export of the transformed model) for 2 and 4 layers (one
    Sinkhorn iteration: the op structure is what counts here, and export time grows with it)."""
    counts = []
    for n_layer in (2, 4):
        model = build_model(name, n_layer=n_layer, sinkhorn_iters=1)
        idx = _tokens(model)
        fast = snlp_compile.transform(model, (idx,), iterations=2)
        exported = torch.export.export(fast, (idx,), strict=False).module()
        with torch.no_grad():
            torch.testing.assert_close(exported(idx), fast(idx), rtol=0, atol=0)
        counts.append((_counts(fast.snlp_solve.layers), _counts(exported)))
    (body2, all2), (body4, all4) = counts
    assert body2 == body4  # one batched body, whatever the number of layers
    heavy = ("einsum", "linear", "attention")
    assert {k: v for k, v in all2.items() if any(h in k for h in heavy)} == {
        k: v for k, v in all4.items() if any(h in k for h in heavy)
    }
    if name == "mhc-tiny":
        assert all2 == all4  # static H: the correction is one block matmul, precomputed products
    else:
        # dynamic H: the log-depth scan has one more level (1 level for 2 layers, 2 for 4),
        # a few matmuls and cats per iteration
        extra = sum(all4.values()) - sum(all2.values())
        assert 0 < extra <= 2 * 12


# -- refusals -------------------------------------------------------------------------------------


class _MixLayer(nn.Module):
    """h -> skip(h) + tanh(h W): a stream-mixing skip of the given ``kind`` around a small branch."""

    def __init__(self, kind: str, n: int, d: int) -> None:
        super().__init__()
        self.kind = kind
        self.branch = nn.Linear(d, d, bias=False)
        self.mix = nn.Parameter(torch.randn(n, n))
        self.mix3 = nn.Parameter(torch.randn(n, n, d))
        self.proj = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "scrambled":  # mixes streams, then swaps streams and features around
            b, t, n, d = h.shape
            skip = (self.mix @ h).reshape(b, t, d, n).transpose(-1, -2)
        elif self.kind == "shifted":  # H h + h / 2, written with signs flipped twice
            skip = 0.5 * h - self.mix @ (-h)
        elif self.kind == "projection":  # a (wide) linear map of the features, not of streams
            skip = h @ self.proj
        elif self.kind == "per_feature":  # a different matrix for every feature
            skip = torch.einsum("ijd,btjd->btid", self.mix3, h)
        else:
            skip = self.mix @ h
        return skip + torch.tanh(self.branch(h))


class _Stack(nn.Module):
    def __init__(self, make: Callable[[], nn.Module], layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


def _mix_stack(kind: str, n: int = 4, d: int = 8) -> nn.Module:
    return _Stack(lambda: _MixLayer(kind, n, d)).eval()


def _stack_inputs(skip: str) -> torch.Tensor:
    return torch.randn(2, 5, 4, 80 if skip == "projection" else 8)


def test_mixing_plus_scaled_identity_is_one_matrix() -> None:
    """H h + h / 2 (through neg, sub, mul): A = H + I / 2, exact in one iteration without branch."""
    model = _mix_stack("shifted").double()
    with torch.no_grad():
        for layer in model.layers:
            layer.branch.weight.zero_()
    h = _stack_inputs("shifted").double()
    fast = snlp_compile.transform(model, (h,), iterations=1, dynamic_shapes=False)
    assert "H = (c * I + H(mix))" in fast.snlp_report.skip, fast.snlp_report.skip
    with torch.no_grad():
        torch.testing.assert_close(fast(h), model(h), rtol=1e-10, atol=1e-10)


def test_layout_round_trip_on_the_skip_is_still_idn() -> None:
    """A skip path that re-arranges h and puts it back (view, transpose, contiguous, inverse)
    is the identity: IDN, as without the detour."""

    class RoundTrip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            b, t, d = h.shape
            r = h.view(b, t, 2, 4).transpose(-1, -2).contiguous().transpose(-1, -2).reshape(b, t, d)
            return r + torch.tanh(self.f(h))

    model = _Stack(RoundTrip).double()
    x = torch.randn(2, 5, 8, dtype=F64)
    fast = snlp_compile.transform(model, (x,), iterations=3)
    assert fast.snlp_report.skip.startswith("identity skip (IDN)")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


def test_plain_mixing_stack_is_hcn_and_exact() -> None:
    model = _mix_stack("plain").double()
    h = _stack_inputs("plain").double()
    fast = snlp_compile.transform(model, (h,), iterations=3, layers="layers", dynamic_shapes=False)
    assert "(HCN)" in fast.snlp_report.skip
    with torch.no_grad():
        torch.testing.assert_close(fast(h), model(h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("skip", "message"),
    [
        ("scrambled", "moves values across positions or features"),
        ("projection", "contracts 80 > 64 values per position: a projection, not streams"),
        ("per_feature", "varies along an axis that is not a batch axis of the streams"),
    ],
)
def test_refusals_name_the_stream_problem(skip: str, message: str) -> None:
    model = _mix_stack(skip, d=_stack_inputs(skip).shape[-1])
    h = _stack_inputs(skip)
    with pytest.raises(snlp_compile.SNLPRefusal, match=message) as info:
        snlp_compile.transform(model, (h,), layers="layers", dynamic_shapes=False)
    assert "layers.2" in str(info.value)
    report = snlp_compile.explain(model, (h,), layers="layers", dynamic_shapes=False)
    assert not report.rewritten and message in (report.refusal or "")


# -- lowering: the stream layout and the matrix correction in torch.compile and ONNX ----------------


class _FoldedLayer(nn.Module):
    """A hyper-connection layer in the package's layout: streams folded into the batch axis."""

    def __init__(self, n: int = 4, d: int = 8) -> None:
        super().__init__()
        self.n = n
        self.mix = nn.Parameter(torch.eye(n) + 0.3 * torch.randn(n, n))
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bn, t, d = h.shape
        streams = h.reshape(bn // self.n, self.n, t, d).permute(0, 2, 1, 3)  # (B, T, n, D)
        mixed = torch.einsum("ij,btjd->btid", self.mix, streams)
        skip = mixed.permute(0, 2, 1, 3).reshape(bn, t, d)
        return skip + torch.tanh(self.proj(h))


class _FoldedStack(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_FoldedLayer() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.repeat_interleave(4, dim=0)  # expand to 4 streams, (B*4, T, D)
        for layer in self.layers:
            h = layer(h)
        return h


@pytest.fixture(scope="module")
def folded() -> tuple[nn.Module, torch.fx.GraphModule]:
    model = _FoldedStack().eval()
    fast = snlp_compile.transform(model, (torch.randn(2, 5, 8),), iterations=3, layers="layers")
    assert "(HCN) over 4 streams" in fast.snlp_report.skip and "permute" in fast.snlp_report.skip
    return model, fast


def test_folded_layout_torch_compile(folded: tuple[nn.Module, torch.fx.GraphModule]) -> None:
    """fullgraph: no graph break in the stream layout or the scan (aot_eager: Dynamo and AOT
    tracing without Inductor's C++ build, which would dominate a CPU test's time)."""
    model, fast = folded
    compiled = torch.compile(fast, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 5, 8), (3, 7, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_layout_onnx_runtime(folded: tuple[nn.Module, torch.fx.GraphModule]) -> None:
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is an optional dependency")
    from torch.export import Dim

    model, fast = folded
    program = torch.onnx.export(
        fast,
        (torch.randn(2, 5, 8),),
        dynamo=True,
        dynamic_shapes={"x": {0: Dim.AUTO, 1: Dim.AUTO}},
        verbose=False,
    )
    ops = Counter(n.op_type for n in program.model_proto.graph.node)
    assert not {"Loop", "Scan", "If"} & set(ops)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(3, 7, 8)  # another batch and sequence size than the export's
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)
