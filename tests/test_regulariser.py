"""The SNLP-aware regulariser: its K=1 trace is the compiler's, its gradients reach the model's
parameters, its options do what they say, and it refuses what transform() refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import sequential_trace
from helpers import reference_model, tokens
from torch import nn

from snlp_compile import SNLPConfigError, SNLPRefusal, solve_trace, transform
from snlp_compile.models import MODEL_NAMES
from snlp_compile.train import RegulariserConfig, SNLPRegulariser


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    model = reference_model(name)
    return model, tokens(model, 2, 12, seed=3)


def _rel_err(h_hat: torch.Tensor, h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (torch.linalg.vector_norm(h_hat - h, dim=-1) / (torch.linalg.vector_norm(h, dim=-1) + eps)).mean()


HCN = "mhc-tiny" if "mhc-tiny" in MODEL_NAMES else None

# the project's first recipe (every layer counted, averaged, target not detached); the tests of the
# trace machinery use it, test_paper_recipe_defaults the paper's defaults
OLD = {"every": 1, "reduction": "mean", "stop_gradient": False}
ALL = RegulariserConfig(suffix_fractions=(1.0,), **OLD)  # one suffix of every parallelisable layer


@pytest.fixture(scope="module")
def nano() -> dict:
    """nanochat-tiny (4 layers, scaled IDN) with suffix sizes 4 and 2, and the compiler's transforms.
    Tests that use it must not change its weights; they zero its gradients first."""
    model, idx = _model("nanochat-tiny")
    reg = SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_sizes=(4, 2), **OLD))
    fast = {n: transform(model, (idx,), parallel_layers=n) for n in (4, 2)}
    return {"model": model, "idx": idx, "reg": reg, "fast": fast}


@pytest.fixture(scope="module")
def gpt() -> dict:
    model, idx = _model("gpt-tiny")  # IDN, tied head
    return {
        "model": model,
        "idx": idx,
        "reg": SNLPRegulariser(model, (idx,), ALL),
        "fast": transform(model, (idx,)),
    }


def _check_traces(reg: SNLPRegulariser, fast: dict, idx: torch.Tensor) -> None:
    """Per suffix size N: the K=1 trace is solve_trace(transform(...), iterations=1), the
    sequential trace is the transformed model's exact (K = N) trace."""
    traces = reg.traces(idx)
    assert set(traces) == set(fast)
    for n, (h_hat, h_seq) in traces.items():
        torch.testing.assert_close(h_hat, solve_trace(fast[n], idx, iterations=1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_seq, solve_trace(fast[n], idx, iterations=n), rtol=1e-10, atol=1e-10)
        assert (h_hat - h_seq).abs().max() > 1e-3  # K=1 is not exact: the term has something to measure


def test_k1_trace_is_the_compilers_scaled_idn(nano: dict) -> None:
    _check_traces(nano["reg"], nano["fast"], nano["idx"])


def test_k1_trace_is_the_compilers_idn(gpt: dict) -> None:
    _check_traces(gpt["reg"], {4: gpt["fast"]}, gpt["idx"])


@pytest.mark.skipif(HCN is None, reason="the mHC reference models (issue 3) are not in the registry")
def test_k1_trace_is_the_compilers_hcn() -> None:
    """HCN with static H: the compiler folds H into prefix products, the regulariser scans the live H."""
    model, idx = _model(HCN)
    reg = SNLPRegulariser(model, (idx,), ALL)
    assert reg.chain.skip.kind == "matrix"
    _check_traces(reg, {4: transform(model, (idx,))}, idx)
    model.zero_grad(set_to_none=True)
    reg(idx).loss.backward()
    assert all(
        p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("transformer.h.3.")
    )


def test_other_batch_shapes_after_capture(nano: dict) -> None:
    other = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    h_hat, _ = nano["reg"].traces(other)[4]
    torch.testing.assert_close(
        h_hat, solve_trace(nano["fast"][4], other, iterations=1), rtol=1e-12, atol=1e-12
    )


def test_loss_is_mean_relative_error_summed_over_suffixes(nano: dict) -> None:
    reg, idx = nano["reg"], nano["idx"]
    with torch.no_grad():
        out = reg(idx)
        traces = reg.traces(idx)
    expected = {n: _rel_err(h_hat, h) for n, (h_hat, h) in traces.items()}
    for n in (4, 2):
        torch.testing.assert_close(out.errors[n], expected[n])
    torch.testing.assert_close(out.loss, expected[4] + expected[2])


def test_every_s_th_layer_counts_back_from_the_last(nano: dict) -> None:
    model, idx = nano["model"], nano["idx"]
    reg = SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_fractions=(1.0,), **{**OLD, "every": 2}))
    with torch.no_grad():
        loss = reg(idx).loss
    h_hat, h = nano["reg"].traces(idx)[4]
    torch.testing.assert_close(loss, _rel_err(h_hat[[1, 3]], h[[1, 3]]).detach())


