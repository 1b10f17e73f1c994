"""Deferred K/V (SNLPConfig.deferred_kv, passes.defer_kv): token t's corrected K/V computed in token
t+1's first evaluation and written by that step into the caches at t's position.

Checked against the plain rewrite (same logits to rounding at any K, caches equal one call later)
and against the sequential model in exact mode; the merged evaluation reads each weight once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import max_err, reference_model, step_inputs

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.errors import SNLPConfigError, SNLPRefusal, SNLPUsageError
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.kernels.layer_ops import batched_linear
from snlp_compile.models.kv import CachedStep, write_cache
from snlp_compile.models.registry import build_model

TIGHT = 1e-10


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return reference_model(name).eval()


def _linears(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is batched_linear for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["nanochat-tiny", "gpt-tiny"])
@pytest.mark.parametrize("exact", [False, True])
def test_deferred_steps_equal_the_plain_rewrite_and_caches_one_call_later(name: str, exact: bool) -> None:
    model = _model(name)
    inputs = step_inputs(model, batch=2, t_max=24, pos=3, seed=1)
    k = model.config.n_layer if exact else 1
    deferred = snlp_compile.transform(CachedStep(model), inputs, iterations=k, deferred_kv=True)
    plain = snlp_compile.transform(CachedStep(model), inputs, iterations=k)
    steps = {"deferred": deferred, "plain": plain, "sequential": CachedStep(model)}
    caches = {key: (inputs[2].clone(), inputs[3].clone()) for key in steps}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in range(3, 12):
            idx = torch.randint(0, model.config.vocab_size, (2, 1), generator=gen)
            pos = torch.tensor(t)
            logits = {}
            for key, step in steps.items():
                k_cache, v_cache = caches[key]
                out = step(idx, pos, k_cache, v_cache)
                write_cache(k_cache, v_cache, out[1], out[2], pos)
                logits[key] = out[0]
            assert max_err(logits["deferred"], logits["plain"]) < TIGHT
            if exact:
                assert max_err(logits["deferred"], logits["sequential"]) < TIGHT
            # every slot before this token's is the corrected one; this token's is provisional
            for mine, theirs in zip(caches["deferred"], caches["plain"]):
                assert max_err(mine[:, :, :, :t], theirs[:, :, :, :t]) < TIGHT
            assert max_err(caches["deferred"][0][:, :, :, t], caches["plain"][0][:, :, :, t]) > 1e-6


def test_merged_evaluation_reads_each_weight_once_and_writes_both_caches() -> None:
    model = _model("nanochat-tiny")
    inputs = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=1, deferred_kv=True)
    solve = fast.get_submodule(SOLVE_NAME)
    merged = solve.deferred_layers
    # the plain step: body linears + a second pass over the k/v weights after the solve
    assert _linears(solve.side_layers) == 1
    # deferred: the body's linears alone, the previous token's k/v rows stacked into q/k/v's GEMV
    assert _linears(merged) == _linears(solve.layers)
    code = merged.code
    assert "torch.stack([rms_norm_1, rms_norm_" in code
    assert code.count("aten.index_put_.default(k_cache") == 0  # (placeholders keep the ext names)
    writes = [n for n in merged.graph.nodes if n.target is torch.ops.aten.index_put_.default]
    assert [w.args[0].name for w in writes] == ["select_14", "select_15"]
    # every read of a cache's contents comes after both writes (type_as reads its dtype only)
    order = {n: i for i, n in enumerate(merged.graph.nodes)}
    for w in writes:
        readers = [u for u in w.args[0].users if u not in writes and u.target != "type_as"]
        assert readers and all(order[u] > order[writes[-1]] for u in readers)
    # the step hands the whole caches to the solve (writes go to them, not to a slice copy)
    assert "aten.slice.Tensor(k_cache" not in fast.code
    assert "position = pos" in fast.code
    assert any(
        n.startswith("K/V deferred") and "fused_attn_c_q_attn_c_k_attn_c_v[64:128]" in n
        for n in fast.snlp_report.notes
    )


@pytest.mark.parametrize("name", ["nanochat-tiny", "gpt-tiny"])
def test_generation_with_deferred_kv_equals_sequential_caches_included(name: str) -> None:
    model = _model(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    cfg = SNLPConfig(iterations=model.config.n_layer, deferred_kv=True)
    n_new = 40
    ref = snlp_compile.Decoder(model, batch=2, max_len=5 + n_new)
    dec = snlp_compile.Decoder(model, cfg, batch=2, max_len=5 + n_new)
    want = snlp_compile.generate(ref, prompt, n_new)
    got = snlp_compile.generate(dec, prompt, n_new)
    assert torch.equal(got, want)
    # generate() flushed the last token's K/V: the caches are the sequential model's, every slot
    assert max_err(dec.k_cache, ref.k_cache) < TIGHT and max_err(dec.v_cache, ref.v_cache) < TIGHT
    assert not dec.decode_step.get_submodule(SOLVE_NAME).deferred_pending
    # again (reset() forgets the pending state of the last sequence), with a warm start
    warm = snlp_compile.Decoder(model, cfg.replace(init="warm"), batch=2, max_len=5 + n_new, prefill="solve")
    assert torch.equal(snlp_compile.generate(warm, prompt, n_new), want)
    assert torch.equal(snlp_compile.generate(warm, prompt, n_new), want)


def test_decoder_skips_provisional_writes_flush_and_prefill_complete_them() -> None:
    """A Decoder's deferred steps leave the newest slot unwritten (the next step writes it before
    reading it); the logits stay the sequential model's, and flush() or a later multi-token
    prefill completes the caches."""
    model = _model("nanochat-tiny")
    cfg = SNLPConfig(iterations=model.config.n_layer, deferred_kv=True)
    ref = snlp_compile.Decoder(model, batch=2, max_len=24)
    dec = snlp_compile.Decoder(model, cfg, batch=2, max_len=24)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, model.config.vocab_size, (2, 4), generator=gen)
    pos = torch.tensor(0)
    for d in (ref, dec):
        d.reset()
    assert max_err(dec.prefill(prompt, pos), ref.prefill(prompt, pos)) < TIGHT
    for t in range(4, 9):
        token = torch.randint(0, model.config.vocab_size, (2,), generator=gen)
        assert max_err(dec.step(token, torch.tensor(t)), ref.step(token, torch.tensor(t))) < TIGHT
        for mine, theirs in zip((dec.k_cache, dec.v_cache), (ref.k_cache, ref.v_cache)):
            assert max_err(mine[:, :, :, :t], theirs[:, :, :, :t]) < TIGHT
            assert not mine[:, :, :, t:].any()  # the newest slot: never written by the Decoder
    chunk = torch.randint(0, model.config.vocab_size, (2, 3), generator=gen)
    got, want = dec.prefill(chunk, torch.tensor(9)), ref.prefill(chunk, torch.tensor(9))
    assert max_err(got, want) < TIGHT  # (prefill flushed slot 8 before its attention read it)
    assert max_err(dec.k_cache, ref.k_cache) < TIGHT and max_err(dec.v_cache, ref.v_cache) < TIGHT


def test_write_cache_one_token_and_several() -> None:
    cache = (torch.zeros(2, 1, 3, 8, 4), torch.zeros(2, 1, 3, 8, 4))
    for t, p in ((1, 5), (3, 2)):
        new_k, new_v = torch.randn(2, 1, 3, t, 4), torch.randn(2, 1, 3, t, 4)
        write_cache(*cache, new_k, new_v, torch.tensor(p))
        assert torch.equal(cache[0][:, :, :, p : p + t], new_k)
        assert torch.equal(cache[1][:, :, :, p : p + t], new_v)
    assert torch.count_nonzero(cache[0][:, :, :, (0, 1, 6, 7)]) == 0


def test_refusals_name_the_reason() -> None:
    with pytest.raises(SNLPConfigError, match="deferred_kv needs stages=1"):
        SNLPConfig(deferred_kv=True, stages=2)
    with pytest.raises(SNLPConfigError, match="deferred_kv must be a bool"):
        SNLPConfig(deferred_kv=1)  # type: ignore[arg-type]
    model = _model("nanochat-tiny")
    idx, pos, k_cache, v_cache = step_inputs(model)
    prefill = (torch.zeros(2, 3, dtype=torch.long), pos, k_cache, v_cache)
    with pytest.raises(SNLPRefusal, match="decode steps of one new token"):
        snlp_compile.transform(CachedStep(model), prefill, iterations=1, deferred_kv=True)

    class NoCacheProtocol(nn.Module):  # layers with side outputs, but no cache to write them to
        def __init__(self) -> None:
            super().__init__()
            self.inner = CachedStep(model)

        def forward(
            self, idx: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor
        ):
            logits, new_k, new_v = self.inner(idx, pos, k, v)
            return logits * scale, new_k, new_v

    with pytest.raises(SNLPRefusal, match=r"forward\(idx, pos, k_cache, v_cache\).*5 inputs"):
        snlp_compile.transform(
            NoCacheProtocol(),
            (idx, pos, k_cache, v_cache, torch.tensor(2.0, dtype=torch.float64)),
            iterations=1,
            deferred_kv=True,
        )

    class ScaledKV(nn.Module):  # the step's K/V are not the layers' own
        def __init__(self) -> None:
            super().__init__()
            self.inner = CachedStep(model)

        def forward(self, idx: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            logits, new_k, new_v = self.inner(idx, pos, k, v)
            return logits, 2 * new_k, new_v

    with pytest.raises(SNLPRefusal, match=r"output 1 .* is not the solve's side output 0"):
        snlp_compile.transform(ScaledKV(), (idx, pos, k_cache, v_cache), iterations=1, deferred_kv=True)


def test_onnx_export_of_a_deferred_step_is_refused(tmp_path) -> None:
    model = _model("nanochat-tiny")
    inputs = step_inputs(model)
    fast = snlp_compile.transform(CachedStep(model), inputs, iterations=1, deferred_kv=True)
    with pytest.raises(SNLPUsageError, match="deferred_kv=False"):
        snlp_compile.export_onnx(fast, inputs, tmp_path / "step.onnx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_and_graph_captured_deferred_steps_equal_the_plain_rewrite() -> None:
    """torch.compile re-inplaces the in-step cache write, and a CUDA graph replays it: the same
    logits and caches as the eager plain rewrite, step after step (fp32, GEMV kernel on if Triton)."""
    torch.manual_seed(0)
    model = build_model("nanochat-tiny", dtype=torch.float32).cuda().eval()
    idx, pos, k_cache, v_cache = (t.cuda() for t in step_inputs(model, batch=1, t_max=32, pos=4, seed=1))
    deferred = snlp_compile.transform(
        CachedStep(model), (idx, pos, k_cache, v_cache), iterations=1, deferred_kv=True
    )
    plain = snlp_compile.transform(CachedStep(model), (idx, pos, k_cache, v_cache), iterations=1)
    compiled = torch.compile(deferred)
    mine, theirs = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    static_idx, static_pos = idx.clone(), pos.clone()

    def step() -> torch.Tensor:
        logits, new_k, new_v = compiled(static_idx, static_pos, *mine)
        write_cache(*mine, new_k, new_v, static_pos)
        return logits

    gen = torch.Generator(device="cuda").manual_seed(3)
    graph, graph_out = None, None
    with torch.no_grad():
        for t in range(4, 20):
            static_idx.copy_(torch.randint(0, model.config.vocab_size, (1, 1), device="cuda", generator=gen))
            static_pos.fill_(t)
            if t < 8:  # eager warm-up of the compiled step (first call: nothing pending; then compiled)
                got = step()
            else:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        graph_out = step()
                    # capture ran nothing: run this step's work for real
                graph.replay()
                got = graph_out
            want, new_k, new_v = plain(static_idx, static_pos, *theirs)
            write_cache(*theirs, new_k, new_v, static_pos)
            assert max_err(got, want) < 1e-4, t
            for a, b in zip(mine, theirs):
                assert max_err(a[:, :, :, :t], b[:, :, :, :t]) < 1e-4, t
