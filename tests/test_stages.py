"""Stages (SNLPConfig.stages, formerly chunks): S consecutive stages of layers solved one after
another, each layer-parallel from the previous stage's last output. Exactness (K >= the largest
stage; S = N at K = 1 is the sequential model), the per-stage static corrections (scaled IDN,
HCN static H), a decode step's K/V, op counts, export paths and refusals. float64 on the CPU;
static-shape captures where the shapes do not matter, which keeps the transforms fast."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import MATMUL_OPS, sequential_trace
from helpers import max_err, reference_model, rel_err, tokens

import snlp_compile
from snlp_compile import SNLPConfig, SNLPConfigError, SNLPRefusal
from snlp_compile.config import stage_sizes
from snlp_compile.ir.plan import SOLVE_NAME
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, new_cache

TIGHT = 1e-10
F64 = torch.float64


# mHC with fewer Sinkhorn iterations (a faster capture), nanochat with scales other than 1
_model = partial(reference_model, sinkhorn_iters=4, scaled=True)
_tokens = tokens


def _transform(model: nn.Module, inputs: tuple, **config) -> fx.GraphModule:
    return snlp_compile.transform(model, inputs, dynamic_shapes=False, **config)


_max_err = max_err
_rel = rel_err


# -- the rule and the knob ---------------------------------------------------------------------------


def test_stage_sizes_are_tensor_split_sizes() -> None:
    assert stage_sizes(8, 3) == [3, 3, 2]
    assert stage_sizes(7, 3) == [3, 2, 2]
    assert stage_sizes(5, 5) == [1] * 5
    assert stage_sizes(6, 1) == [6]
    for n in range(1, 12):
        for c in range(1, n + 1):
            assert stage_sizes(n, c) == [len(p) for p in torch.arange(n).tensor_split(c)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_stages_are_config_errors(bad: object) -> None:
    with pytest.raises(SNLPConfigError, match=r"SNLPConfig\.stages must be an int >= 1"):
        SNLPConfig(stages=bad)  # type: ignore[arg-type]


def test_more_stages_than_parallel_layers_is_refused() -> None:
    model = _model("gpt-tiny")  # 4 layers
    idx = _tokens(model)
    with pytest.raises(SNLPRefusal, match=r"SNLPConfig\.stages=3 but only 2 layers of 'transformer\.h'"):
        _transform(model, (idx,), stages=3, parallel_layers=2)
    report = snlp_compile.explain(model, (idx,), stages=5, dynamic_shapes=False)  # reported, not raised
    assert not report.rewritten and report.refusal is not None
    assert "SNLPConfig.stages=5 but only 4 layers" in report.refusal


# -- exactness -------------------------------------------------------------------------------------

# (model, overrides, parallel layers, stages): uneven stages, and a sequential prefix
EXACT = [
    ("gpt-tiny", {"n_layer": 5}, None, 2),  # [3, 2]
    ("gpt-tiny", {"n_layer": 5}, 4, 3),  # 1 sequential, then [2, 1, 1]
    ("nanochat-tiny", {"n_layer": 5}, None, 3),  # [2, 2, 1], scaled IDN
    ("nanochat-tiny", {}, 3, 2),  # 1 sequential, then [2, 1]
    ("mhc-tiny", {}, None, 3),  # [2, 1, 1], HCN static H
    ("mhc-dyn-tiny", {}, 3, 2),  # 1 sequential, then [2, 1], HCN dynamic H
]


@pytest.mark.parametrize("name,overrides,par,stages", EXACT, ids=[f"{e[0]}-p{e[2]}-s{e[3]}" for e in EXACT])
def test_k_equal_to_largest_stage_is_exact(name: str, overrides: dict, par: int | None, stages: int) -> None:
    model = _model(name, **overrides)
    idx = _tokens(model)
    n_par = par or model.config.n_layer
    sizes = stage_sizes(n_par, stages)
    k = sizes[0]
    fast = _transform(model, (idx,), iterations=k, parallel_layers=par, stages=stages)
    solve = fast.get_submodule(SOLVE_NAME)
    assert solve.stage_sizes == sizes and solve.num_layers == n_par
    assert (solve.layers_short is not None) == (sizes[-1] != sizes[0])
    expected = sequential_trace(model, list(model.transformer.h), idx)[-n_par:]
    with torch.no_grad():
        assert _max_err(fast(idx), model(idx)) < TIGHT
        assert _max_err(snlp_compile.solve_trace(fast, idx), expected) < TIGHT
        # one iteration fewer is not exact: K >= the largest stage is what exactness needs
        assert _max_err(snlp_compile.solve_trace(fast, idx, iterations=k - 1), expected) > 1e-6
    # the precomputed corrections restart at every stage
    starts = solve.stage_starts
    if name.startswith("nanochat"):
        assert solve.static_scalar is not None
        for s in starts:
            assert torch.equal(solve.static_scalar_prod[s], solve.static_scalar[s])
    if name == "mhc-tiny":
        assert solve.use_prefix_products
        for c, m in enumerate(sizes):
            assert getattr(solve, f"static_transfer_{c}").shape[:2] == (m, m)
            torch.testing.assert_close(
                getattr(solve, f"static_init_{c}")[0], solve.static_skip[starts[c]].reshape(4, 4)
            )
    if name == "mhc-dyn-tiny":
        assert not solve.use_prefix_products


@pytest.mark.parametrize("name", ["gpt-tiny", "nanochat-tiny"])
def test_one_layer_per_stage_at_k1_is_the_sequential_model(name: str) -> None:
    model = _model(name)
    idx = _tokens(model)
    fast = _transform(model, (idx,), iterations=1, stages=model.config.n_layer)
    assert fast.snlp_solve.stage_sizes == [1] * model.config.n_layer
    with torch.no_grad():
        assert _max_err(fast(idx), model(idx)) < TIGHT


def test_batch_fwd_init_works_per_stage() -> None:
    """batch_fwd seeds every stage with one extra evaluation at its own input: stages of 2 layers
    are then exact after one iteration."""
    model = _model("gpt-tiny")
    idx = _tokens(model)
    fast = _transform(model, (idx,), iterations=1, stages=2, init="batch_fwd")
    with torch.no_grad():
        assert _max_err(fast(idx), model(idx)) < TIGHT


def test_staged_k1_lies_between_unstaged_k1_and_sequential() -> None:
    """K = 1 on 6 IDN layers: 2 stages restart the solve from an exact-so-far input halfway, so
    their trace is closer to the sequential one than the unstaged solve's, and not exact; the
    first stage's rows are the unstaged solve's rows (the same K = 1 formula over them)."""
    model = _model("gpt-tiny", n_layer=6)
    idx = _tokens(model)
    expected = sequential_trace(model, list(model.transformer.h), idx)
    traces = {}
    with torch.no_grad():
        for c in (1, 2, 6):
            traces[c] = snlp_compile.solve_trace(_transform(model, (idx,), iterations=1, stages=c), idx)
    errors = {c: _rel(t, expected) for c, t in traces.items()}
    assert errors[6] < TIGHT
    assert 1e-3 < errors[2] < 0.9 * errors[1], errors
    assert _max_err(traces[2][:3], traces[1][:3]) < TIGHT
    assert _rel(traces[2][3:], expected[3:]) < _rel(traces[1][3:], expected[3:])


# -- decoding --------------------------------------------------------------------------------------


def _step_inputs(model: nn.Module, batch: int = 2, t_max: int = 16, pos: int = 7) -> tuple[torch.Tensor, ...]:
    k_cache, v_cache = new_cache(model, batch, t_max)
    g = torch.Generator().manual_seed(5)
    k_cache[:, :, :, :pos] = torch.randn(k_cache[:, :, :, :pos].shape, generator=g, dtype=F64)
    v_cache[:, :, :, :pos] = torch.randn(v_cache[:, :, :, :pos].shape, generator=g, dtype=F64)
    return _tokens(model, batch, 1), torch.tensor(pos), k_cache, v_cache


def test_decode_step_with_stages_hands_out_the_sequential_kv() -> None:
    """A cached step, 1 sequential layer then stages [2, 1]: the cache slices are passed stacked and
    cut per stage inside the solve; in exact mode (K = 2) the logits and the new K/V (side outputs,
    evaluated once over all layers at the corrected inputs) are the sequential step's. Warm start
    from the exact trace is exact at K = 1, stage by stage."""
    model = _model("nanochat-tiny")
    inputs = _step_inputs(model)
    step = CachedStep(model)
    fast = _transform(step, inputs, iterations=2, parallel_layers=3, stages=2)
    assert "aten.slice.Tensor(k_cache, 0, 1, 4)" in fast.code  # one view of the stacked cache
    warm = _transform(step, inputs, iterations=1, parallel_layers=3, stages=2, init="warm")
    with torch.no_grad():
        ref = model.forward_cached(*inputs)
        for got, want in zip(fast(*inputs), ref):
            assert got.shape == want.shape and _max_err(got, want) < TIGHT
        exact_trace = sequential_trace(step, list(model.transformer.h), *inputs)[1:]
        first = warm(*inputs)  # no previous trace: h0, inexact
        assert _max_err(first[1], ref[1]) > 1e-6
        warm.snlp_solve.warm_trace.copy_(exact_trace)
        for got, want in zip(warm(*inputs), ref):
            assert _max_err(got, want) < TIGHT


def test_hcn_decode_step_with_stages_is_exact() -> None:
    """HCN decode step, static H (per-stage prefix products), stages [2, 2] at K = 2: the logits and
    new K/V are the sequential step's."""
    model = _model("mhc-tiny")
    inputs = _step_inputs(model)
    fast = _transform(CachedStep(model), inputs, iterations=2, stages=2)
    assert fast.snlp_solve.use_prefix_products
    with torch.no_grad():
        for got, want in zip(fast(*inputs), model.forward_cached(*inputs)):
            assert got.shape == want.shape and _max_err(got, want) < TIGHT


