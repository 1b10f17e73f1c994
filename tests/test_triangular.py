"""Invariant 2: after k iterations the first k parallel layers of the solved trace are exact."""

from __future__ import annotations

import pytest
import torch
from conftest import sequential_trace

import snlp_compile
from snlp_compile.models import build_model


@pytest.mark.parametrize(
    "name,init,fraction",
    [
        ("nanochat-small", "h0", "half"),
        ("nanochat-small", "batch_fwd", "all"),
        ("gpt-tiny", "h0", "all"),
    ],
)
def test_first_k_layers_exact_after_k_iterations(name: str, init: str, fraction: str) -> None:
    model = build_model(name).double()
    blocks = list(model.transformer.h)
    par = None if fraction == "all" else len(blocks) // 2
    n = par or len(blocks)
    idx = torch.randint(0, 200, (2, 12))
    fast = snlp_compile.transform(model, (idx,), iterations=1, parallel_layers=par, init=init)
    expected = sequential_trace(model, blocks, idx)[len(blocks) - n :]
    # batch_fwd's extra evaluation makes the first layer exact before the first iteration
    bonus = 1 if init == "batch_fwd" else 0
    for k in range(1, n + 1):
        with torch.no_grad():
            trace = snlp_compile.solve_trace(fast, idx, iterations=k)
        exact = min(n, k + bonus)
        torch.testing.assert_close(trace[:exact], expected[:exact], rtol=1e-10, atol=1e-10)
        if exact < n:
            # the layer after them is not yet converged (otherwise the test would prove nothing)
            assert (trace[exact] - expected[exact]).abs().max() > 1e-8


@pytest.mark.parametrize("damping", [0.5, 0.9])
def test_damping_keeps_exactness(damping: float) -> None:
    model = build_model("nanochat-tiny").double()
    idx = torch.randint(0, 200, (1, 10))
    fast = snlp_compile.transform(model, (idx,), iterations=4, damping=damping)
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)


def test_error_shrinks_with_iterations() -> None:
    model = build_model("nanochat-small").double()
    idx = torch.randint(0, 200, (2, 12))
    fast = snlp_compile.transform(model, (idx,), iterations=1)
    expected = sequential_trace(model, list(model.transformer.h), idx)
    errors = []
    for k in range(1, 9):
        with torch.no_grad():
            trace = snlp_compile.solve_trace(fast, idx, iterations=k)
        errors.append(((trace[-1] - expected[-1]).norm() / expected[-1].norm()).item())
    assert errors[-1] < 1e-12 < errors[0]
