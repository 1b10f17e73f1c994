"""Issue 22, "never silently wrong": the silently wrong cases, each refused at transform time.

Each model is a tiny residual stack of 4 identical layers that the rewrite used to accept and get
wrong in exact mode (``verify=False`` shows it: the old behaviour); with the defaults it is refused,
by the capture (buffers written in forward) or by the verification (``snlp_compile.verify``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import snlp_compile
from snlp_compile import SNLPRefusal
from snlp_compile.passes import capture as capture_pass

C, L, B, T = 16, 4, 2, 5


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(L))
        self.head = nn.Linear(C, C)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class InPlaceBuffer(nn.Module):
    """(1) an in-place write into a buffer allocated in the layer."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        b, t, c = x.shape
        buf = torch.zeros(b, t, c, dtype=x.dtype, device=x.device)
        buf[:, :, :] = self.f(self.n(x))
        return x + buf


class CallCounter(nn.Module):
    """(2) a buffer updated in forward; the output scaled by it."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x + self.f(self.n(x)) * self.calls


class RunningStat(nn.Module):
    """(3) a running statistic updated from the hidden state, then used."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)
        self.register_buffer("running", torch.zeros(C))

    def forward(self, x):
        self.running.mul_(0.5).add_(0.5 * x.detach().mean((0, 1)))
        return x + self.f(self.n(x) - self.running)


class ExpandGate(nn.Module):
    """(4) ``gate.expand(x.shape[0], -1, -1)``: batch == parallel layers is a coincidence."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        y = self.f(self.n(x))
        gate = torch.sigmoid(y.mean(0))
        return x + y * gate.expand(x.shape[0], -1, -1)


class InPlaceResidual(nn.Module):
    """``x += f(norm(x))``: the first layer writes the model's input in place."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        x += self.f(self.n(x))
        return x


def test_in_place_write_into_the_input_is_refused_at_capture() -> None:
    model = Stack(InPlaceResidual).eval()
    x = torch.randn(B, T, C)
    before = x.clone()
    with pytest.raises(SNLPRefusal, match=r"'blocks\.0' writes the input 'x' in forward.*module 'blocks\.0'"):
        snlp_compile.transform(model, (x,), iterations=L)
    assert torch.equal(x, before)  # (the example inputs are not written either)


class EmptySum(nn.Module):
    """``torch.sum(y, dim=())``: the batched body failed at call time."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        y = self.f(self.n(x))
        return x + y * torch.sum(y, dim=()).tanh()


class RandomLayer(nn.Module):
    """``randn_like`` inside a layer: vmap's randomness error at call time."""

    def __init__(self):
        super().__init__()
        self.n, self.f = nn.LayerNorm(C), nn.Linear(C, C)

    def forward(self, x):
        y = self.f(self.n(x))
        return x + y + 0.1 * torch.randn_like(y)


class ForcedDropout(RandomLayer):
    """``F.dropout(..., training=True)`` written into the layer: random in eval mode too."""

    def forward(self, x):
        return x + torch.nn.functional.dropout(self.f(self.n(x)), 0.1, training=True)


class Widths(nn.Module):
    """Layers of different MLP widths: the stacking failed inside transform() and explain()."""

    def __init__(self):
        super().__init__()
        self.n, self.up, self.down = nn.LayerNorm(C), nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.n(x))))


@pytest.mark.parametrize(
    "block, match",
    [
        (EmptySum, r"verify: the rewritten model fails on call 1 where the original runs \(IndexError"),
        (
            RandomLayer,
            r"layer 'blocks\.3' draws random numbers \(aten\.randn_like\.default\).*module 'blocks\.3'",
        ),
        (ForcedDropout, r"layer 'blocks\.3' draws random numbers \(aten\.dropout\.default\)"),
    ],
    ids=["empty_sum", "randn_like", "forced_dropout"],
)
def test_failure_after_acceptance_is_refused(block: type[nn.Module], match: str) -> None:
    model = Stack(block).eval()
    with pytest.raises(SNLPRefusal, match=match):
        snlp_compile.transform(model, (torch.randn(B, T, C),), iterations=L)


def test_a_layer_of_another_width_stays_sequential() -> None:
    """Layers of different MLP widths used to crash the stacking in transform() and explain(); a
    layer that differs in width now stays sequential before the chain of identical ones."""
    torch.manual_seed(0)
    model = Stack(Widths).double().eval()
    model.blocks[0].up, model.blocks[0].down = nn.Linear(C, 3 * C), nn.Linear(3 * C, C)
    model.double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    fast = snlp_compile.transform(model, (x,), iterations=L)
    report = fast.snlp_report
    assert report.parallel_layers == ["blocks.1", "blocks.2", "blocks.3"]
    assert "layer 'blocks.0' differs from the template 'blocks.3'" in report.notes[0]
    assert "where the template's" in report.notes[0] and "'48'" in report.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)


