"""Shared fixtures: deterministic seeds, small reference models, the sequential hidden-state trace."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# one thread per xdist worker: with two workers on two cores, more threads thrash (10-20x slower)
torch.set_num_threads(1)


# names of the functions and ATen ops that count as matrix products in op-count tests
MATMUL_OPS = (
    "linear",
    "matmul",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "einsum",
    "batched_linear",
    "batched_linear_dynamic",
    "layer_matmul",
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def nanochat_f64() -> torch.nn.Module:
    """nanochat-tiny in float64 (seed 3): the decode-path quality tests' model."""
    from snlp_compile.models import build_model

    return build_model("nanochat-tiny", seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def token_windows() -> torch.Tensor:
    """Two held-out-like windows of 13 token ids (12 teacher-forced positions each)."""
    return torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))


def sequential_trace(model: torch.nn.Module, layers: list[torch.nn.Module], *args, **kwargs) -> torch.Tensor:
    """Outputs of each layer module in the original model's sequential forward, stacked."""
    outs: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        outs.append(out[0] if isinstance(out, tuple) else out)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs)
