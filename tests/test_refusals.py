"""Structures the rewrite cannot handle are refused with a message naming the node and module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snlp_compile
from snlp_compile import SNLPConfigError, SNLPRefusal


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class PostNormBlock(nn.Module):
    """The original Transformer's layer: x = LN(x + f(x)); the skip path runs through the norm."""

    def __init__(self, d: int):
        super().__init__()
        self.mlp = Mlp(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(x))


class NoSkipBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = Mlp(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PreNormBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = Mlp(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], depth: int = 4, d: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(block(d) for _ in range(depth))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class DenseStack(Stack):
    """Layer 3 reads the hidden state after layer 1 as well: not a chain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1:
                keep = x
            if i == 2:
                x = x + 0.5 * keep
        return self.head(x)


class ContextBlock(PreNormBlock):
    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x + self.mlp(self.norm(x)) + 0.1 * ctx


class ContextStack(Stack):
    """Every layer reads a context; from layer 2 on it is the output of layer 1: not a chain."""

    def __init__(self) -> None:
        super().__init__(ContextBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = x
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx)
            if i == 1:
                ctx = x
        return self.head(x)


class TapBlock(PreNormBlock):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        inner = self.mlp(self.norm(x))
        return x + inner, inner


class TapStack(Stack):
    """Each layer also hands its branch output to the head: a per-layer side output."""

    def __init__(self) -> None:
        super().__init__(TapBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = 0
        for layer in self.layers:
            x, inner = layer(x)
            taps = taps + inner
        return self.head(x + taps)


X = torch.randn(2, 5, 16)


def _refusal(model: nn.Module) -> SNLPRefusal:
    with pytest.raises(SNLPRefusal) as info:
        snlp_compile.transform(model, (X,), iterations=2)
    report = snlp_compile.explain(model, (X,))
    assert report.refusal is not None and not report.rewritten
    assert str(info.value) in report.refusal or report.refusal in str(info.value)
    assert "REFUSED" in str(report)
    return info.value


def test_post_norm_refused_naming_the_norm() -> None:
    err = _refusal(Stack(PostNormBlock).eval())
    assert "no residual skip path" in str(err)
    assert "layer_norm" in str(err)
    assert err.module_path == "layers.3.norm"
    assert err.node is not None and err.node in str(err)


def test_stack_without_skip_refused() -> None:
    err = _refusal(Stack(NoSkipBlock).eval())
    assert "no residual skip path" in str(err)
    assert err.module_path is not None and err.module_path.startswith("layers.3.mlp")


def test_cross_layer_reader_refused() -> None:
    err = _refusal(ContextStack().eval())
    assert "not a chain" in str(err)
    assert "hidden state of layer 'layers.1'" in str(err)
    assert err.node is not None and err.module_path is not None


def test_irregular_last_layer_stays_sequential_after_the_chain() -> None:
    """Layer 3 reads the state after layer 1 as well: it stays sequential, after a chain of
    layers 0..2 (it used to refuse the whole stack, as the template was always the last layer)."""
    model = DenseStack(PreNormBlock).double().eval()
    x = X.double()
    fast = snlp_compile.transform(model, (x,), iterations=3)
    report = fast.snlp_report
    assert report.parallel_layers == ["layers.0", "layers.1", "layers.2"]
    assert any("layers 3..3 stay sequential after the chain" in n for n in report.notes), report.notes
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


class MixStack(Stack):
    """The head reads the scaled layer inputs the loop computes: values inside the chain's layers
    (between two hidden states) that are neither a layer's output nor a module's side output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = 0
        for layer in self.layers:
            u = 0.9 * x
            taps = taps + u.tanh()
            x = layer(u)
        return self.head(x + taps)


def test_intermediate_reader_refused() -> None:
    err = _refusal(MixStack(PreNormBlock).eval())
    assert "intermediate value" in str(err)
    assert err.node is not None and err.module_path is not None


def test_side_outputs_are_solved_exactly() -> None:
    """Values a layer module hands out besides its hidden state come out of the solve too."""
    model = TapStack().double().eval()
    x = X.double()
    fast = snlp_compile.transform(model, (x,), iterations=4)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


def test_prenorm_stack_accepted_and_exact() -> None:
    model = Stack(PreNormBlock).double().eval()
    x = X.double()
    fast = snlp_compile.transform(model, (x,), iterations=4)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


def test_too_many_parallel_layers() -> None:
    with pytest.raises(SNLPRefusal, match="parallel_layers=9"):
        snlp_compile.transform(Stack(PreNormBlock).eval(), (X,), parallel_layers=9)


def test_single_layer_refused() -> None:
    with pytest.raises(SNLPRefusal):
        snlp_compile.transform(Stack(PreNormBlock, depth=1).eval(), (X,))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("iterations", 0, "iterations"),
        ("init", "zeros", "init"),
        ("damping", 1.5, "damping"),
        ("parallel_layers", 0, "parallel_layers"),
        ("bogus", 1, "unknown SNLPConfig field"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(SNLPConfigError, match=match):
        snlp_compile.transform(Stack(PreNormBlock).eval(), (X,), **{field: value})


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        snlp_compile.transform(lambda x: x, (X,))  # type: ignore[arg-type]


def test_unknown_container_named() -> None:
    with pytest.raises(SNLPRefusal, match="names no layer container"):
        snlp_compile.transform(Stack(PreNormBlock).eval(), (X,), layers="blocks")


def test_rewritten_model_eval_is_a_no_op_and_train_a_clear_error() -> None:
    """Inference scripts call .eval(); torch.export's module raised NotImplementedError for it."""
    from snlp_compile import SNLPUsageError
    from snlp_compile.models import build_model

    model = build_model("gpt-tiny", dtype=torch.float64)
    idx = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    fast = snlp_compile.transform(model, (idx,), iterations=model.config.n_layer, dynamic_shapes=False)
    other = snlp_compile.transform(model, (idx,), iterations=1, dynamic_shapes=False)
    assert fast.eval() is fast and fast.train(False) is fast
    with torch.no_grad():
        assert (fast(idx) - model(idx)).abs().max() < 1e-10
    with pytest.raises(SNLPUsageError, match="inference graph"):
        fast.train()
    assert other.eval() is other  # every rewritten model gets the switches


def test_deep_copies_keep_the_switches_report_and_config() -> None:
    """A GraphModule's deep copy is rebuilt from its graph: the copy (and a copy of the copy) still
    refuses .train(), keeps .snlp_report / .snlp_config, and computes the same function."""
    import copy

    from snlp_compile import SNLPUsageError
    from snlp_compile.models import build_model

    model = build_model("gpt-tiny", dtype=torch.float64)
    idx = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    fast = snlp_compile.transform(model, (idx,), iterations=model.config.n_layer, dynamic_shapes=False)
    for twin in (copy.deepcopy(fast), copy.deepcopy(copy.deepcopy(fast))):
        with pytest.raises(SNLPUsageError, match="inference graph"):
            twin.train()
        assert twin.eval() is twin
        assert twin.snlp_config == fast.snlp_config
        assert twin.snlp_report.parallel_layers == fast.snlp_report.parallel_layers
        with torch.no_grad():
            assert (twin(idx) - model(idx)).abs().max() < 1e-10


def test_dtype_conversion_of_a_rewritten_model_is_refused_before_anything_moves() -> None:
    """The captured graph keeps its dtypes: .half()/.to(dtype) are refused with a clear message and
    leave every weight as it was; a move that keeps the dtype (.to(same device)) still works."""
    from snlp_compile import SNLPUsageError
    from snlp_compile.models import build_model

    model = build_model("gpt-tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    fast = snlp_compile.transform(model, (idx,), iterations=model.config.n_layer, dynamic_shapes=False)
    for convert in (lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.double()):
        with pytest.raises(SNLPUsageError, match=r"captured in torch\.float32"):
            convert(fast)
    assert {t.dtype for t in [*fast.parameters(), *fast.buffers()] if t.is_floating_point()} == {
        torch.float32
    }
    assert fast.to("cpu") is fast
    with torch.no_grad():
        assert (fast(idx) - model(idx)).abs().max() < 1e-4