# -- op counts -------------------------------------------------------------------------------------


def _heavy(nodes) -> Counter[str]:
    counts: Counter[str] = Counter()
    for n in nodes:
        if n.op != "call_function":
            continue
        name = str(getattr(n.target, "__name__", n.target))
        if "attention" in name:
            counts["attention"] += 1
        elif name.split(".")[0] in MATMUL_OPS or any(f"aten.{m}." in name for m in MATMUL_OPS):
            counts["matmul"] += 1
    return counts


def _exported(fast: fx.GraphModule, idx: torch.Tensor) -> Counter[str]:
    return _heavy(torch.export.export(fast, (idx,), strict=False).graph.nodes)


def test_op_counts_are_stages_times_body_whatever_the_depth() -> None:
    """Exported graph: the ops outside the solve, plus K x S batched bodies (one evaluation per
    stage per iteration): the same for 5 (stages [3, 2]) and 8 layers (stages [4, 4]) at S = 2."""
    idx = torch.randint(0, 200, (1, 8))
    totals = {}
    for n_layer in (5, 8):
        model = build_model("gpt-tiny", n_layer=n_layer)
        fast = _transform(model, (idx,), iterations=1, stages=2)
        solve = fast.get_submodule(SOLVE_NAME)
        body = _heavy(solve.layers.graph.nodes)
        assert body["matmul"] >= 4 and body["attention"] == 1, body
        assert (solve.layers_short is not None) == (n_layer == 5)
        if solve.layers_short is not None:
            assert _heavy(solve.layers_short.graph.nodes) == body
        outside = _heavy(fast.graph.nodes)  # the head; the solve is one call_module here
        for k in (1, 2) if n_layer == 8 else (1,):
            solve.iterations = k
            total = _exported(fast, idx)
            assert total == outside + Counter({op: k * 2 * c for op, c in body.items()}), (n_layer, k)
            totals[(n_layer, k)] = total
    assert totals[(5, 1)] == totals[(8, 1)]


