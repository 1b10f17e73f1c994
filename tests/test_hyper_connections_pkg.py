"""HC Newton on models assembled from the ``hyper-connections`` package (lucidrains): its
``HyperConnections`` and ``ManifoldConstrainedHyperConnections`` around nanochat's attention and
MLP, with fixed ``layer_index``. The package keeps the streams folded into the batch axis,
(B*n, T, D), and re-arranges them in every sublayer; the analysis has to see through that."""

from __future__ import annotations

import pytest
import torch
from conftest import sequential_trace

import snlp_compile
from snlp_compile.models import model_config
from snlp_compile.models.mhc import HCPackageGPT
from snlp_compile.solve.solver import identity_surrogate

pytest.importorskip("hyper_connections", reason="the hyper-connections package is a dev dependency")

VARIANTS = ["hc", "mhc"]
FAST = {"sinkhorn_iters": 4}  # the manifold variant's Sinkhorn (20 by default) slows capture
# the manifold variant computes its mixing in float32 whatever the model's dtype
TOL64 = {"hc": 1e-10, "mhc": 1e-6}


def _model(variant: str, n_layer: int = 3, **options: object) -> HCPackageGPT:
    torch.manual_seed(0)
    return HCPackageGPT(
        model_config("nanochat-tiny", n_layer=n_layer), manifold=variant == "mhc", **options
    ).eval()


def _tokens(batch: int = 2, t: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_recovery_float32(variant: str) -> None:
    """K = layers reproduces the model (package defaults, float32), at other sizes too; the
    skip is reported as HCN over 4 streams seen through the package's layout."""
    model = _model(variant)
    fast = snlp_compile.transform(model, (_tokens(),), iterations=3)
    skip = fast.snlp_report.skip
    assert "(HCN) over 4 streams" in skip and "dynamic" in skip
    assert "H = H(mlp)[rows 1..4] @ H(attn)[rows 1..4]" in skip  # row 0 is the branch input
    assert "permute(0, 2, 3, 1, 4)" in skip
    assert not [n for n in fast.snlp_report.notes if "vmap" in n]  # no vmap fallback
    for batch, t in [(2, 10), (1, 4), (3, 9)]:
        idx = _tokens(batch, t, seed=batch * t)
        with torch.no_grad():
            torch.testing.assert_close(fast(idx), model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_k_layers_exact_after_k_iterations(variant: str) -> None:
    model = _model(variant, n_layer=4, **(FAST if variant == "mhc" else {})).double()
    idx = _tokens()
    fast = snlp_compile.transform(model, (idx,), iterations=1)
    expected = sequential_trace(model, list(model.transformer.h), idx)
    for k in range(1, len(expected) + 1):
        with torch.no_grad():
            trace = snlp_compile.solve_trace(fast, idx, iterations=k)
        torch.testing.assert_close(trace[:k], expected[:k], rtol=TOL64[variant], atol=TOL64[variant])
        if k < len(expected):
            assert (trace[k] - expected[k]).abs().max() > 1e3 * TOL64[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_layers_are_solved_in_one_iteration(variant: str) -> None:
    """Branches and the input dependence of H off in the parallel layers: each is h -> A_j h in
    the package's (B*n, T, D) layout, and one HCN iteration is exact (the identity surrogate
    is not), which checks the matrix, its rows and the layout the analysis found."""
    model = _model(variant, n_layer=4, **(FAST if variant == "mhc" else {})).double()
    with torch.no_grad():
        for block in model.transformer.h[1:]:
            for hcm in (block.attn, block.mlp):
                hcm.branch.branch.c_proj.weight.zero_()
                hcm.dynamic_alpha_fn.zero_()
    idx = _tokens()
    fast = snlp_compile.transform(model, (idx,), iterations=1, parallel_layers=3)
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=TOL64[variant], atol=TOL64[variant])
        expected = sequential_trace(model, list(model.transformer.h), idx)[1:]
        with identity_surrogate(fast.snlp_solve):
            trace = snlp_compile.solve_trace(fast, idx)
        assert float((trace - expected).norm() / expected.norm()) > 1e-3


def test_frac_connections_mix_fraction_stream_pairs() -> None:
    """num_fracs = 2 (frac-connections): the mixing contracts (fraction, stream) pairs, which the
    analysis merges into 8 streams; K = layers is exact."""
    model = _model("hc", num_fracs=2)
    idx = _tokens()
    fast = snlp_compile.transform(model, (idx,), iterations=3)
    assert "(HCN) over 8 streams" in fast.snlp_report.skip
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-5, atol=1e-5)
