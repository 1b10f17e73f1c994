"""The pipeline as data, the pass manager, the lowering options and the solve's public handle."""

from __future__ import annotations

import pytest
import torch
from fused_reference import fused_reference
from helpers import reference_model, tokens

import snlp_compile
from snlp_compile import LoweringOptions, SNLPConfig, SNLPConfigError, SolveHandle, solve_handle
from snlp_compile.passes.infra import PassManager, PassResult
from snlp_compile.pipeline import pipeline


def test_explain_lists_what_each_pass_did() -> None:
    model = reference_model("gpt-tiny")
    report = snlp_compile.explain(model, (tokens(model),), iterations=2, dynamic_shapes=False)
    assert report.rewritten
    names = [name for name, _ in report.passes]
    assert names == [
        "capture",
        "cse",
        "find_chain",
        "analyse_skip",
        "plan",
        "emit",
        "inline_markers",
        "lower",
        "verify",
    ]
    assert dict(report.passes)["lower"].counts["calls lowered"] > 0  # the layers' linears
    plan = dict(report.passes)["plan"]
    assert plan.changed and plan.counts["stacked inputs"] > 0 and plan.counts["vmap fallbacks"] == 0
    text = str(report)
    assert "  passes:" in text and "find_chain" in text
    # where transform()'s time went: every pass timed, shown on its line
    assert list(report.pass_seconds) == names and all(t >= 0.0 for t in report.pass_seconds.values())
    assert (
        f"({report.pass_seconds['capture']:.2f} s)"
        in text.splitlines()[text.splitlines().index("  passes:") + 1]
    )


def test_the_manager_times_each_pass() -> None:
    """A pass's record holds the wall seconds it took (with the check after it); the benchmarks'
    case notes show the verify pass's share of transform()'s time from them."""
    import time

    from benchmarks.common import transform_note

    def slow_pass(state: list[str]) -> PassResult:
        time.sleep(0.05)
        return PassResult(False)

    def quick_pass(state: list[str]) -> PassResult:
        return PassResult(False)

    slow, quick = PassManager([slow_pass, quick_pass]).run([]).records
    assert slow.seconds >= 0.05 and quick.seconds < slow.seconds
    model = reference_model("gpt-tiny")
    gm = snlp_compile.transform(model, (tokens(model),), dynamic_shapes=False)
    assert transform_note(gm, 2.0).startswith("transform() took 2.0 s (verify ")
    unverified = snlp_compile.transform(model, (tokens(model),), dynamic_shapes=False, verify=False)
    assert transform_note(unverified, 2.0) == "transform() took 2.0 s"


def test_the_pipeline_follows_the_config() -> None:
    plain = [p.__name__ for p in pipeline(SNLPConfig())]
    deferred = [p.__name__ for p in pipeline(SNLPConfig(deferred_kv=True))]
    assert "defer_kv_pass" not in plain and "defer_kv_pass" in deferred
    assert deferred.index("defer_kv_pass") == deferred.index("emit_pass") + 1
    assert plain[-1] == "verify_pass"  # issue 22: the check runs last, unless switched off
    assert "verify_pass" not in [p.__name__ for p in pipeline(SNLPConfig(verify=False))]


def test_a_refusal_names_the_pass_and_is_reported_once() -> None:
    model = reference_model("gpt-tiny")
    report = snlp_compile.explain(model, (tokens(model),), stages=9, dynamic_shapes=False)
    assert not report.rewritten and report.refused_in == "find_chain"
    assert [name for name, _ in report.passes] == ["capture", "cse"]
    assert "SNLPConfig.stages=9" in (report.refusal or "")


def test_the_manager_names_the_pass_an_error_came_from() -> None:
    def fine_pass(state: list[str]) -> PassResult:
        state.append("fine")
        return PassResult(True, {"things": 1})

    def broken_pass(state: list[str]) -> PassResult:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        PassManager([fine_pass, broken_pass]).run([])
    assert any("'broken' pass, after ['fine']" in note for note in getattr(info.value, "__notes__", []))
    run = PassManager([fine_pass]).run([])
    assert [(r.name, r.result.counts) for r in run.records] == [("fine", {"things": 1})]


def test_lowering_options_are_validated_and_read_from_an_environment() -> None:
    with pytest.raises(SNLPConfigError, match=r"LoweringOptions\.pdl"):
        LoweringOptions(pdl="no")  # type: ignore[arg-type]
    with pytest.raises(SNLPConfigError, match=r"SNLPConfig\.lowering"):
        SNLPConfig(lowering="fast")  # type: ignore[arg-type]
    env = LoweringOptions.from_environment({"SNLP_PDL": "0", "SNLP_DECODE_ATTENTION": "all"})
    assert not env.pdl and env.decode_attention and env.decode_attention_in_layers and env.gemv_kernel


def test_last_row_is_an_option_of_the_config() -> None:
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    whole = snlp_compile.transform(
        model, (idx,), lowering=LoweringOptions(last_row=False), dynamic_shapes=False
    )
    last = snlp_compile.transform(
        model, (idx,), lowering=LoweringOptions(last_row=True), dynamic_shapes=False
    )
    assert "snlp_solve[-1]" not in whole.code and "snlp_solve[-1]" in last.code
    with torch.no_grad():
        torch.testing.assert_close(whole(idx), last(idx))


def test_the_solve_handle() -> None:
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    fast = snlp_compile.transform(model, (idx,), iterations=1, dynamic_shapes=False)
    handle = solve_handle(fast)
    assert handle.num_layers == model.config.n_layer and handle.iterations == 1
    assert not handle.deferred and not handle.pending and handle.pending_position is None
    handle.iterations = handle.num_layers  # exact
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx))
    with pytest.raises(ValueError):
        handle.iterations = 0
    with handle.whole_trace(iterations=1):
        assert handle.iterations == 1
    assert handle.iterations == handle.num_layers
    variant = handle.variant(2)
    assert variant.iterations == 2 and handle.iterations == handle.num_layers
    assert SolveHandle.of(model) is None
    with pytest.raises(ValueError, match="holds no SNLP solve"):
        solve_handle(model)


def test_a_fused_plan_builds_only_the_bodies_its_solve_calls() -> None:
    """Wide layers (fused_layers > 1) are evaluated by their two halves: the per-layer batched
    body is not built (it would never be called) and the report counts the halves; the solve at
    K = N/M is the fused function (tests/fused_reference.py) to rounding."""
    model = reference_model("gpt-tiny")
    idx = tokens(model)
    fast = snlp_compile.transform(model, (idx,), iterations=2, fused_layers=2, dynamic_shapes=False)
    solve = solve_handle(fast).solve
    assert solve.layers is None and solve.wide_first is not None and solve.wide_second is not None
    assert dict(fast.snlp_report.passes)["plan"].counts["batched bodies"] == 2
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), fused_reference(model, idx, 2), rtol=1e-10, atol=1e-10)