def test_layers_all_of_different_widths_are_refused_naming_the_layer() -> None:
    model = Stack(Widths).eval()
    for i, block in enumerate(model.blocks):
        block.up, block.down = nn.Linear(C, (i + 1) * C), nn.Linear((i + 1) * C, C)
    x = torch.randn(B, T, C)
    match = (
        r"fewer than two layers of 'blocks' can be solved in parallel.*layer 'blocks\.2' differs from "
        r"the template 'blocks\.3' \(relu_2 has shape \[.*'48'\] where the template's relu_3 has "
        r"\[.*'64'\]\).*module 'blocks'"
    )
    with pytest.raises(SNLPRefusal, match=match):
        snlp_compile.transform(model, (x,), iterations=L)
    report = snlp_compile.explain(model, (x,), iterations=L)  # (it used to raise a RuntimeError)
    assert report.refusal is not None and not report.rewritten


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # (under no_grad in callers)


def _silently_wrong(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The old behaviour (no verification, no refusal of state writes): accepted, and wrong on
    the first or second call or at another batch size (or failing there)."""
    with monkeypatch.context() as m:
        m.setattr(capture_pass, "state_write", lambda ep: None)
        try:
            fast = snlp_compile.transform(model, (x,), iterations=L, verify=False)
        except SNLPRefusal:
            return False
    torch.set_grad_enabled(False)
    ref = [model(x.clone()) for _ in range(2)]
    try:
        got = [fast(x.clone()) for _ in range(2)]
        x2 = torch.randn(B + 1, T, C) if x.shape[0] == B else torch.randn(B, T, C)
        wrong_other = _rel(fast(x2), model(x2)) > 1e-3
    except RuntimeError:
        return True
    finally:
        torch.set_grad_enabled(True)
    return wrong_other or any(_rel(g, r) > 1e-3 for g, r in zip(got, ref))


CASES = {
    "call_counter": (CallCounter, B, r"writes the buffer 'blocks\.0\.calls' in forward.*module 'blocks\.0'"),
    "running_stat": (RunningStat, B, r"writes the buffer 'blocks\.0\.running' in forward"),
}


def test_in_place_write_into_a_local_buffer_is_exact() -> None:
    """(1) was silently wrong, then refused by verify; the capture now functionalises in-place
    writes into tensors the forward allocates (the writes become ``slice_scatter``), so the layer
    analysis sees their data flow: exact without the verification, at other sizes too."""
    torch.manual_seed(0)
    model = Stack(InPlaceBuffer).double().eval()
    x = torch.randn(B, T, C, dtype=torch.float64)
    fast = snlp_compile.transform(model, (x,), iterations=L, verify=False)
    assert fast.snlp_report.parallel_layers == [f"blocks.{i}" for i in range(L)]
    with torch.no_grad():
        for shape in ((B, T, C), (L, L, C), (1, 3, C)):
            y = torch.randn(*shape, dtype=torch.float64)
            torch.testing.assert_close(fast(y), model(y), rtol=1e-10, atol=1e-10)


def test_expand_adding_leading_dims_is_exact() -> None:
    """(4) was wrong at batch == layers (the rule put the layer axis in front of a size list
    that adds leading dims), a call-time error at other batches, then refused by verify; the new
    dims now go after the layer axis: exact at every batch, batch == layers included."""
    torch.manual_seed(0)
    model = Stack(ExpandGate).double().eval()
    for batch in (L, B):
        fast = snlp_compile.transform(
            model, (torch.randn(batch, T, C, dtype=torch.float64),), iterations=L, verify=False
        )
        with torch.no_grad():
            for other in (batch, 3, L):
                y = torch.randn(other, T, C, dtype=torch.float64)
                torch.testing.assert_close(fast(y), model(y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_silently_wrong_case_is_refused(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    block, batch, match = CASES[case]
    torch.manual_seed(0)
    model = Stack(block).eval()
    x = torch.randn(batch, T, C)
    # the state of stateful layers is the user's: run them on copies for the "before" check
    assert _silently_wrong(copy.deepcopy(model), x, monkeypatch), (
        "the case no longer reproduces (nothing to refuse)"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SNLPRefusal, match=match):
        snlp_compile.transform(model, (x,), iterations=L)
    report = snlp_compile.explain(model, (x,), iterations=L)
    assert report.refusal is not None and not report.rewritten
    # the user's model is untouched by capture and verification
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_example_inputs_sharing_memory_are_captured_as_distinct_inputs() -> None:
    """One tensor passed as both the K and the V cache of the example: torch.export would capture
    them as one input, and the step would read the K cache for V on every later call. Capture gives
    each example its own memory, so the step is exact on distinct caches."""
    from snlp_compile.models import build_model
    from snlp_compile.models.kv import CachedStep

    model = build_model("nanochat-tiny", dtype=torch.float64)
    same = torch.zeros(4, 2, 2, 16, 16, dtype=torch.float64)
    step = snlp_compile.transform(
        CachedStep(model), (torch.zeros(2, 1, dtype=torch.long), torch.tensor(0), same, same), iterations=4
    )
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(4, 2, 2, 16, 16, dtype=torch.float64, generator=g) for _ in range(2))
    idx, pos = torch.randint(0, 256, (2, 1), generator=g), torch.tensor(5)
    with torch.no_grad():
        got, want = step(idx, pos, k, v), model.forward_cached(idx, pos, k, v)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) < 1e-10


def test_verify_refuses_a_wrong_rewrite_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net on its own: a batching rule broken on purpose (relu batched as tanh) is
    accepted by every structural check and refused by the verification, naming the layers."""
    from snlp_compile.passes import batch_layers

    rule = batch_layers._Batcher.rule

    def broken(self: batch_layers._Batcher, node: torch.fx.Node) -> object:
        if batch_layers.target_name(node) == "relu":
            return self.call(torch.tanh, self.env[node.args[0]])
        return rule(self, node)

    monkeypatch.setattr(batch_layers._Batcher, "rule", broken)
    model = Stack(Widths).eval()
    x = torch.randn(B, T, C)
    match = (
        r"verify: the rewritten model \(exact mode\) disagrees with the original on call 1: relative error "
        r".* at the output; largest at layer 'blocks\.\d' .*module 'blocks\.\d'"
    )
    with pytest.raises(SNLPRefusal, match=match):
        snlp_compile.transform(model, (x,), iterations=L)
    fast = snlp_compile.transform(model, (x,), iterations=L, verify=False)  # (what it would have been)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) > 1e-3


class CopyInto(InPlaceBuffer):
    """``buf.copy_(y)`` into a buffer the layer allocates: the vmap fallback failed at call time."""

    def forward(self, x):
        y = self.f(self.n(x))
        buf = torch.empty_like(y)
        buf.copy_(y)
        return x + buf


class IndexAdd(InPlaceBuffer):
    """``index_add_`` into a layer-local accumulator."""

    def forward(self, x):
        y = self.f(self.n(x))
        acc = torch.zeros_like(y)
        acc.index_add_(1, torch.arange(x.shape[1]), y)
        return x + acc


class TransposedMean(InPlaceBuffer):
    """``y.mean((0, 1)).t()``: t() of a 1-D value is the value; the rule transposed the layer axis."""

    def forward(self, x):
        y = self.f(self.n(x))
        return x + y * y.mean((0, 1)).t()


@pytest.mark.parametrize("block", [CopyInto, IndexAdd, TransposedMean], ids=["copy_", "index_add_", "mean_t"])
def test_ops_that_failed_after_acceptance_are_exact(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = Stack(block).double().eval()
    fast = snlp_compile.transform(
        model, (torch.randn(B, T, C, dtype=torch.float64),), iterations=L, verify=False
    )
    with torch.no_grad():
        for batch in (B, 3, L):
            y = torch.randn(batch, T, C, dtype=torch.float64)
            torch.testing.assert_close(fast(y), model(y), rtol=1e-10, atol=1e-10)


def _relu_at_batch_2_only(t: torch.Tensor) -> torch.Tensor:
    return torch.relu(t) if t.shape[1] == B else torch.tanh(t)  # (t: layers, batch, ...)


def test_verify_checks_a_second_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite right at the example's batch and wrong at others (relu batched right only at
    batch 2, on purpose) is refused at the second batch size verify tries."""
    from snlp_compile.passes import batch_layers

    rule = batch_layers._Batcher.rule

    def broken(self: batch_layers._Batcher, node: torch.fx.Node) -> object:
        if batch_layers.target_name(node) == "relu":
            return self.call(_relu_at_batch_2_only, self.env[node.args[0]])
        return rule(self, node)

    monkeypatch.setattr(batch_layers._Batcher, "rule", broken)
    model = Stack(Widths).eval()
    with pytest.raises(SNLPRefusal, match=r"verify: .*disagrees with the original on a second batch size"):
        snlp_compile.transform(model, (torch.randn(B, T, C),), iterations=L)


def test_verify_grows_a_decode_steps_caches_with_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step's caches carry size symbols of their own (its attention is kept whole while
    captured), yet verify grows them with the tokens' batch, so the same broken relu is refused at
    the second batch size (before, only the tokens grew, the original failed on caches of the old
    batch, and the call was skipped)."""
    from helpers import step_inputs

    from snlp_compile.models import build_model
    from snlp_compile.models.kv import CachedStep
    from snlp_compile.passes import batch_layers

    rule = batch_layers._Batcher.rule

    def broken(self: batch_layers._Batcher, node: torch.fx.Node) -> object:
        if batch_layers.target_name(node) == "relu":
            return self.call(_relu_at_batch_2_only, self.env[node.args[0]])
        return rule(self, node)

    torch.manual_seed(0)
    model = build_model("nanochat-tiny").eval()
    inputs = step_inputs(model, batch=2, seed=1)
    layers = model.config.n_layer
    snlp_compile.transform(CachedStep(model), inputs, iterations=layers)  # (right: accepted)
    monkeypatch.setattr(batch_layers._Batcher, "rule", broken)
    with pytest.raises(SNLPRefusal, match=r"verify: .*disagrees with the original on a second batch size"):
        snlp_compile.transform(CachedStep(model), inputs, iterations=layers)