def test_gradient_matches_finite_differences(nano: dict) -> None:
    """d loss / d W along a random direction, autograd against central differences (float64)."""
    model, idx, reg = nano["model"], nano["idx"], nano["reg"]
    model.zero_grad(set_to_none=True)
    w = model.get_parameter("transformer.h.1.attn.c_q.weight")
    direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    reg(idx).loss.backward()
    analytic = (w.grad * direction).sum()
    eps = 1e-6
    saved = w.detach().clone()
    with torch.no_grad():
        w.copy_(saved + eps * direction)
        up = reg(idx).loss
        w.copy_(saved - eps * direction)
        down = reg(idx).loss
        w.copy_(saved)
    torch.testing.assert_close(analytic, (up - down) / (2 * eps), rtol=1e-5, atol=1e-9)


def test_stop_gradient_detaches_the_target(nano: dict) -> None:
    model, idx = nano["model"], nano["idx"]
    grads = {}
    for stop, reg in (
        (False, nano["reg"]),
        (
            True,
            SNLPRegulariser(
                model, (idx,), RegulariserConfig(suffix_sizes=(4, 2), **{**OLD, "stop_gradient": True})
            ),
        ),
    ):
        model.zero_grad(set_to_none=True)
        reg(idx).loss.backward()
        grads[stop] = model.transformer.h[2].mlp.c_fc.weight.grad.clone()
    # by hand: the same errors with the targets detached
    model.zero_grad(set_to_none=True)
    sum(_rel_err(h_hat, h.detach()) for h_hat, h in nano["reg"].traces(idx).values()).backward()
    torch.testing.assert_close(
        grads[True], model.transformer.h[2].mlp.c_fc.weight.grad, rtol=1e-10, atol=1e-14
    )
    assert (grads[True] - grads[False]).abs().max() > 1e-6


def test_targets_output_and_gradients_on_nanochat_with_backout() -> None:
    """nanochat-small (8 layers, backout reader): the targets are the layer outputs of the model's
    own forward, the output is its output, gradients reach every layer parameter, and a change to
    the weights after construction is seen (no stale copies)."""
    model, idx = _model("nanochat-small")
    reg = SNLPRegulariser(model, (idx,), ALL)
    ((n, (_, h_seq)),) = reg.traces(idx).items()
    assert n == model.config.n_layer
    torch.testing.assert_close(
        h_seq, sequential_trace(model, list(model.transformer.h), idx), rtol=0, atol=1e-12
    )
    out = reg(idx)
    with torch.no_grad():
        torch.testing.assert_close(out.output, model(idx), rtol=0, atol=1e-12)
    out.loss.backward()
    layer_params = {n: p for n, p in model.named_parameters() if n.startswith("transformer.h.")}
    assert len(layer_params) == 6 * model.config.n_layer
    for name, p in layer_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name in ("resid_lambdas", "x0_lambdas", "transformer.wte.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.lm_head.weight.grad is None  # the head does not touch the trace
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.mul_(3.0)
        _, h_new = reg.traces(idx)[n]
        assert abs(reg(idx).loss - out.loss) > 1e-4
    torch.testing.assert_close(
        h_new, sequential_trace(model, list(model.transformer.h), idx), rtol=0, atol=1e-12
    )


def test_ce_gradient_through_the_regulariser_is_the_models(gpt: dict) -> None:
    """Training on reg(x).output is training the model: same CE gradients as model(x)."""
    model, idx, reg = gpt["model"], gpt["idx"], gpt["reg"]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(reg(idx).output.flatten(0, 1), idx.flatten()).backward()
    via_reg = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    direct = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert via_reg.keys() == direct.keys()
    for n in direct:
        torch.testing.assert_close(via_reg[n], direct[n], rtol=1e-10, atol=1e-12)


def test_hugging_face_gpt2_with_keyword_inputs() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    idx = torch.randint(0, 64, (2, 10))
    kw = {"use_cache": False}
    reg = SNLPRegulariser(model, (idx,), ALL, example_kwargs=kw)
    out = reg(idx, **kw)
    with torch.no_grad():
        torch.testing.assert_close(out.output.logits, model(idx, **kw).logits, rtol=0, atol=1e-10)
    fast = transform(model, (idx,), example_kwargs=kw)
    h_hat, _ = reg.traces(idx, **kw)[3]
    torch.testing.assert_close(h_hat, solve_trace(fast, idx, False, iterations=1), rtol=1e-10, atol=1e-10)
    out.loss.backward()
    assert model.transformer.h[1].attn.c_attn.weight.grad.abs().sum() > 0


def test_paper_recipe_defaults(nano: dict) -> None:
    """RegulariserConfig() is the paper's recipe: lambda 0.0625 summed over every 3rd layer (and the
    last) of the last 1/4, 1/2, 3/4 of the layers, target detached, ramp left to train() (20%)."""
    cfg = RegulariserConfig()
    assert (cfg.weight, cfg.reduction, cfg.every, cfg.stop_gradient, cfg.ramp_steps, cfg.iterations) == (
        0.0625,
        "sum",
        3,
        True,
        None,
        1,
    )
    assert cfg.suffix_sizes_for(32) == (8, 16, 24) and cfg.suffix_sizes_for(16) == (4, 8, 12)
    assert cfg.suffix_sizes_for(4) == (2, 3)  # rounded, at least 2, duplicates dropped
    assert RegulariserConfig(iterations=2).suffix_sizes_for(4) == (3,)  # more than K: not exact
    assert RegulariserConfig(suffix_fractions=(1.0,)).suffix_sizes_for(16) == (16,)
    assert RegulariserConfig(suffix_fractions=None).suffix_sizes_for(16) == (16,)
    assert RegulariserConfig(suffix_sizes=(5, 3)).suffix_sizes_for(16) == (5, 3)  # explicit wins
    assert cfg.weight_at(0) == 0.0625  # no ramp unless train() resolves one
    model, idx = nano["model"], nano["idx"]
    reg = SNLPRegulariser(model, (idx,))
    assert reg.suffix_sizes == (2, 3)
    traces = nano["reg"].traces(idx)  # (4, 2) suffixes: the 3-layer suffix is checked by hand below
    h_hat, h = traces[2]
    with torch.no_grad():
        out = reg(idx)
        (h3_hat, h3) = reg.traces(idx)[3]
    torch.testing.assert_close(out.errors[2], _rel_err(h_hat[[1]], h[[1]]))  # every 3rd from the last: j=1
    torch.testing.assert_close(out.errors[3], _rel_err(h3_hat[[2]], h3[[2]]))  # j=2 (j=-1 does not exist)
    # sum over counted layers: with every layer counted, the layer count times the mean
    summed = SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_sizes=(4,), every=1))
    with torch.no_grad():
        total = summed(idx).loss
    torch.testing.assert_close(total, 4 * _rel_err(*traces[4]))


