"""Issue 22, the torch.compile backend "snlp": weights edited after compiling (``.data.mul_``,
``load_state_dict``) are used, not stale stacked copies; transformers' Llama compiles (its
rotary-embedding externals used to become the invalid identifier ``0_model_rotary_emb_...``)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import tiny_llama
from torch import nn

import snlp_compile  # noqa: F401  (registers the backend)
from snlp_compile.export import backend_records


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_llama_compiles_with_snlp_backend_exact() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    before = len(backend_records())
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = torch.compile(model, backend="snlp", options={"iterations": 3})(ids, use_cache=False).logits
    _close(got, want)
    records = backend_records()[before:]
    assert records and all(r.rewritten for r in records), [r.reason for r in records]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.n = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.n(x))))


class Stack(nn.Module):
    def __init__(self, depth: int = 4, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def test_weights_edited_after_compiling_are_used() -> None:
    """Issue 22 case 5: ``.data.mul_`` bumps no version counter; the compiled model used to keep
    the stale stacked LayerNorm weight (rel. error 0.31). Now every edit is picked up."""
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(2, 6, 16)
    before = len(backend_records())
    compiled = torch.compile(model, backend="snlp", options={"iterations": 4})
    with torch.no_grad():
        _close(compiled(x), model(x))
        model.blocks[2].n.weight.data.mul_(2)  # what checkpoint loaders do
        _close(compiled(x), model(x))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["blocks.1.n.weight"].mul_(-3.0)
        state["blocks.3.fc1.bias"].add_(1.0)
        model.load_state_dict(state)
        _close(compiled(x), model(x))
        _close(compiled(x), model(x))  # unchanged since: no further recompilation
    records = backend_records()[before:]
    assert len(records) == 3 and all(r.rewritten for r in records), [r.reason for r in records]


def test_check_weights_option_is_validated() -> None:
    compiled = torch.compile(Stack(depth=2), backend="snlp", options={"check_weights": "never"})
    with pytest.raises(Exception, match=r"check_weights must be one of"):
        compiled(torch.randn(1, 3, 16))


def test_a_graph_rebuilt_for_edited_weights_keeps_its_symbolic_sizes() -> None:
    """Dynamo made the sequence length symbolic (two lengths called); a weight edited after that
    rebuilds the graph, which must still take both lengths (it used to be compiled for the call
    that found the edit and fail the other length in Inductor's size assertion)."""
    torch.manual_seed(0)
    model = Stack(depth=4, d=16).eval()
    compiled = torch.compile(model, backend="snlp", options={"iterations": 4})
    short, long = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    before = len(backend_records())
    with torch.no_grad():
        for x in (short, long):
            _close(compiled(x), model(x))
        model.blocks[2].n.weight.data.mul_(2)
        for x in (short, long, short, long):
            _close(compiled(x), model(x))
    assert len(backend_records()) - before == 3  # two lengths, then one rebuild for the edit
