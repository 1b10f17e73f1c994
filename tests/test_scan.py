"""Tests for snlp_compile.solve.scan: parity with the sequential loop, export, ONNX."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snlp_compile.solve.scan import (
    apply_prefix_products,
    elementwise_affine_scan,
    identity_scan,
    matrix_affine_scan,
    sequential_affine_recurrence,
    static_init_products,
    static_prefix_products,
)

F64 = torch.float64
LENGTHS = [1, 2, 3, 5, 8, 16, 17, 31, 64, 70]


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-10) -> None:
    assert got.shape == ref.shape
    # products over up to 70 layers span magnitudes; scale atol by the reference's size.
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max().clamp_min(1.0)))


def _mixing(shape: tuple[int, ...], n: int, gen: torch.Generator) -> torch.Tensor:
    """Random n x n matrices near the identity (norm about 1, so 70-fold products stay finite)."""
    noise = torch.randn(*shape, n, n, generator=gen, dtype=F64) / math.sqrt(n)
    return 0.8 * torch.eye(n, dtype=F64) + 0.3 * noise


@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_matrix_scan_broadcast(N: int, n: int) -> None:
    gen = torch.Generator().manual_seed(N * 10 + n)
    a = _mixing((N, 1, 1), n, gen)  # static mixing, broadcast over (B, T)
    d = torch.randn(N, 2, 3, n, 5, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, n, 5, generator=gen, dtype=F64)
    ref = sequential_affine_recurrence(a, d, h0, matrix=True)
    _close(matrix_affine_scan(a, d, h0), ref)
    # unaligned static mixing (N, n, n) right-aligns its batch behind the layer axis
    _close(matrix_affine_scan(a[:, 0, 0], d, h0), ref)
    T = static_prefix_products(a[:, 0, 0], matrix=True)
    P = static_init_products(a[:, 0, 0], matrix=True)
    assert T.shape == (N, N, n, n)
    _close(apply_prefix_products(T, d, h0, True, P), ref)


@pytest.mark.parametrize("N", LENGTHS)
def test_matrix_scan_per_token(N: int) -> None:
    gen = torch.Generator().manual_seed(N)
    n = 3
    a = _mixing((N, 2, 4), n, gen)  # per-token mixing
    d = torch.randn(N, 2, 4, n, 6, generator=gen, dtype=F64)
    h0 = torch.randn(n, 6, generator=gen, dtype=F64)  # broadcast initial state
    ref = sequential_affine_recurrence(a, d, h0, matrix=True)
    _close(matrix_affine_scan(a, d, h0), ref)
    T, P = static_prefix_products(a, True), static_init_products(a, True)
    _close(apply_prefix_products(T, d, h0, True, P), ref)


@pytest.mark.parametrize("N", LENGTHS)
def test_elementwise_scan(N: int) -> None:
    gen = torch.Generator().manual_seed(100 + N)
    d = torch.randn(N, 2, 3, 7, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, 7, generator=gen, dtype=F64)
    for a in (
        0.5 + torch.rand(N, generator=gen, dtype=F64),  # one scalar per layer
        0.5 + torch.rand(N, 7, generator=gen, dtype=F64),  # per channel
        0.5 + torch.rand(N, 2, 1, 7, generator=gen, dtype=F64),  # full broadcast
    ):
        ref = sequential_affine_recurrence(a, d, h0, matrix=False)
        _close(elementwise_affine_scan(a, d, h0), ref)
        T, P = static_prefix_products(a, False), static_init_products(a, False)
        assert T.shape == (N, N, *a.shape[1:])
        _close(apply_prefix_products(T, d, h0, False, P), ref)


def test_prefix_products_structure() -> None:
    gen = torch.Generator().manual_seed(0)
    a = _mixing((5,), 3, gen)
    T = static_prefix_products(a, matrix=True)
    eye = torch.eye(3, dtype=F64)
    for j in range(5):
        for i in range(5):
            want = eye.clone() if i <= j else torch.zeros(3, 3, dtype=F64)
            for k in range(i + 1, j + 1):
                want = a[k] @ want
            _close(T[j, i], want)
    _close(static_init_products(a, True)[4], a[4] @ a[3] @ a[2] @ a[1] @ a[0])


@pytest.mark.parametrize("N", [1, 2, 7, 70])
def test_identity_scan_matches_unit_coefficients(N: int) -> None:
    gen = torch.Generator().manual_seed(N)
    d = torch.randn(N, 2, 3, 4, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    got = identity_scan(d, h0)
    _close(got, elementwise_affine_scan(torch.ones(N, dtype=F64), d, h0))
    _close(got, sequential_affine_recurrence(None, d, h0, matrix=False))


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 70),
    n=st.integers(1, 8),
    m=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    a_bcast=st.lists(st.booleans(), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_scans_hypothesis(N: int, n: int, m: int, batch: list[int], a_bcast: list[bool], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a_batch = tuple(1 if flat else b for b, flat in zip(batch, a_bcast))
    a = _mixing((N, *a_batch), n, gen)
    d = torch.randn(N, *batch, n, m, generator=gen, dtype=F64)
    h0 = torch.randn(*batch, n, m, generator=gen, dtype=F64)
    _close(matrix_affine_scan(a, d, h0), sequential_affine_recurrence(a, d, h0, matrix=True))
    ae = 0.5 + torch.rand(N, *a_batch, n, generator=gen, dtype=F64)
    de = d[..., 0]
    _close(
        elementwise_affine_scan(ae, de, h0[..., 0]),
        sequential_affine_recurrence(ae, de, h0[..., 0], matrix=False),
    )


# --- export -------------------------------------------------------------------------------


class _Identity(torch.nn.Module):
    def forward(self, d: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return identity_scan(d, h0)


class _Elementwise(torch.nn.Module):
    def forward(self, a: torch.Tensor, d: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return elementwise_affine_scan(a, d, h0)


class _Matrix(torch.nn.Module):
    def forward(self, a: torch.Tensor, d: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return matrix_affine_scan(a, d, h0)


class _Static(torch.nn.Module):
    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("T", static_prefix_products(a, matrix=True))
        self.register_buffer("P", static_init_products(a, matrix=True))

    def forward(self, d: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return apply_prefix_products(self.T, d, h0, True, self.P)


def _cases() -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    gen = torch.Generator().manual_seed(0)
    N, n, B, T, m = 11, 4, 2, 3, 8
    a = (0.8 * torch.eye(n) + 0.3 * torch.randn(N, 1, 1, n, n, generator=gen) / 2).float()
    d = torch.randn(N, B, T, n, m, generator=gen)
    h0 = torch.randn(B, T, n, m, generator=gen)
    ae = 0.5 + torch.rand(N, m, generator=gen)
    de = torch.randn(N, B, T, m, generator=gen)
    he = torch.randn(B, T, m, generator=gen)
    return [
        ("identity", _Identity(), (de, he)),
        ("elementwise", _Elementwise(), (ae, de, he)),
        ("matrix", _Matrix(), (a, d, h0)),
        ("static", _Static(a[:, 0, 0]), (d, h0)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_torch_export_no_control_flow(case: int) -> None:
    _, mod, args = _cases()[case]
    ep = torch.export.export(mod, args)
    for node in ep.graph.nodes:
        if node.op == "call_function":
            assert not isinstance(node.target, torch._ops.HigherOrderOperator), node.target
            assert "while" not in str(node.target) and "scan" not in str(node.target)
    torch.testing.assert_close(ep.module()(*args), mod(*args))


def test_torch_compile_matches_eager() -> None:
    _, mod, args = _cases()[2]
    torch.testing.assert_close(torch.compile(mod, backend="eager", fullgraph=True)(*args), mod(*args))


def _all_op_types(graph) -> set[str]:  # includes subgraphs (If/Loop bodies), if any
    import onnx

    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= _all_op_types(attr.g)
            for g in attr.graphs:
                ops |= _all_op_types(g)
    return ops


@pytest.mark.parametrize("case", range(4))
def test_onnx_export_parity(case: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    name, mod, args = _cases()[case]
    prog = torch.onnx.export(mod.eval(), args, dynamo=True, verbose=False)
    model = prog.model_proto
    ops = _all_op_types(model.graph) | {n.op_type for f in model.functions for n in f.node}
    assert not ops & {"Loop", "Scan", "If"}, ops
    if name == "identity":
        assert "CumSum" in ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), args)}
    (got,) = sess.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(got), mod(*args), rtol=1e-5, atol=1e-5)


def test_onnx_dynamic_batch_matrix_scan() -> None:
    """The exported scan accepts other (B, T) than it was traced with (the layer axis N is static)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, mod, (a, d, h0) = _cases()[2]
    B, T = torch.export.Dim("B"), torch.export.Dim("T")
    dyn = ({}, {1: B, 2: T}, {0: B, 1: T})
    prog = torch.onnx.export(mod.eval(), (a, d, h0), dynamic_shapes=dyn, dynamo=True, verbose=False)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    d2 = torch.randn(d.shape[0], 5, 4, *d.shape[-2:], generator=gen)
    h2 = torch.randn(5, 4, *h0.shape[-2:], generator=gen)
    (got,) = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (a, d2, h2))})
    torch.testing.assert_close(torch.from_numpy(got), mod(a, d2, h2), rtol=1e-5, atol=1e-5)
