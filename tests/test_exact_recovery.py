"""Invariant 1: with K = number of parallel layers the rewrite reproduces the sequential model."""

from __future__ import annotations

import pytest
import torch

import snlp_compile
from snlp_compile.models import build_model

REFERENCE = ["nanochat-tiny", "gpt-tiny"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("name", REFERENCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fraction", ["all", "half"])
def test_reference_models_exact(name: str, dtype: torch.dtype, fraction: str) -> None:
    model = build_model(name).to(dtype)
    n_layer = len(model.transformer.h)
    par = None if fraction == "all" else n_layer // 2
    idx = torch.randint(0, 200, (2, 16))
    fast = snlp_compile.transform(model, (idx,), iterations=par or n_layer, parallel_layers=par)
    with torch.no_grad():
        expected = model(idx)
        got = fast(idx)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # the solve really is in the graph: the per-layer modules are gone from the rewritten module
    assert fast.snlp_solve.num_layers == (par or n_layer)
    assert not any(name.startswith(f"transformer.h.{n_layer - 1}.") for name, _ in fast.named_parameters())


def test_other_shapes_from_one_transform() -> None:
    """Captured with symbolic sizes: other batch sizes and lengths reuse the same rewrite."""
    model = build_model("nanochat-tiny").double()
    fast = snlp_compile.transform(model, (torch.randint(0, 200, (2, 16)),), iterations=4)
    for shape in [(1, 5), (3, 31)]:
        idx = torch.randint(0, 200, shape)
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)


def test_user_model_untouched() -> None:
    model = build_model("nanochat-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = snlp_compile.transform(model, (torch.randint(0, 200, (1, 8)),), iterations=1)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
        for b in fast.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert isinstance(model, torch.nn.Module) and len(model.transformer.h) == 4


def _hf_models() -> list[tuple[str, torch.nn.Module]]:
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, max_position_embeddings=64,
        )
    )  # fmt: skip
    return [("gpt2", gpt2.eval()), ("llama", llama.eval())]


@pytest.mark.parametrize("dtype,fraction", [(torch.float32, "all"), (torch.float64, "half")])
def test_transformers_models_exact(dtype: torch.dtype, fraction: str) -> None:
    for name, model in _hf_models():
        model = model.to(dtype)
        par = None if fraction == "all" else 2
        idx = torch.randint(0, 128, (2, 12))
        kwargs = {"use_cache": False}
        fast = snlp_compile.transform(
            model, (idx,), example_kwargs=kwargs, iterations=par or 4, parallel_layers=par
        )
        with torch.no_grad():
            expected = model(idx, **kwargs).logits
            got = fast(idx, **kwargs).logits
        torch.testing.assert_close(got, expected, **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
        report = fast.snlp_report
        assert report.skip is not None and "identity" in report.skip, name


def test_backout_reader_reads_the_solved_trace() -> None:
    """nanochat-small subtracts a scaled h_{L/2} before the head: that reader must see the solve."""
    model = build_model("nanochat-small").double()
    assert model.config.backout
    idx = torch.randint(0, 500, (2, 12))
    fast = snlp_compile.transform(model, (idx,), iterations=8)
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-10, atol=1e-10)
    assert any("output of layer 3" in r for r in fast.snlp_report.readers)
