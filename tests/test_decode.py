"""KV-cached decode steps: the reference models' step, its transform (stacked cache as one slice,
new K/V as side outputs of the solve at the corrected inputs), side outputs in general, and the
warm init. Everything in float64 on the CPU, against the sequential model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import sequential_trace
from helpers import max_err, prefill_then_decode, reference_model, step_inputs

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError, SNLPRefusal
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.kernels.layer_ops import batched_linear
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, attention_bias, new_cache

TIGHT = 1e-10


_model = reference_model


@pytest.mark.parametrize("name", ["nanochat-tiny", "gpt-tiny"])
def test_cached_steps_reproduce_the_full_forward(name: str) -> None:
    """Prefill then token-by-token decode over the cache gives the full forward's logits."""
    model = _model(name)
    idx = torch.randint(0, model.config.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(idx)
        k_cache, v_cache = new_cache(model, 2, 16)
        decode = prefill_then_decode(model, idx, 9, k_cache, v_cache)
        logits, new_k, _ = next(decode)  # the prefill
        assert new_k.shape == (model.config.n_layer, 2, k_cache.shape[2], 9, k_cache.shape[4])
        steps = [logits, *(step[0] for step in decode)]
    assert max_err(torch.cat(steps, dim=1), full) < TIGHT
    assert k_cache[:, :, :, 14:].abs().max() == 0  # nothing written past the last position


def test_attention_bias_masks_unwritten_slots_and_the_future() -> None:
    bias = attention_bias(torch.tensor(3), 2, 5)
    allowed = bias == 0
    assert bias.shape == (2, 7)
    assert allowed[:, :3].all() and not allowed[:, 3:5].any()  # cache: slots < pos only
    assert allowed[0, 5] and not allowed[0, 6] and allowed[1, 5:].all()  # causal among new tokens


@pytest.mark.parametrize("name", ["nanochat-tiny", "gpt-tiny"])
def test_exact_mode_step_equals_sequential_step(name: str) -> None:
    model = _model(name)
    inputs = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=model.config.n_layer)
    with torch.no_grad():
        ref = model.forward_cached(*inputs)
        out = fast(*inputs)
    assert len(out) == 3
    for got, want in zip(out, ref):
        assert got.shape == want.shape
        assert max_err(got, want) < TIGHT


def test_stacked_cache_is_passed_as_one_slice_and_kv_leave_the_solve_uncopied() -> None:
    model = _model("nanochat-tiny")
    inputs = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=1)
    code = fast.code
    # the per-layer picks k_cache[i] became one view of the stacked cache, no torch.stack copy
    assert "torch.stack" not in code and "aten.stack" not in code
    assert "aten.slice.Tensor(k_cache, 0, 0, 4)" in code and "aten.slice.Tensor(v_cache, 0, 0, 4)" in code
    solve = fast.get_submodule(SOLVE_NAME)
    assert solve.side_layers is not None
    report = fast.snlp_report
    assert any(name.startswith("select") and mode == "runtime" for name, mode, _ in report.externals)
    # the solve's side outputs are returned as the step's new K/V directly
    out_node = next(n for n in fast.graph.nodes if n.op == "output")
    returned = [a.name for a in out_node.all_input_nodes]
    assert sum(name.endswith("_layers") for name in returned) == 2


def test_kv_are_consistent_with_the_corrected_inputs() -> None:
    """K=1 < L: the new K/V of layer j are what layer j computes from its corrected input, the
    solved trace's h_{j-1} (h_in for j = 0), not from the input of the last evaluation."""
    model = _model("gpt-tiny")
    idx, pos, k_cache, v_cache = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), (idx, pos, k_cache, v_cache), iterations=1)
    with torch.no_grad():
        _, new_k, new_v = fast(idx, pos, k_cache, v_cache)
        trace = snlp_compile.solve_trace(fast, idx, pos, k_cache, v_cache)
        blocks = model.transformer.h
        h_in = model.transformer.wte(idx) + model.transformer.wpe(pos + torch.arange(1))
        bias = attention_bias(pos, 1, k_cache.shape[3])
        seq_k = model.forward_cached(idx, pos, k_cache, v_cache)[1]
        for j, block in enumerate(blocks):
            u = h_in if j == 0 else trace[j - 1]
            _, k_ref, v_ref = block(u, (k_cache[j], v_cache[j], bias))
            assert max_err(new_k[j], k_ref) < TIGHT
            assert max_err(new_v[j], v_ref) < TIGHT
    # and, K=1 being inexact here, they differ from the sequential model's beyond layer 0
    assert max_err(new_k[0], seq_k[0]) < TIGHT
    assert max_err(new_k[1:], seq_k[1:]) > 1e-6


