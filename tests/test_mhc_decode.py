"""KV-cached decoding of the mHC reference models (static H "mhc-*", per-token H "mhc-dyn-*"):
their cached step, its transform (HCN: the n x n stream-mixing surrogate, with the new K/V as side
outputs of the solve), the warm init and generate(). Float64 on the CPU, against the sequential
cached step. Fewer Sinkhorn iterations than the reference 20 keep torch.export's capture fast (the
structure does not depend on the count); each test builds its own transforms, so that xdist
workers never repeat one."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from conftest import sequential_trace
from helpers import max_err, prefill_then_decode, reference_model, step_inputs

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.decoding import Decoder, generate
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.models import model_config
from snlp_compile.models.kv import CachedStep, new_cache, write_cache
from snlp_compile.models.mhc import HCPackageGPT

TIGHT = 1e-10
FLAVOURS = ["mhc-tiny", "mhc-dyn-tiny"]
FAST = {"sinkhorn_iters": 2}
STATIC = {"dynamic_shapes": False}  # half the capture time; one test keeps symbolic sizes


_model = partial(reference_model, **FAST)


def _assert_step_equal(got: tuple, want: tuple, tol: float = TIGHT) -> None:
    assert len(got) == 3
    for g, w, what in zip(got, want, ("logits", "new_k", "new_v")):
        assert g.shape == w.shape, what
        assert max_err(g, w) < tol, (what, max_err(g, w))


def _prefilled(model: nn.Module, batch: int = 2, prompt: int = 6, t_max: int = 16) -> tuple:
    """Caches after a sequential prefill of a random prompt, the next position, and the tokens to
    decode after it (t_max - prompt of them)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size, (batch, t_max), generator=g)
    k_cache, v_cache = new_cache(model, batch, t_max)
    with torch.no_grad():
        for _ in prefill_then_decode(model, tokens[:, :prompt], prompt, k_cache, v_cache):
            pass  # the prefill only, written once the generator finishes
    return k_cache, v_cache, torch.tensor(prompt), tokens[:, prompt:]


# -- the sequential cached step --------------------------------------------------------------------


@pytest.mark.parametrize("name", FLAVOURS)
def test_cached_steps_reproduce_the_full_forward(name: str) -> None:
    """Prefill of a prompt, then token-by-token decode over the cache: the full forward's logits."""
    model = _model(name)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(idx)
        k_cache, v_cache = new_cache(model, 2, 16)
        assert k_cache.shape == (cfg.n_layer, 2, cfg.n_kv_head, 16, cfg.n_embd // cfg.n_head)
        decode = prefill_then_decode(model, idx, 9, k_cache, v_cache)
        logits, new_k, new_v = next(decode)  # the prefill, not yet written to the cache
        assert new_k.shape == new_v.shape == (cfg.n_layer, 2, cfg.n_kv_head, 9, cfg.n_embd // cfg.n_head)
        assert k_cache.abs().max() == 0  # the step never writes the cache itself
        steps = [logits, *(step[0] for step in decode)]
    assert max_err(torch.cat(steps, dim=1), full) < TIGHT
    assert k_cache[:, :, :, 14:].abs().max() == 0  # nothing written past the last position
    assert k_cache[:, :, :, :14].abs().amin(dim=-1).gt(0).float().mean() > 0.5


# -- the transformed step: exact mode -------------------------------------------------------------


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_mode_step_equals_sequential_and_reports_hcn(name: str) -> None:
    """K = L, all layers parallel, symbolic sizes: logits and new K/V equal the sequential step's,
    at the example's sizes and at another batch, cache length and position."""
    model = _model(name)
    n_layer = model.config.n_layer
    inputs = step_inputs(model, seed=0)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=n_layer)
    report = fast.snlp_report
    assert report.rewritten, report.refusal
    assert len(report.parallel_layers) == len(report.layers) == n_layer
    assert report.skip is not None and "(HCN) over 4 streams" in report.skip
    assert "H = H(hc_mlp) @ H(hc_attn)" in report.skip
    dynamic = model.config.dynamic
    assert ("dynamic" in report.skip) == dynamic and ("static" in report.skip) != dynamic
    assert "surrogate: stream-mixing skip" in str(report)
    assert not [n for n in report.notes if "vmap" in n], report.notes
    solve = fast.get_submodule(SOLVE_NAME)
    assert solve.skip_kind == "matrix" and solve.stream_layout is not None
    assert solve.use_prefix_products != dynamic  # static H: precomputed transfer products
    assert solve.side_layers is not None  # the new K/V come out of the solve
    # the per-layer cache picks k_cache[i] became one view of the stacked cache
    assert f"aten.slice.Tensor(k_cache, 0, 0, {n_layer})" in fast.code
    assert "torch.stack" not in fast.code and "aten.stack" not in fast.code
    for other in (inputs, step_inputs(model, batch=1, t_max=40, pos=17, seed=1)):
        with torch.no_grad():
            _assert_step_equal(fast(*other), model.forward_cached(*other))


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_mode_with_a_sequential_prefix(name: str) -> None:
    """parallel_layers < L: the first layers run as they are, the rest are solved; still exact."""
    model = _model(name)
    n_layer = model.config.n_layer
    inputs = step_inputs(model, seed=0)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=n_layer, parallel_layers=2, **STATIC)
    report = fast.snlp_report
    assert report.parallel_layers == [f"model.transformer.h.{i}" for i in range(n_layer - 2, n_layer)]
    assert "(HCN)" in (report.skip or "")
    assert fast.get_submodule(SOLVE_NAME).num_layers == 2
    with torch.no_grad():
        _assert_step_equal(fast(*inputs), model.forward_cached(*inputs))


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_mode_warm_init_over_decode_steps(name: str) -> None:
    """init="warm" in exact mode: after a prefill, every decode step (each starting from the
    previous token's trace) gives the sequential logits and K/V; the transformed step's own K/V
    are what gets written to the cache."""
    model = _model(name)
    n_layer = model.config.n_layer
    k_cache, v_cache, pos, tokens = _prefilled(model)
    inputs = (tokens[:, :1], pos, k_cache, v_cache)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=n_layer, init="warm", **STATIC)
    solve = fast.get_submodule(SOLVE_NAME)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            token = tokens[:, t : t + 1]
            got = fast(token, pos, k_cache, v_cache)
            want = model.forward_cached(token, pos, ref_k, ref_v)
            _assert_step_equal(got, want)
            assert solve.warm_trace is not None
            write_cache(k_cache, v_cache, got[1], got[2], pos)
            write_cache(ref_k, ref_v, want[1], want[2], pos)
            pos = pos + 1
    assert max_err(k_cache, ref_k) < TIGHT and max_err(v_cache, ref_v) < TIGHT


