"""Kernel choices per transform (``SNLPConfig.lowering``, ``passes.lowering``): each rewritten graph
names its own in its calls' keyword arguments, two transforms in one process differ, an export
narrows them for its duration only, and the options-to-arguments maps are pure functions."""

from __future__ import annotations

import re

import torch
from helpers import max_err, step_inputs

import snlp_compile
from snlp_compile import LoweringOptions
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.kernels.attention import attention_lowering, layer_attention_lowering
from snlp_compile.kernels.layer_ops import linear_lowering, matmul_lowering
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep
from snlp_compile.passes.lowering import NO_KERNELS, restricted

SPEC = "nanochat-tiny"


def _step() -> tuple[CachedStep, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = build_model(SPEC, n_layer=3, dtype=torch.float64).eval()
    return CachedStep(model), step_inputs(model, seed=1)


def _calls(code: str, name: str) -> list[str]:
    """The keyword arguments of every call of ``name`` in a graph's code."""
    return [m.group(1) for m in re.finditer(rf"{name}\([^\n]*?((?:\w+ = \w+(?:, )?)+)\)", code)]


def test_options_map_to_keyword_arguments() -> None:
    """``gemv_kernel=False`` turns every kernel off; the attention products follow
    ``attention_kernel``; the layers' attention is fused only with ``decode_attention_in_layers``."""
    default = LoweringOptions()
    assert linear_lowering(default) == {"gemv": True, "pdl": True}
    assert matmul_lowering(default) == {"gemv": True, "pdl": True}
    assert attention_lowering(default) == {"fused": True, "pdl": True}
    assert layer_attention_lowering(default) == {"fused": False, "gemv": True, "pdl": True}
    off = LoweringOptions(gemv_kernel=False, decode_attention_in_layers=True)
    assert matmul_lowering(off)["gemv"] is False and linear_lowering(off)["gemv"] is False
    assert attention_lowering(off)["fused"] is False and layer_attention_lowering(off)["fused"] is False
    products = LoweringOptions(attention_kernel=False, pdl=False)
    assert linear_lowering(products) == {"gemv": True, "pdl": False}
    assert matmul_lowering(products) == {"gemv": False, "pdl": False}
    assert layer_attention_lowering(LoweringOptions(decode_attention_in_layers=True))["fused"] is True


def test_two_transforms_in_one_process_lower_their_own_graphs() -> None:
    """The same step transformed with two lowerings: each graph's calls carry its own choices
    (the other transform's do not change), and both equal the sequential step in exact mode."""
    step, inputs = _step()
    layers = step.model.config.n_layer
    fused = snlp_compile.transform(
        step, inputs, iterations=layers, lowering=LoweringOptions(decode_attention_in_layers=True)
    )
    plain = snlp_compile.transform(
        step, inputs, iterations=layers, lowering=LoweringOptions(gemv_kernel=False, pdl=False)
    )
    fused_code = fused.get_submodule(f"{SOLVE_NAME}.layers").code
    plain_code = plain.get_submodule(f"{SOLVE_NAME}.layers").code
    assert _calls(fused_code, "batched_linear") and set(_calls(fused_code, "batched_linear")) == {
        "gemv = True, pdl = True"
    }
    assert set(_calls(plain_code, "batched_linear")) == {"gemv = False, pdl = False"}
    assert _calls(fused_code, "layer_marked") == ["fused = True, gemv = True, pdl = True"]
    assert _calls(plain_code, "layer_marked") == ["fused = False, gemv = False, pdl = False"]
    with torch.no_grad():
        want = step(*inputs)
        for fast in (fused, plain):
            for got, ref in zip(fast(*inputs), want):
                assert max_err(got, ref) < 1e-10


def test_restricted_narrows_a_graph_for_a_block_and_restores_it() -> None:
    """What an ONNX export does to a transformed model: every kernel off inside the block (the
    choices AND the limit), the model's own choices back afterwards, the same numbers."""
    step, inputs = _step()
    fast = snlp_compile.transform(
        step, inputs, iterations=step.model.config.n_layer, lowering=LoweringOptions(pdl=False)
    )
    layers = fast.get_submodule(f"{SOLVE_NAME}.layers")
    before = layers.code
    with torch.no_grad():
        want = fast(*inputs)
    with restricted(fast, NO_KERNELS):
        assert set(_calls(layers.code, "batched_linear")) == {"gemv = False, pdl = False"}
        with torch.no_grad():
            got = fast(*inputs)
    assert layers.code == before and "gemv = True, pdl = False" in before
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with restricted(fast, LoweringOptions()):  # a limit that allows everything changes nothing
        assert layers.code == before


def test_attention_outside_the_solve_takes_the_transforms_choice() -> None:
    """A layer left sequential (``parallel_layers`` < layers) keeps its attention as the model's
    ``cached_attention``, called with the transform's choice (here: no fused kernel)."""
    step, inputs = _step()
    fast = snlp_compile.transform(
        step, inputs, iterations=2, parallel_layers=2, lowering=LoweringOptions(decode_attention=False)
    )
    assert _calls(fast.code, "cached_attention") == ["fused = False, pdl = True"]
    with torch.no_grad():
        assert max_err(fast(*inputs)[0], step(*inputs)[0]) < 1e-10


def test_exporting_is_true_under_torch_export_only() -> None:
    """The kernels leave the PDL launch and the fused decode attention out of exported programs
    only: ``kernels.tracing.exporting()`` is False in eager code and under ``torch.compile``
    (where ``torch.compiler.is_exporting()`` alone was True before pytorch#176347)."""
    from snlp_compile.kernels.tracing import exporting

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if exporting() else x - 1

    class Pick(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pick(x)

    x = torch.zeros(2)
    assert not exporting() and pick(x).tolist() == [-1.0, -1.0]
    assert torch.compile(pick, backend="eager", fullgraph=True)(x).tolist() == [-1.0, -1.0]
    assert torch.export.export(Pick(), (x,), strict=False).module()(x).tolist() == [1.0, 1.0]
