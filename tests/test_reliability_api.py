"""Issue 22 around the API: verification leaves nothing behind, generate() keeps the model's mode,
explain() never raises, bad input gets a one-line error."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from helpers import tiny_llama

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError, SNLPRefusal
from snlp_compile.decoding import Decoder, generate
from snlp_compile.models import build_model
from snlp_compile.solve.handle import SolveHandle


@pytest.fixture(scope="module")
def gpt() -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt-tiny").eval()


def test_verify_is_a_config_field() -> None:
    assert SNLPConfig().verify is True
    assert SNLPConfig(verify=False).verify is False
    with pytest.raises(SNLPConfigError, match=r"SNLPConfig\.verify must be a bool"):
        SNLPConfig(verify="yes")  # type: ignore[arg-type]


def test_verify_runs_and_leaves_no_state(gpt: nn.Module) -> None:
    idx = torch.randint(0, 256, (2, 8))
    fast = snlp_compile.transform(gpt, (idx,), iterations=1, init="warm")
    report = snlp_compile.ExplainReport.of(fast)
    assert report is not None and "verify" in [n for n, _ in report.passes]
    handle = SolveHandle.of(fast)
    assert handle is not None
    assert handle.solve.warm_trace is None and not handle.pending  # no warm trace left behind
    assert handle.iterations == 1 and handle.init == "warm"  # the configured solve, unchanged
    off = snlp_compile.transform(gpt, (idx,), iterations=1, verify=False)
    assert "verify" not in [n for n, _ in snlp_compile.ExplainReport.of(off).passes]  # type: ignore[union-attr]


def test_transform_and_verify_keep_the_model_and_its_mode() -> None:
    model = build_model("gpt-tiny").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.transformer.h[0].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="training mode") as seen:
        snlp_compile.transform(model, (torch.randint(0, 256, (2, 8)),), iterations=4)
    assert any("forward hooks on ['transformer.h.0']" in str(w.message) for w in seen)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_verify_deferred_decode_step_leaves_nothing_pending(gpt: nn.Module) -> None:
    dec = Decoder(gpt, SNLPConfig(iterations=4, deferred_kv=True), batch=1, max_len=16)
    handle = SolveHandle.of(dec.decode_step)
    assert handle is not None and handle.deferred and not handle.pending
    assert handle.solve.deferred_layers is not None  # deferral restored after the check


def test_generate_keeps_the_model_mode(gpt: nn.Module) -> None:
    model = build_model("gpt-tiny")
    model.train()
    model.transformer.h[0].eval()  # a mixed mode comes back as it was too
    prompt = torch.randint(0, 256, (1, 4))
    generate(model, prompt, 3)
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training
    generate(model, prompt, 3, SNLPConfig(iterations=4))
    assert model.training and not model.transformer.h[0].training
    dec = Decoder(model, batch=1, max_len=8)
    assert model.training
    dec.reset()
    dec.prefill(prompt, torch.zeros((), dtype=torch.long))
    assert model.training


def test_explain_never_raises_on_a_transformers_model_with_its_cache() -> None:
    model = tiny_llama(seed=None, num_hidden_layers=4)
    ids = torch.randint(0, 64, (1, 6))
    report = snlp_compile.explain(model, (ids,))
    if report.refusal is not None:  # the cache cannot be captured: the report says what to do
        assert "use_cache" in report.refusal and not report.rewritten
        assert "example_kwargs={'use_cache': False}" in report.refusal
    fixed = snlp_compile.explain(model, (ids,), example_kwargs={"use_cache": False})
    assert fixed.refusal is None and fixed.rewritten, str(fixed)


def test_explain_never_raises_on_bad_input(gpt: nn.Module) -> None:
    idx = torch.randint(0, 256, (1, 8))
    for kwargs in ({"iterations": 0}, {"bogus": 1}, {"example_kwargs": [1, 2]}):
        report = snlp_compile.explain(gpt, (idx,), **kwargs)
        assert report.refusal and not report.rewritten
    report = snlp_compile.explain(gpt, ("not a tensor",))
    assert report.refusal and not report.rewritten


def test_example_kwargs_not_a_dict_is_a_config_error(gpt: nn.Module) -> None:
    idx = torch.randint(0, 256, (1, 8))
    with pytest.raises(SNLPConfigError, match="example_kwargs must be a dict"):
        snlp_compile.transform(gpt, (idx,), example_kwargs=[1, 2])  # type: ignore[arg-type]


class Locked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.blocks[2].lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def test_uncopyable_attribute_is_a_refusal_naming_it() -> None:
    model = Locked()
    x = torch.randn(2, 8)
    with pytest.raises(
        SNLPRefusal, match=r"'blocks\.2\.lock' \(lock\) cannot be deep-copied.*module 'blocks\.2'"
    ):
        snlp_compile.transform(model, (x,))
    report = snlp_compile.explain(model, (x,))
    assert report.refusal is not None and "blocks.2.lock" in report.refusal


def test_a_model_captured_from_a_slice_takes_contiguous_inputs() -> None:
    """torch.export guards the example's strides: captured from ``tokens[:, :-1]`` (a view), the
    rewritten model used to reject every contiguous batch with "'NoneType' object has no attribute
    'size'". The capture now exports contiguous copies of the examples."""
    from snlp_compile import transform
    from snlp_compile.models import build_model

    model = build_model("nanochat-tiny", seed=3)
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))
    fast = transform(model, (tokens[:, :-1],), iterations=4)  # exact: 4 layers
    for x in (tokens[:, :-1].contiguous(), tokens[:, 1:], tokens[:, :-1].clone()):
        with torch.no_grad():
            assert torch.allclose(fast(x), model(x), atol=1e-5)