# -- reports, export paths -------------------------------------------------------------------------


def test_explain_and_repr_show_the_stages() -> None:
    model = _model("gpt-tiny", n_layer=5)
    idx = _tokens(model)
    fast = _transform(model, (idx,), iterations=2, stages=2)
    text = str(fast.snlp_report)
    assert fast.snlp_report.stages == [3, 2]
    assert "stages=2" in text and "stages:    2 (3 + 2 layers)" in text
    assert "stages=2 [3, 2]" in repr(fast.snlp_solve)
    plain = _transform(model, (idx,), iterations=2)
    assert "stages=1" in str(plain.snlp_report) and "stages:" not in str(plain.snlp_report)
    assert plain.snlp_solve.stage_sizes == [5] and plain.snlp_solve.layers_short is None


def test_torch_compile_traces_the_staged_solve_in_one_graph() -> None:
    model = _model("gpt-tiny")
    idx = _tokens(model)
    fast = _transform(model, (idx,), iterations=2, stages=2)
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert _max_err(compiled(idx), model(idx)) < TIGHT


def test_onnx_export_of_a_staged_idn_model(tmp_path) -> None:
    """gpt (IDN), 3 layers in stages [2, 1], K = 2 (exact), exported with dynamic batch and
    sequence: ONNX Runtime (CPU) agrees with the rewritten module and the original model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from snlp_compile.export.onnx_export import export_onnx
    from snlp_compile.export.ort import make_session

    model = build_model("gpt-tiny", n_layer=3, n_embd=32, n_head=2)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, (idx,), tmp_path / "gpt_stages.onnx", iterations=2, stages=2)
    assert result.snlp_report is not None and result.snlp_report.stages == [2, 1]
    assert not result.op_counts.keys() & {"Loop", "Scan", "If"}
    fast = snlp_compile.transform(model, (idx,), iterations=2, stages=2)
    session = make_session(result.path)
    for shape in [(1, 7), (3, 19)]:
        x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(sum(shape)))
        (out,) = session.run(None, {"idx": x.numpy()})
        got = torch.from_numpy(out)
        with torch.no_grad():
            for want in (fast(x), model(x)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# -- stage sizes given in order: a fast sequential prefix -------------------------------------------


@pytest.mark.parametrize("name", ["nanochat-tiny", "mhc-tiny"])
@pytest.mark.parametrize("k", [1, 2])
def test_sequential_stages_then_a_parallel_one_is_parallel_layers(name: str, k: int) -> None:
    """stages=(1, 1, 2): the first two layers one after another (one exact iteration each, through
    the batched body), then the last two layer-parallel with K iterations from the second's output:
    the function of parallel_layers=2 at the same K, for the forward and the decode step."""
    model = _model(name)
    idx = _tokens(model)
    staged = _transform(model, (idx,), iterations=k, stages=(1, 1, 2))
    plain = _transform(model, (idx,), iterations=k, parallel_layers=2)
    inputs = _step_inputs(model)
    staged_step = _transform(CachedStep(model), inputs, iterations=k, stages=(1, 1, 2))
    plain_step = _transform(CachedStep(model), inputs, iterations=k, parallel_layers=2)
    assert staged.snlp_solve.stage_sizes == [1, 1, 2]
    with torch.no_grad():
        assert _max_err(staged(idx), plain(idx)) < TIGHT
        for got, want in zip(staged_step(*inputs), plain_step(*inputs)):
            assert got.shape == want.shape and _max_err(got, want) < TIGHT


def test_a_stage_runs_at_most_its_size_in_iterations() -> None:
    """K = 3 on stages (1, 1, 2): 1 + 1 + 2 batched evaluations, not 3 per stage (the stage is exact
    after as many iterations as it has layers); the result is the sequential model's."""
    model = build_model("gpt-tiny", dtype=F64)
    idx = torch.randint(0, 200, (1, 8))
    fast = _transform(model, (idx,), iterations=3, stages=(1, 1, 2))
    calls = Counter()
    for name in ("layers", "layers_short"):
        sub = getattr(fast.snlp_solve, name)
        sub.register_forward_hook(lambda *_, n=name: calls.update([n]))
    with torch.no_grad():
        assert _rel(fast(idx), model(idx)) < TIGHT
    assert calls == Counter({"layers": 2, "layers_short": 2})


