"""With ``check_weights="alias"`` the torch.compile backend "snlp" makes the model's layer weights views of the stacked weights
its solve reads (``export.weight_alias``): edits in place (``.data`` too) need no per-call
content check and no recompilation; replacing a weight recompiles; weights something was folded
from at transform time (static skip products) and weights outside the chain stay checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.fx as fx
from helpers import tiny_llama, tokens
from test_compile_issue22 import Stack
from torch import nn

import snlp_compile  # noqa: F401  (registers the backend)
from snlp_compile.export import backend_records
from snlp_compile.export.compile_backend import BackendRecord
from snlp_compile.ir.plan import SolvePlan, WeightSources


@pytest.fixture(autouse=True)
def _fresh_dynamo_no_grad() -> Iterator[None]:
    """Each test compiles from scratch; no autograd (weights are edited in place)."""
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@dataclass
class Compiled:
    """A model and its torch.compile(backend="snlp") version; ``call`` runs either on the test's
    input and returns the tensor compared."""

    model: nn.Module
    compiled: Callable[..., Any]
    call: Callable[[Callable[..., Any]], torch.Tensor]
    before: int  # backend records before the first compilation

    def assert_matches(self) -> None:
        _same(self.call(self.compiled), self.call(self.model))

    @property
    def compilations(self) -> int:
        return len(backend_records()) - self.before


def _compile(
    model: nn.Module,
    call: Callable[[Callable[..., Any]], torch.Tensor],
    check_weights: str = "alias",
    iterations: int = 4,
) -> tuple[Compiled, BackendRecord]:
    """Compile ``model``, check its first output and that it compiled once; the record of it."""
    options = {"check_weights": check_weights, "iterations": iterations}
    c = Compiled(model, torch.compile(model, backend="snlp", options=options), call, len(backend_records()))
    c.assert_matches()
    assert c.compilations == 1
    return c, backend_records()[-1]


def test_layer_weights_share_the_stacked_storage_and_edits_need_no_recompile() -> None:
    torch.manual_seed(0)
    model = Stack(depth=4, d=16).eval()
    x = torch.randn(2, 5, 16)
    c, record = _compile(model, lambda f: f(x))
    assert (record.aliased, record.checked) == (24, 0)
    # one storage per stacked weight, shared by the layers' own weights
    storages = {b.fc1.weight.untyped_storage().data_ptr() for b in model.blocks}
    assert len(storages) == 1
    model.blocks[2].n.weight.data.mul_(2)  # bumps no version counter
    c.assert_matches()
    model.blocks[0].fc2.bias.add_(0.5)
    c.assert_matches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.3.fc1.weight"].mul_(-1.0)
    model.load_state_dict(state)
    c.assert_matches()
    assert c.compilations == 1  # none of these recompiled
    model.blocks[1].fc1.weight.data = model.blocks[1].fc1.weight.data * 0.5  # replaced
    c.assert_matches()
    assert c.compilations == 2
    assert backend_records()[-1].aliased == 24  # aliased again, the new weight included
    model.blocks[1].fc1.weight.data.mul_(3.0)
    c.assert_matches()
    assert c.compilations == 2


def test_fused_qkv_rows_and_weights_outside_the_chain_are_aliased_buffers_checked() -> None:
    model = tiny_llama()
    ids = tokens(model)
    c, record = _compile(model, lambda f: f(ids, use_cache=False).logits, iterations=3)
    assert record.rewritten
    # q, k, v, o, gate, up, down and two norms per layer; embedding, final norm, lm_head
    assert record.aliased == 3 * 9 + 3
    assert record.checked == 1  # the rotary embedding's inv_freq (a buffer)
    attn = model.model.layers[1].self_attn
    storages = {
        attn.q_proj.weight.untyped_storage().data_ptr(),
        attn.v_proj.weight.untyped_storage().data_ptr(),
    }
    assert len(storages) == 1  # rows of the fused q/k/v weight
    attn.k_proj.weight.data.mul_(-2.0)
    c.assert_matches()
    model.model.norm.weight.data.mul_(3.0)  # outside the chain: the rewritten graph's own copy
    c.assert_matches()
    assert c.compilations == 1
    model.model.rotary_emb.inv_freq.data.mul_(0.5)  # content-checked: recompiles
    c.assert_matches()
    assert c.compilations == 2


class ScaledBlock(nn.Module):
    """x -> lam * x + mlp(x): a per-layer scalar skip, folded into static products."""

    def __init__(self, d: int, lam: float) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(lam))
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * x + self.fc2(torch.relu(self.fc1(x)))


def test_weights_folded_into_static_skip_products_stay_content_checked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(ScaledBlock(16, 0.9 + 0.05 * i) for i in range(4))).eval()
    x = torch.randn(2, 5, 16)
    c, record = _compile(model, lambda f: f(x))
    assert record.rewritten and record.aliased == 0 and record.checked == 20
    model[2].lam.data.mul_(0.5)  # the folded products must follow: recompiled
    c.assert_matches()
    assert c.compilations == 2


@pytest.mark.parametrize("check", ["content", "version", "off"])
def test_other_checks_alias_nothing(check: str) -> None:
    """The default byte check and the cheaper ones leave the model's weights as they are."""
    torch.manual_seed(0)
    model = Stack(depth=2, d=16).eval()
    pointer = model.blocks[0].fc1.weight.data_ptr()
    x = torch.randn(1, 3, 16)
    _, record = _compile(model, lambda f: f(x), check_weights=check)
    assert record.aliased == 0 and record.checked == (0 if check == "off" else 12)
    assert model.blocks[0].fc1.weight.data_ptr() == pointer


