"""Wide-layer fusion (SNLPConfig.fused_layers = M, the paper's ChunkB_CxFM; Fused_1xFM at M = N):
groups of M layers evaluated as one wide layer, the N/M wide layers solved in parallel. Fusion
changes the function, so the rewritten models are checked (float64) against a plain reference of
the fused function (tests/fused_reference.py): exact at K >= N/M, the K = 1 solve against the
IDN-corrected iteration over wide layers, a decode step's cache against the fused full forward,
torch.compile and ONNX lowering, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from fused_reference import fused_reference, gpt_wide_layer, llama_fused
from helpers import max_err as _max_err
from helpers import reference_model, tiny_llama, tokens

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError, SNLPRefusal
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, new_cache, write_cache

TIGHT = 1e-10


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return _max_err(a.detach(), b.detach())


def _transform(model: nn.Module, inputs: tuple, **config: object) -> nn.Module:
    return snlp_compile.transform(model, inputs, dynamic_shapes=False, **config)


@pytest.mark.parametrize("name", ["gpt-tiny", "nanochat-tiny"])
@pytest.mark.parametrize("m", [2, 4])
def test_fused_forward_equals_the_reference_at_k_wide_layers(name: str, m: int) -> None:
    """K = N/M (one iteration per wide layer) and K beyond it: the fused sequential function.
    (nanochat with resid_lambdas other than 1: the re-mix is part of each layer's first half.)"""
    model = reference_model(name, scaled=True)
    idx = tokens(model)
    want = fused_reference(model, idx, m)
    for k in (4 // m, 4):
        with torch.no_grad():
            got = _transform(model, (idx,), fused_layers=m, iterations=k)(idx)
        assert max_err(got, want) < TIGHT, (name, m, k)
    # fusion changes the function: the reference is not the unfused model
    assert max_err(model(idx), want) > 1e-2


def test_fused_k1_is_the_identity_corrected_iteration_over_wide_layers() -> None:
    """K = 1 from h0 with 2 wide layers: h_c = x + sum_{i <= c} (W_i(x) - x), the IDN correction
    between wide layers (the paper's chunkwise decomposition), not the sequential function."""
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    got = _transform(model, (idx,), fused_layers=2, iterations=1)(idx)
    with torch.no_grad():
        t = idx.shape[1]
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(t))
        blocks = model.transformer.h
        h = x + (gpt_wide_layer(blocks, x, [0, 1]) - x) + (gpt_wide_layer(blocks, x, [2, 3]) - x)
        want = model.lm_head(model.transformer.ln_f(h))
    assert max_err(got, want) < TIGHT
    assert max_err(got, fused_reference(model, idx, 2)) > 1e-4  # K < N/M: not yet exact


@pytest.mark.parametrize("init", ["batch_fwd", "warm"])
def test_fused_inits_are_exact_at_k_wide_layers(init: str) -> None:
    """The inits seed the N/M wide layers (a warm trace has N/M rows), two calls for "warm"."""
    model = reference_model("nanochat-tiny", scaled=True)
    idx = tokens(model)
    transformed = _transform(model, (idx,), fused_layers=2, iterations=2, init=init)
    want = fused_reference(model, idx, 2)
    with torch.no_grad():
        for _ in range(2):
            assert max_err(transformed(idx), want) < TIGHT
    if init == "warm":
        trace = transformed.get_submodule(SOLVE_NAME).warm_trace
        assert trace is not None and trace.shape[0] == 2


def test_fused_after_sequential_prefix() -> None:
    """parallel_layers < N: the first layers run as written, the last ones fused."""
    model = reference_model("nanochat-tiny", scaled=True)
    idx = tokens(model)
    got = _transform(model, (idx,), parallel_layers=2, fused_layers=2, iterations=1)(idx)
    assert max_err(got, fused_reference(model, idx, 2, first=2)) < TIGHT


def test_fused_transformers_llama() -> None:
    """A Llama-like model as Hugging Face writes it (rotary tables and mask passed to every
    layer): wide layers of 2, exact K, against the fused function built from its modules."""
    model = tiny_llama(num_hidden_layers=4, hidden_size=64, intermediate_size=128, vocab_size=128).double()
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": False}
    fast = snlp_compile.transform(model, (idx,), example_kwargs=kwargs, fused_layers=2, iterations=2)
    with torch.no_grad():
        got = fast(idx, **kwargs).logits
    want = llama_fused(model, idx, 2)
    assert max_err(got, want) < TIGHT
    assert max_err(model(idx, **kwargs).logits.detach(), want) > 1e-3


def test_one_layer_per_wide_layer_is_the_unfused_transform() -> None:
    model = reference_model("nanochat-tiny", scaled=True)
    idx = tokens(model)
    plain = _transform(model, (idx,), iterations=2)
    one = _transform(model, (idx,), iterations=2, fused_layers=1)
    assert one.get_submodule(SOLVE_NAME).wide_first is None
    assert torch.equal(one(idx), plain(idx))


@pytest.mark.parametrize("name", ["gpt-tiny", "nanochat-tiny"])
def test_fused_decode_step_matches_the_fused_full_forward(name: str) -> None:
    """A decode step (models.kv.CachedStep) rewritten with wide layers of 2, exact K = 2, driven
    token by token: each step's logits are the fused full forward's at that position. The cache
    keeps every layer's K/V (a wide layer's M * H_kv heads), computed at its wide layer's input."""
    model = reference_model(name, scaled=True)
    idx = tokens(model, batch=2, t=5)
    k_cache, v_cache = new_cache(model, 2, 8)
    step = _transform(
        CachedStep(model), (idx[:, :1], torch.tensor(0), k_cache, v_cache), fused_layers=2, iterations=2
    )
    want = fused_reference(model, idx, 2)
    with torch.no_grad():
        for t in range(idx.shape[1]):
            pos = torch.tensor(t)
            logits, new_k, new_v = step(idx[:, t : t + 1], pos, k_cache, v_cache)
            assert new_k.shape[0] == model.config.n_layer and new_k.shape[3] == 1
            assert max_err(logits[:, 0], want[:, t]) < TIGHT, t
            write_cache(k_cache, v_cache, new_k, new_v, pos)


def test_fused_generation_prefills_through_the_solve() -> None:
    """generate() with wide layers: the prompt prefilled by the fused solve (prefill="solve"),
    greedy tokens those of the fused function; a sequential prefill (unfused K/V) is refused."""
    model = reference_model("gpt-tiny")
    prompt = tokens(model, batch=1, t=4)
    got = snlp_compile.generate(model, prompt, 3, fused_layers=2, iterations=2, prefill="solve")
    want = prompt
    for _ in range(3):
        want = torch.cat([want, fused_reference(model, want, 2)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, want)
    with pytest.raises(
        SNLPConfigError, match=r"fused_layers=2 changes the model's function: a sequential prefill"
    ):
        snlp_compile.generate(model, prompt, 2, fused_layers=2, iterations=2)


def test_snlp_forward_trains_the_fused_function() -> None:
    """SNLPForward (training through the solve) with wide layers: the fused function at K = N/M,
    and the gradients on the model's own parameters are the reference fused function's."""
    from snlp_compile.train.snlp_forward import SNLPForward

    model = reference_model("nanochat-tiny", scaled=True)
    idx = tokens(model)
    snlp = SNLPForward(model, (idx,), fused_layers=2, iterations=2)
    weights = [
        model.transformer.h[0].attn.c_q.weight,
        model.transformer.h[3].mlp.c_fc.weight,
        model.resid_lambdas,
    ]
    got = snlp(idx)
    grads = torch.autograd.grad(got.square().mean(), weights)
    want = fused_reference(model, idx, 2)
    want_grads = torch.autograd.grad(want.square().mean(), weights)
    assert max_err(got, want) < TIGHT
    for g, w in zip(grads, want_grads):
        assert float(w.abs().max()) > 0 and max_err(g, w) < TIGHT


def test_fused_model_under_torch_compile() -> None:
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    transformed = _transform(model, (idx,), fused_layers=2, iterations=2)
    compiled = torch.compile(transformed, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert max_err(compiled(idx), fused_reference(model, idx, 2)) < TIGHT


def test_fused_model_onnx_parity(tmp_path: Path) -> None:
    """ONNX export of a fused model (float32): ONNX Runtime agrees with the PyTorch module and
    with the reference fused function."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from snlp_compile.export.onnx_export import export_onnx
    from snlp_compile.export.ort import make_session

    model = build_model("gpt-tiny")
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, (idx,), tmp_path / "fused.onnx", fused_layers=2, iterations=2)
    session = make_session(result.path)
    probe = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    (out,) = session.run(None, {"idx": probe.numpy()})
    want = fused_reference(model, probe, 2).detach()
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"fused_layers": 0}, r"fused_layers must be an int >= 1"),
        ({"fused_layers": True}, r"fused_layers must be an int >= 1"),
        ({"fused_layers": 2, "stages": 2}, r"fused_layers=2 needs stages=1"),
        ({"fused_layers": 2, "deferred_kv": True}, r"fused_layers=2 needs stages=1 and deferred_kv=False"),
    ],
)
def test_bad_fused_layers_are_config_errors(fields: dict, match: str) -> None:
    with pytest.raises(SNLPConfigError, match=match):
        SNLPConfig(**fields)


def test_layers_not_divisible_into_wide_layers_are_refused() -> None:
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    with pytest.raises(SNLPRefusal, match=r"fused_layers=3 must divide the 4 parallel layers") as err:
        _transform(model, (idx,), fused_layers=3)
    assert err.value.module_path == "transformer.h.3"


def test_a_read_inside_a_wide_layer_is_refused() -> None:
    """nanochat's backout reads layer 1's output: with wide layers of 2 it is the first wide
    layer's (read from the trace), with wide layers of 4 it does not exist."""
    model = reference_model("nanochat-tiny", backout=True)
    idx = tokens(model)
    got = _transform(model, (idx,), fused_layers=2, iterations=2)(idx)
    assert max_err(got, fused_reference(model, idx, 2)) < TIGHT
    with pytest.raises(
        SNLPRefusal, match=r"reads the output of 'transformer\.h\.1', which lies inside a wide layer"
    ):
        _transform(model, (idx,), fused_layers=4)


def test_hyper_connection_streams_are_refused() -> None:
    model = reference_model("mhc-tiny", sinkhorn_iters=4)
    idx = tokens(model)
    with pytest.raises(SNLPRefusal, match=r"hyper-connection streams .* are not fused"):
        _transform(model, (idx,), fused_layers=2)


class _ParallelBlock(nn.Module):
    """GPT-J style: attention-like and MLP branches both read the block's input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.a = nn.Linear(d, d)
        self.m = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return x + torch.tanh(self.a(y)) + torch.relu(self.m(y))


class _OneBranch(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.m = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.m(x))


class _Stack(nn.Module):
    def __init__(self, block: type[nn.Module], d: int = 8, n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("block", [_ParallelBlock, _OneBranch])
def test_layers_without_two_residual_halves_are_refused(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _Stack(block).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(SNLPRefusal, match=r"fused_layers needs layers made of two residual halves") as err:
        _transform(model, (x,), fused_layers=2)
    assert err.value.module_path == "layers.3" and err.value.node
    assert max_err(_transform(model, (x,), iterations=4)(x), model(x)) < TIGHT  # unfused: fine


def test_cli_inspect_with_fused_layers(capsys: pytest.CaptureFixture[str]) -> None:
    from snlp_compile.cli import main

    code = main(["inspect", "--model", "gpt-tiny", "--seq", "8", "--fused-layers", "2", "--no-picture"])
    out = capsys.readouterr().out
    assert code == 0 and "fused_layers=2" in out and "wide layers of 2" in out
    assert main(["inspect", "--model", "gpt-tiny", "--seq", "8", "--fused-layers", "3", "--no-picture"]) == 1
    assert "fused_layers=3 must divide the 4 parallel layers" in capsys.readouterr().out