@pytest.mark.parametrize("name", FLAVOURS)
def test_k1_warm_starts_from_the_previous_trace(name: str) -> None:
    """K = 1: the first step (no previous trace) starts from h0, so warm and h0 agree; from the
    second step on warm starts from the previous token's trace and differs. Warm-started from the
    exact trace of the very token it solves, one iteration is exact (HCN's matrix correction keeps
    an exact iterate exact)."""
    model = _model(name)
    k_cache, v_cache, pos, tokens = _prefilled(model)
    inputs = (tokens[:, :1], pos, k_cache, v_cache)
    warm = snlp_compile.transform(CachedStep(model), inputs, iterations=1, init="warm", **STATIC)
    cold = snlp_compile.transform(CachedStep(model), inputs, iterations=1, init="h0", **STATIC)
    solve = warm.get_submodule(SOLVE_NAME)
    with torch.no_grad():
        for t in range(3):  # both fed the sequential caches, so only the init differs
            token = tokens[:, t : t + 1]
            w, c = warm(token, pos, k_cache, v_cache), cold(token, pos, k_cache, v_cache)
            ref = model.forward_cached(token, pos, k_cache, v_cache)
            assert max_err(c[0], ref[0]) > 1e-6  # K = 1 < L: an approximation
            if t == 0:
                _assert_step_equal(w, c)
            else:
                assert max_err(w[0], c[0]) > 1e-6
                assert max_err(w[1][1:], c[1][1:]) > 1e-6  # K/V at the corrected inputs differ too
            write_cache(k_cache, v_cache, ref[1], ref[2], pos)
            pos = pos + 1
        token = tokens[:, 3:4]
        step = CachedStep(model)
        exact = sequential_trace(step, list(model.transformer.h), token, pos, k_cache, v_cache)
        assert solve.warm_trace is not None and solve.warm_trace.shape == exact.shape
        solve.warm_trace.copy_(exact)
        _assert_step_equal(
            warm(token, pos, k_cache, v_cache), model.forward_cached(token, pos, k_cache, v_cache)
        )


# -- generate() -------------------------------------------------------------------------------------

N_NEW = 50