def test_plan_sources_name_one_attribute_per_layer() -> None:
    """A block of the plan (distributed ranks) takes its layers' sources; a plan whose sources do
    not name one attribute per layer is refused (an alias would pick the wrong row)."""
    sources = WeightSources({"w": ("h.0.w", "h.1.w", "h.2.w")}, frozenset({"h.0.s"}))
    assert sources.layers(1, 3) == WeightSources({"w": ("h.1.w", "h.2.w")}, frozenset({"h.0.s"}))
    body = fx.GraphModule(nn.Module(), fx.Graph())
    plan = SolvePlan(3, "elementwise", 1.0, body, body, (), sources=sources)
    with pytest.raises(ValueError, match="one attribute per layer"):
        dataclasses.replace(plan, num_layers=2, stage_sizes=(2,))


class ReadAfterChain(Stack):
    """Reads a layer's weight after the chain too: the rewritten graph keeps its own copy of it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x + 0.1 * (x @ self.blocks[1].fc2.weight[:, :16])


def test_a_layer_weight_also_read_outside_the_chain_stays_content_checked() -> None:
    torch.manual_seed(0)
    model = ReadAfterChain(depth=4, d=16).eval()
    x = torch.randn(2, 5, 16)
    c, record = _compile(model, lambda f: f(x))
    assert record.rewritten and (record.aliased, record.checked) == (23, 1)
    weight = model.blocks[1].fc2.weight
    assert weight.untyped_storage().data_ptr() != model.blocks[0].fc2.weight.untyped_storage().data_ptr()
    weight.data.mul_(2.0)  # two copies to follow: recompiled
    c.assert_matches()
    assert c.compilations == 2


def test_weights_tied_through_their_storage_stay_tied_and_checked() -> None:
    torch.manual_seed(0)
    model = Stack(depth=4, d=16).eval()
    model.blocks[1].n.weight = nn.Parameter(model.blocks[0].n.weight.data)  # one storage, two parameters
    x = torch.randn(2, 5, 16)
    c, record = _compile(model, lambda f: f(x))
    assert record.rewritten and (record.aliased, record.checked) == (22, 2)
    model.blocks[0].n.weight.data.mul_(-1.5)  # edits both
    assert model.blocks[1].n.weight.data_ptr() == model.blocks[0].n.weight.data_ptr()
    c.assert_matches()
