"""Issue 22, the torch.compile backend "snlp": weights edited after compiling (``.data.mul_``,
``load_state_dict``) are used, not stale stacked copies; transformers' Llama compiles (its
rotary-embedding externals used to become the invalid identifier ``0_model_rotary_emb_...``)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
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
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    before = len(backend_records())
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = torch.compile(model, backend="snlp", options={"iterations": 3})(ids, use_cache=False).logits
    _close(got, want)
    records = backend_records()[before:]
    assert records and all(r.rewritten for r in records), [r.reason for r in records]