# -- side outputs in general ----------------------------------------------------------------------
class TapBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.mlp(self.norm(x))
        return x + inner, inner


class TapStack(nn.Module):
    """Every layer hands its branch output to the model, which stacks them (like a step's K/V)."""

    def __init__(self, d: int = 16, n: int = 4, tap_only: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TapBlock(d) for _ in range(n))
        self.tap_only = tap_only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.layers):
            x, inner = layer(x)
            if self.tap_only is None or i == self.tap_only:
                taps.append(inner)
        return x, torch.stack(taps)


def test_side_outputs_exact_in_exact_mode_and_at_corrected_inputs() -> None:
    model = TapStack().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    exact = snlp_compile.transform(model, (x,), iterations=4)
    approx = snlp_compile.transform(model, (x,), iterations=1)
    with torch.no_grad():
        ref_out, ref_taps = model(x)
        out, taps = exact(x)
        assert max_err(out, ref_out) < TIGHT and max_err(taps, ref_taps) < TIGHT
        _, taps1 = approx(x)
        trace = snlp_compile.solve_trace(approx, x)
        for j, layer in enumerate(model.layers):
            u = x if j == 0 else trace[j - 1]
            assert max_err(taps1[j], layer(u)[1]) < TIGHT


def test_irregular_side_output_refused() -> None:
    """Only one layer hands out its branch value: the layers differ in what they hand out."""
    model = TapStack(tap_only=1).double().eval()
    with pytest.raises(SNLPRefusal, match="intermediate value"):
        snlp_compile.transform(model, (torch.randn(2, 5, 16, dtype=torch.float64),), iterations=2)


# -- warm init --------------------------------------------------------------------------------------
def test_warm_is_a_valid_init_and_bad_inits_name_it() -> None:
    assert SNLPConfig(init="warm").init == "warm"
    with pytest.raises(SNLPConfigError, match="'warm'"):
        SNLPConfig(init="previous")


def test_warm_init_starts_from_the_previous_trace() -> None:
    """Warm-started from the exact trace of this very token, one iteration is exact; from h0 it is
    not. The first call (no previous trace) starts from h0, and each call keeps its trace."""
    model = _model("nanochat-tiny")
    inputs = step_inputs(model)
    warm = snlp_compile.transform(CachedStep(model), inputs, iterations=1, init="warm")
    cold = snlp_compile.transform(CachedStep(model), inputs, iterations=1, init="h0")
    solve = warm.get_submodule(SOLVE_NAME)
    exact_trace = sequential_trace(CachedStep(model), list(model.transformer.h), *inputs)
    with torch.no_grad():
        ref = model.forward_cached(*inputs)
        assert solve.warm_trace is None
        first = warm(*inputs)  # no previous trace: h0
        h0_out = cold(*inputs)
        assert max_err(first[0], h0_out[0]) < TIGHT
        assert max_err(h0_out[0], ref[0]) > 1e-6
        assert solve.warm_trace is not None and solve.warm_trace.shape == exact_trace.shape
        solve.warm_trace.copy_(exact_trace)
        out = warm(*inputs)
        for got, want in zip(out, ref):
            assert max_err(got, want) < TIGHT
        assert max_err(solve.warm_trace, exact_trace) < TIGHT  # kept in place for the next call
        solve.reset_warm()
        assert solve.warm_trace is None
        assert max_err(warm(*inputs)[0], h0_out[0]) < TIGHT