@pytest.mark.parametrize(
    "stages,match",
    [
        ((1, 1, 1), r"SNLPConfig\.stages=\(1, 1, 1\) must add up to the 4 parallel layers"),
        ((1, 2, 1, 0), r"SNLPConfig\.stages must be an int >= 1 or a tuple of stage sizes >= 1"),
        ((1, 2, 3), r"SNLPConfig\.stages=\(1, 2, 3\) must add up"),
    ],
)
def test_bad_stage_sizes_are_refused_in_one_line(stages: tuple, match: str) -> None:
    model = build_model("gpt-tiny", dtype=F64)
    idx = torch.randint(0, 200, (1, 8))
    with pytest.raises((SNLPConfigError, SNLPRefusal), match=match):
        _transform(model, (idx,), stages=stages)


def test_three_distinct_stage_sizes_are_refused() -> None:
    model = build_model("gpt-tiny", n_layer=6, dtype=F64)
    idx = torch.randint(0, 200, (1, 8))
    with pytest.raises(SNLPConfigError, match="at most two distinct sizes"):
        _transform(model, (idx,), stages=(1, 2, 3))


# -- the former name, chunks (deprecated for one release) -------------------------------------------

RENAMED = r"SNLPConfig\.chunks is now SNLPConfig\.stages"