def test_ramp() -> None:
    cfg = RegulariserConfig(weight=2.0, ramp_steps=4)
    assert [cfg.weight_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert RegulariserConfig(weight=0.3).weight_at(0) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suffix_sizes": (1,)}, "suffix_sizes must be None or non-empty ints >= 2"),
        ({"suffix_sizes": ()}, "suffix_sizes must be None or non-empty ints >= 2"),
        ({"suffix_sizes": (3, 3)}, "duplicates"),
        ({"every": 0}, "every must be an int >= 1"),
        ({"weight": -1.0}, "weight must be a number >= 0"),
        ({"ramp_steps": -2}, "ramp_steps must be None or an int >= 0"),
        ({"reduction": "max"}, "reduction must be 'sum' or 'mean'"),
        ({"suffix_fractions": (0.0,)}, r"suffix_fractions must be None or non-empty numbers in \(0, 1\]"),
        ({"suffix_fractions": (1.5,)}, r"suffix_fractions must be None or non-empty numbers in \(0, 1\]"),
        ({"init": "warm"}, "init must be 'h0' or 'batch_fwd'"),
    ],
)
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(SNLPConfigError, match=message):
        RegulariserConfig(**kwargs)


def test_suffix_larger_than_the_chain() -> None:
    model, idx = _model("nanochat-tiny")
    with pytest.raises(SNLPConfigError, match=r"suffix_sizes \[5\] exceed the 4 layers of 'transformer.h'"):
        SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_sizes=(4, 5)))


class _PostNorm(nn.Module):
    """Post-norm residual layers: no skip path that survives the norm, so no SNLP surrogate."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.norms = nn.ModuleList([nn.LayerNorm(8) for _ in range(3)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for lin, ln in zip(self.layers, self.norms):
            x = ln(x + lin(x))
        return x


def test_refuses_what_transform_refuses() -> None:
    model, idx = _PostNorm(), torch.randint(0, 16, (2, 5))
    with pytest.raises(SNLPRefusal) as compiler:
        transform(model, (idx,))
    with pytest.raises(SNLPRefusal) as regulariser:
        SNLPRegulariser(model, (idx,))
    assert str(regulariser.value) == str(compiler.value)
    assert "no residual skip path" in str(regulariser.value) or "no layer stack" in str(regulariser.value)


def test_k2_trace_is_the_compilers(nano: dict) -> None:
    """iterations=2: the trace is solve_trace(..., iterations=2), and the term shrinks against K=1."""
    model, idx = nano["model"], nano["idx"]
    reg2 = SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_sizes=(4,), iterations=2, **OLD))
    (h_hat, h_seq), (h_hat1, _) = reg2.traces(idx)[4], nano["reg"].traces(idx)[4]
    torch.testing.assert_close(h_hat, solve_trace(nano["fast"][4], idx, iterations=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_hat[:2], h_seq[:2], rtol=1e-10, atol=1e-10)  # first K layers exact
    assert _rel_err(h_hat, h_seq) < _rel_err(h_hat1, h_seq)
    with pytest.raises(SNLPConfigError, match="already exact"):
        SNLPRegulariser(model, (idx,), RegulariserConfig(suffix_sizes=(2,), iterations=2))
    with pytest.raises(SNLPConfigError, match="iterations must be an int >= 1"):
        RegulariserConfig(iterations=0)
