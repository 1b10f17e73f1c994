"""torch.compile lowering: the "snlp" backend and snlp_compile.compile(), on CPU with Inductor.

Inductor compiles on this machine take tens of seconds each, so every test compiles once and
checks everything it can on that one compilation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError, SNLPRefusal
from snlp_compile.export import SNLPBackendWarning, backend_records
from snlp_compile.export.compile_backend import (
    _placeholder_weight_path,
    lift_dynamo_graph,
    module_path,
    split_options,
)
from snlp_compile.models import build_model


class PostNormBlock(nn.Module):
    """x = LN(x + f(x)): the skip runs through the norm, so the rewrite must refuse it."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.relu(self.fc(x)))


class PostNormStack(nn.Module):
    def __init__(self, depth: int = 3, d: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(PostNormBlock(d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_backend_is_registered() -> None:
    assert "snlp" in torch._dynamo.list_backends()


def test_backend_rewrites_and_matches_eager_and_original(capfd: pytest.CaptureFixture[str]) -> None:
    """torch.compile(model, backend="snlp") in exact mode (K = L): the compiled output equals the
    eager transformed module and the original model; the backend records what it matched; a
    weight edited after compiling is used, not the stale stacked copy. Compiling an eval-mode
    model prints nothing: no training-mode warning about Dynamo's graph, no fx traceback from
    verify's call at another batch size (Dynamo's first graph fixes the batch)."""
    model = build_model("nanochat-tiny", n_layer=3)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = model(idx)
        eager = snlp_compile.transform(model, (idx,), iterations=3)(idx)
    before = len(backend_records())
    compiled = torch.compile(model, backend="snlp", options={"iterations": 3})
    capfd.readouterr()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(idx)
    assert not [w for w in caught if "training mode" in str(w.message)], [str(w.message) for w in caught]
    assert "Traceback" not in capfd.readouterr().err
    _close(got, eager)
    _close(got, want)
    records = backend_records()[before:]
    assert len(records) == 1 and records[0].rewritten
    report = records[0].report
    assert report.container == "transformer.h"
    assert report.parallel_layers == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert "scaled IDN" in report.skip
    assert "K=3" in report.config
    with torch.no_grad():  # an edit after compiling is used (the graph is recompiled), not stale
        model.transformer.h[1].mlp.c_fc.weight.mul_(0.5)
        _close(compiled(idx), model(idx))


def test_backend_compiles_refused_model_sequentially_with_warning() -> None:
    model = PostNormStack().eval()
    x = torch.randn(2, 5, 16)
    before = len(backend_records())
    with pytest.warns(SNLPBackendWarning, match=r"compiled sequentially.*skip"):
        compiled = torch.compile(model, backend="snlp")
        with torch.no_grad():
            got = compiled(x)
    with torch.no_grad():
        _close(got, model(x))
    (record,) = backend_records()[before:]
    assert not record.rewritten
    assert record.reason is not None and "SNLPRefusal" in record.reason


def test_compile_one_call_path() -> None:
    """snlp_compile.compile(): transform + Inductor (mode plumbed through; CUDA graphs are inert
    on the CPU), exact mode equals the eager transformed module and the original model."""
    model = build_model("gpt-tiny", n_layer=3)
    idx = torch.randint(0, 256, (2, 10))
    fast = snlp_compile.compile(model, (idx,), SNLPConfig(iterations=3), mode="reduce-overhead")
    assert fast.snlp_report.rewritten and "IDN" in fast.snlp_report.skip
    with torch.no_grad():
        got = fast(idx)
        _close(got, snlp_compile.transform(model, (idx,), iterations=3)(idx))
        _close(got, model(idx))


def test_compile_refusal_strict_raises_and_default_warns() -> None:
    model = PostNormStack().eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(SNLPRefusal, match="skip"):
        snlp_compile.compile(model, (x,), strict=True)
    with pytest.warns(SNLPBackendWarning, match="compiled sequentially"):
        fast = snlp_compile.compile(model, (x,))
    assert fast.snlp_report is None
    with torch.no_grad():
        _close(fast(x), model(x))


def test_backend_options_split() -> None:
    config, patches = split_options({"iterations": 2, "init": "batch_fwd", "max_autotune": False})
    assert config == SNLPConfig(iterations=2, init="batch_fwd")
    assert patches == {"max_autotune": False}
    config, _ = split_options({"config": SNLPConfig(iterations=3), "damping": 0.5})
    assert (config.iterations, config.damping) == (3, 0.5)
    with pytest.raises(SNLPConfigError, match=r"snlp backend options.*iterations"):
        split_options({"iterations": 0})


def test_backend_bad_option_fails_compilation() -> None:
    model = build_model("gpt-tiny", n_layer=2)
    idx = torch.randint(0, 256, (2, 6))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"SNLPConfig\.damping"):
        torch.compile(model, backend="snlp", options={"damping": 2.0})(idx)


@pytest.mark.parametrize(
    ("dynamo", "ours"),
    [
        ("L['self'].transformer.h.0.attn", "transformer.h.0.attn"),
        ("L['self']._modules['model']._modules['layers']._modules['3']", "model.layers.3"),
        ("L['self'].layers[2].mlp", "layers.2.mlp"),
        ("L['self']._modules['h']._parameters['weight']", "h.weight"),
        ("L['model'].blocks['0']", "blocks.0"),
    ],
)
def test_module_path_from_dynamo_spelling(dynamo: str, ours: str) -> None:
    assert module_path(dynamo) == ours


@pytest.mark.parametrize(
    ("name", "path"),
    [
        (
            "l_self_modules_transformer_modules_h_modules_0_modules_attn_modules_c_q_parameters_weight_",
            "transformer.h.0.attn.c_q.weight",
        ),
        ("l_self_buffers_cos_", "cos"),
        ("l_self_parameters_resid_lambdas_", "resid_lambdas"),
        ("l_idx_", None),
    ],
)
def test_weight_path_from_placeholder_name_without_source(name: str, path: str | None) -> None:
    """Dynamo versions without ``_dynamo_source`` on placeholders: the name spells the path."""
    graph = torch.fx.Graph()
    node = graph.placeholder(name)
    assert not hasattr(node, "_dynamo_source")
    assert _placeholder_weight_path(node) == path


def test_lift_keeps_attributes_and_submodules_dynamo_did_not_lift() -> None:
    """A graph holding weights as get_attr / modules as call_module (Dynamo without inlined
    modules) lifts to a module computing the same function over its real inputs."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 0.5))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.proj(x) * self.scale,)

    model = Scaled()
    gm = torch.fx.symbolic_trace(model)
    assert {n.op for n in gm.graph.nodes} >= {"get_attr", "call_module"}
    x = torch.randn(3, 4)
    lifted = lift_dynamo_graph(gm, [x])
    assert lifted.user_positions == [0] and lifted.weights == []
    torch.testing.assert_close(lifted.module(x)[0], model(x)[0])