def test_chunks_is_a_deprecated_alias_of_stages() -> None:
    with pytest.warns(DeprecationWarning, match=RENAMED):
        config = SNLPConfig(chunks=(1, 1, 2))
    assert config.stages == (1, 1, 2) and config == SNLPConfig(stages=(1, 1, 2))
    with pytest.warns(DeprecationWarning, match=RENAMED):
        assert SNLPConfig(iterations=2).replace(chunks=3) == SNLPConfig(iterations=2, stages=3)
    assert "chunks" not in dataclasses.asdict(config) and dataclasses.asdict(config)["stages"] == (1, 1, 2)
    bad = pytest.raises(SNLPConfigError, match=r"SNLPConfig\.stages must be an int >= 1")
    with pytest.warns(DeprecationWarning, match=RENAMED), bad:
        SNLPConfig(chunks=0)


def test_stages_and_chunks_together_are_a_config_error() -> None:
    with pytest.raises(
        SNLPConfigError, match=r"both stages=2 and chunks=3: chunks is the former name of stages"
    ):
        SNLPConfig(stages=2, chunks=3)
    with pytest.raises(SNLPConfigError, match=r"both stages=2 and chunks=2"):
        SNLPConfig().replace(stages=2, chunks=2)


def test_a_config_written_before_the_rename_still_loads() -> None:
    """An SNLPConfig as checkpoints and benchmarks/results/frontier.json recorded it (asdict,
    through JSON) before the rename: ``chunks`` becomes ``stages``."""
    old = json.loads(
        '{"iterations": 2, "parallel_layers": null, "init": "h0", "damping": 1.0, "layers": null, '
        '"dynamic_shapes": true, "chunks": [1, 1, 2], "deferred_kv": false}'
    )
    with pytest.warns(DeprecationWarning, match=RENAMED):
        config = SNLPConfig(**old)
    assert config == SNLPConfig(iterations=2, stages=(1, 1, 2))
    again = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    assert SNLPConfig(**again) == config and "chunks" not in again


def test_transform_with_chunks_is_the_staged_transform() -> None:
    model = build_model("gpt-tiny", n_layer=3, dtype=F64)
    idx = torch.randint(0, 200, (1, 8))
    with pytest.warns(DeprecationWarning, match=RENAMED) as caught:
        old = snlp_compile.transform(model, (idx,), iterations=2, chunks=2, dynamic_shapes=False)
    assert old.snlp_solve.stage_sizes == [2, 1] and old.snlp_report.stages == [2, 1]
    assert _max_err(old(idx), model(idx)) < TIGHT
    # the warning names the caller's line, not the library's (so Python shows it in a script)
    with pytest.warns(DeprecationWarning, match=RENAMED) as more:
        SNLPConfig(chunks=2).replace(chunks=3)
    assert {w.filename for w in [*caught, *more]} == {__file__}, [(w.filename, w.lineno) for w in caught]


def test_cli_chunks_is_a_hidden_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from snlp_compile.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["inspect", "--chunks", "2"]).stages == 2
    assert parser.parse_args(["eval", "runs/x", "--chunks", "1", "2"]).stages == [1, 2]
    assert capsys.readouterr().err.count("--chunks is deprecated: it is now --stages") == 2
    for argv in (["inspect", "--stages", "2", "--chunks", "2"], ["export", "--chunks", "2", "--stages", "3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "not allowed with argument" in capsys.readouterr().err
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("inspect", "export", "eval"):
        text = sub.choices[name].format_help()
        assert "--stages" in text and "--chunks" not in text, name


def test_chunks_reads_as_stages_with_a_warning_and_copies_keep_their_stages() -> None:
    """Code written before the rename that reads ``config.chunks`` gets the stage count (with the
    DeprecationWarning), never the InitVar's None; copies through dataclasses.replace neither warn
    nor see a second stage count."""
    config = SNLPConfig(iterations=2, stages=3)
    with pytest.warns(DeprecationWarning, match=RENAMED):
        assert config.chunks == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(config, iterations=4) == SNLPConfig(iterations=4, stages=3)
        assert config.replace(stages=2).stages == 2