# -- emitted forms the GPU benchmarks rely on ------------------------------------------------------
def test_shared_input_linears_read_one_concatenated_weight() -> None:
    model = _model("nanochat-tiny")
    inputs = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=model.config.n_layer)
    solve = fast.get_submodule(SOLVE_NAME)
    assert "fused_attn_c_q_attn_c_k_attn_c_v" in solve.ext_names  # main body: q, k, v in one
    assert "fused_attn_c_k_attn_c_v" in solve.ext_names  # side outputs: k, v in one
    fused = solve.stacked_fused_attn_c_q_attn_c_k_attn_c_v
    parts = [getattr(solve, f"stacked_attn_c_{w}_weight") for w in "qkv"]
    assert torch.equal(fused, torch.cat(parts, dim=1))
    assert any("fused_attn_c_q_attn_c_k_attn_c_v" in note for note in fast.snlp_report.notes)
    linears = [n for n in solve.layers.graph.nodes if n.target is batched_linear]
    assert len(linears) == 4  # qkv, c_proj, c_fc, mlp c_proj
    with torch.no_grad():
        for got, want in zip(fast(*inputs), model.forward_cached(*inputs)):
            assert max_err(got, want) < TIGHT


def test_static_scaled_skip_is_corrected_by_one_cumsum() -> None:
    """nanochat's per-layer resid_lambdas are folded at transform time: the correction becomes
    P_j (h_in + cumsum(d_i / P_i)), equal to the elementwise scan it replaces."""
    model = build_model("nanochat-small", dtype=torch.float64)
    with torch.no_grad():
        model.resid_lambdas.uniform_(0.6, 1.4)
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    fast = snlp_compile.transform(model, (idx,), iterations=2)
    solve = fast.get_submodule(SOLVE_NAME)
    assert solve.static_scalar is not None
    assert torch.allclose(solve.static_scalar, model.resid_lambdas.detach())
    with torch.no_grad():
        fast_out = fast(idx)
        saved, solve.static_scalar = solve.static_scalar, None  # the general scan
        scan_out = fast(idx)
        solve.static_scalar = saved
    assert max_err(fast_out, scan_out) < TIGHT
    assert max_err(fast_out, model(idx)) > 1e-6  # K=2 < 8 layers: a real approximation


def test_fused_weights_are_held_once() -> None:
    """q, k and v stay readable under their own names but share the fused weight's storage."""
    model = _model("nanochat-tiny")
    fast = snlp_compile.transform(CachedStep(model), step_inputs(model), iterations=1)
    solve = fast.get_submodule(SOLVE_NAME)
    fused = solve.stacked_fused_attn_c_q_attn_c_k_attn_c_v
    for w in "qkv":
        part = getattr(solve, f"stacked_attn_c_{w}_weight")
        assert part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in solve.buffers()}
    held = sum(storages.values())
    views = sum(b.numel() * b.element_size() for b in solve.buffers())
    assert held < views  # without the aliasing every buffer had its own storage


def test_moving_a_rewritten_step_moves_its_factory_ops() -> None:
    """torch.export bakes the capture device into factory ops (the attention mask's arange/ones);
    .to(device) of the rewritten step points them at the new device too. The meta device stands in
    for a GPU here (a mixed-device graph fails on meta exactly as it does on CUDA)."""
    model = build_model("nanochat-tiny", dtype=torch.float32)
    inputs = step_inputs(model, batch=1)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=1)
    with torch.no_grad():
        ref = model.forward_cached(*inputs)

    def factory_devices(gm: torch.nn.Module) -> set[str]:
        return {
            torch.device(n.kwargs["device"]).type
            for m in gm.modules()
            if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes
            if n.op == "call_function" and isinstance(n.kwargs.get("device"), torch.device)
        }

    assert factory_devices(fast) == {"cpu"}
    model.to("meta")  # the rewritten step shares weights with the model: they move first
    fast = fast.to("meta")
    assert factory_devices(fast) == {"meta"}
    with torch.no_grad():
        out = fast(*(t.to("meta") for t in inputs))
    assert [o.device.type for o in out] == ["meta"] * 3
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert copy.deepcopy(fast).meta["snlp_graph_device"] == torch.device("meta")