@pytest.mark.parametrize("name", FLAVOURS)
def test_exact_mode_greedy_generate_equals_sequential(name: str) -> None:
    """generate() through a Decoder whose decode step is transformed in exact mode: the same
    greedy tokens and the same caches as the sequential model over 50 tokens."""
    model = _model(name, sequence_len=64)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    max_len = 7 + N_NEW
    ref_dec = Decoder(model, batch=1, max_len=max_len)
    ref = generate(ref_dec, prompt, N_NEW)
    dec = Decoder(model, SNLPConfig(iterations=model.config.n_layer), batch=1, max_len=max_len)
    assert "(HCN)" in (dec.decode_step.snlp_report.skip or "")
    tokens = generate(dec, prompt, N_NEW)
    assert tokens.shape == (1, max_len) and torch.equal(tokens[:, :7], prompt)
    assert torch.equal(tokens, ref)
    assert len(set(tokens[0, 7:].tolist())) > 5  # a real sequence, not one token repeated
    assert max_err(dec.k_cache, ref_dec.k_cache) < TIGHT and max_err(dec.v_cache, ref_dec.v_cache) < TIGHT
    assert ref_dec.k_cache[:, :, :, : max_len - 1].abs().amin(dim=-1).gt(0).float().mean() > 0.5


def test_exact_mode_warm_generate_with_solved_prefill() -> None:
    """The prompt (T = 7) through a second transform of the step, the tokens after it warm-started:
    the sequential greedy tokens (per-token H, the flavour whose body depends most on T)."""
    model = _model("mhc-dyn-tiny", sequence_len=64)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    config = SNLPConfig(iterations=model.config.n_layer, init="warm", **STATIC)  # one cache length
    assert torch.equal(generate(model, prompt, 30, config, prefill="solve"), generate(model, prompt, 30))


# -- the hyper-connections package's model ---------------------------------------------------------


@pytest.mark.parametrize("manifold", [False, True], ids=["hc", "mhc"])
def test_hc_package_cached_step(manifold: bool) -> None:
    """HCPackageGPT (streams folded into the batch axis by the package) has the same cached step:
    it reproduces the full forward (the package's mHC mixes in float32, hence its tolerance), and
    the plain HC variant's step transforms to HCN, exact in exact mode."""
    torch.manual_seed(0)
    model = HCPackageGPT(model_config("nanochat-tiny", n_layer=3), manifold=manifold).double().eval()
    tol = 1e-6 if manifold else TIGHT
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        k_cache, v_cache = new_cache(model, 2, 12)
        steps = [step[0] for step in prefill_then_decode(model, idx, 8, k_cache, v_cache)]
    assert max_err(torch.cat(steps, dim=1), full) < tol
    if manifold:
        return  # its transform costs 10 s of capture; tests/test_hyper_connections_pkg.py covers it
    inputs = step_inputs(model, seed=0)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=3, **STATIC)
    assert "(HCN) over 4 streams" in (fast.snlp_report.skip or "")
    with torch.no_grad():
        _assert_step_equal(fast(*inputs), model.forward_cached(*inputs))


def test_frozen_static_mixing_is_the_same_model_and_still_hcn() -> None:
    """freeze_static_mixing (the benchmarks' fair sequential baseline) computes H once: the same
    outputs, no Sinkhorn left in the step, and the transform still solves it exactly with HCN."""
    import copy

    from snlp_compile.models.mhc import FrozenMix, StaticMix, freeze_static_mixing

    model = _model("mhc-tiny")
    frozen = freeze_static_mixing(copy.deepcopy(model))
    assert not any(isinstance(m, StaticMix) for m in frozen.modules())
    assert sum(isinstance(m, FrozenMix) for m in frozen.modules()) == 2 * model.config.n_layer
    inputs = step_inputs(model, seed=0)
    with torch.no_grad():
        _assert_step_equal(frozen.forward_cached(*inputs), model.forward_cached(*inputs), 1e-12)
        idx = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
        assert max_err(frozen(idx), model(idx)) < 1e-12
    fast = snlp_compile.transform(
        CachedStep(frozen), inputs, SNLPConfig(iterations=model.config.n_layer, **STATIC)
    )
    assert "(HCN) over 4 streams" in (fast.snlp_report.skip or "")
    solve = fast.get_submodule(SOLVE_NAME)
    assert solve.skip_kind == "matrix" and solve.use_prefix_products  # static H: precomputed products
    with torch.no_grad():
        _assert_step_equal(fast(*inputs), model.forward_cached(*inputs))
    with pytest.raises(ValueError, match="no StaticMix"):
        freeze_static_mixing(_model("mhc-dyn-tiny"))
