"""ONNX export of the rewritten models: parity under ONNX Runtime (CPU), graph structure, helpers.

One export per reference model (they take tens of seconds each), with dynamic batch and
sequence, checked at two batch sizes x two sequence lengths. Exact mode (K = number of parallel
layers) is compared with the original model too.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

import snlp_compile
from snlp_compile import SNLPConfigError, SNLPRefusal
from snlp_compile.cli import main as cli_main
from snlp_compile.export.onnx_export import (
    ONNXExport,
    _rms_norm,
    all_op_types,
    decompose_device_rms_norm,
    export_onnx,
    export_program,
)
from snlp_compile.export.ort import (
    IOBindingRunner,
    ProviderError,
    available_providers,
    cpu_fallbacks,
    make_session,
    parse_placements,
    providers_for,
)
from snlp_compile.models import build_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPES = [(1, 7), (1, 19), (3, 7), (3, 19)]  # two batch sizes x two sequence lengths, one export
SEQUENTIAL_OPS = {"Loop", "Scan", "If"}
MATMUL_OPS = ("MatMul", "Gemm", "Einsum")
N_LAYER = 3  # exact mode: K = 3


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


class Exported:
    def __init__(self, model: torch.nn.Module, transformed: torch.nn.Module, result: ONNXExport):
        self.model, self.transformed, self.result = model, transformed, result
        self.session = make_session(result.path)

    def run(self, idx: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"idx": idx.numpy()})
        return torch.from_numpy(out)


def _export(tmp: Path, name: str, *, pass_transformed: bool = False, **kw) -> Exported:
    model = build_model(name, n_layer=N_LAYER)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    transformed = snlp_compile.transform(model, (idx,), iterations=N_LAYER)
    if pass_transformed:
        code = transformed.snlp_solve.layers.code
        result = export_onnx(transformed, (idx,), tmp / f"{name}.onnx", **kw)
        # exported with every kernel off (passes.lowering.restricted), its own choices kept
        assert transformed.snlp_solve.layers.code == code and "gemv = " in code
    else:
        result = export_onnx(model, (idx,), tmp / f"{name}.onnx", iterations=N_LAYER, **kw)
    return Exported(model, transformed, result)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export(tmp_path_factory.mktemp("gpt"), "gpt-tiny", report=True)


@pytest.fixture(scope="module")
def nanochat(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export(tmp_path_factory.mktemp("nanochat"), "nanochat-tiny", pass_transformed=True)


@pytest.fixture(scope="module")
def mhc(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export(tmp_path_factory.mktemp("mhc"), "mhc-tiny")


def _check_parity(exp: Exported) -> None:
    gen = torch.Generator().manual_seed(1)
    for batch, seq in SHAPES:
        idx = torch.randint(0, 256, (batch, seq), generator=gen)
        got = exp.run(idx)
        with torch.no_grad():
            _close(got, exp.transformed(idx))  # the rewritten PyTorch module
            _close(got, exp.model(idx))  # exact mode: the original sequential model


def _check_file(exp: Exported) -> Counter[str]:
    onnx.checker.check_model(str(exp.result.path))
    proto = onnx.load(str(exp.result.path))
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert exp.result.opset == 18
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in proto.opset_import)
    ops = all_op_types(proto)
    assert not ops.keys() & SEQUENTIAL_OPS, ops
    return ops


def test_gpt_idn_parity_structure_and_report(gpt: Exported) -> None:
    """IDN (GPT-2 style pre-norm): the correction is a CumSum; exporter report saved beside."""
    _check_parity(gpt)
    ops = _check_file(gpt)
    assert ops["CumSum"] >= 1
    assert gpt.result.report_path == gpt.result.path.with_suffix(".export_report.md")
    assert gpt.result.report_path.exists() and gpt.result.report_path.stat().st_size > 0
    assert gpt.result.snlp_report is not None and "IDN" in gpt.result.snlp_report.skip


def test_nanochat_scaled_idn_parity_and_plain_ops(nanochat: Exported) -> None:
    """Scaled IDN (nanochat's resid_lambdas), exported from a transform() result: the affine
    correction is plain tensor ops (no Loop/Scan)."""
    _check_parity(nanochat)
    ops = _check_file(nanochat)
    assert ops["Mul"] > 0
    assert "scaled IDN" in nanochat.result.snlp_report.skip


def test_mhc_hcn_parity_and_plain_ops(mhc: Exported) -> None:
    """HCN (static mHC stream mixing): the 4 x 4 matrix scan is MatMuls, no Loop/Scan."""
    _check_parity(mhc)
    ops = _check_file(mhc)
    assert ops["MatMul"] > 0
    assert "HCN" in mhc.result.snlp_report.skip


def _matmuls(n_layer: int, tmp: Path) -> int:
    model = build_model("nanochat-tiny", n_layer=n_layer, n_embd=32, n_head=2, n_kv_head=1)
    idx = torch.randint(0, 256, (2, 8))
    result = export_onnx(model, (idx,), tmp / f"L{n_layer}.onnx", iterations=1, dynamic=False)
    assert len(result.snlp_report.parallel_layers) == n_layer
    return sum(result.op_counts[op] for op in MATMUL_OPS)


def test_matmul_count_independent_of_layer_count(tmp_path: Path) -> None:
    """All-parallel rewrite, K = 1: L = 4 and L = 16 give the same number of matmul-type nodes
    (6 projections per layer would be 96 at L = 16 if the layers were unrolled)."""
    four, sixteen = _matmuls(4, tmp_path), _matmuls(16, tmp_path)
    assert four == sixteen
    assert sixteen < 16 * 6


def test_export_sequential_baseline_and_size_one_example(tmp_path: Path) -> None:
    """rewrite=False exports the model as written; an example batch of 1 fixes the batch
    dimension (torch.export specialises size 1), which export_onnx says instead of hiding."""
    model = build_model("gpt-tiny", n_layer=2)
    idx = torch.randint(0, 256, (1, 6))
    with pytest.warns(UserWarning, match="dimension 0 is fixed to 1"):
        result = export_onnx(model, (idx,), tmp_path / "seq.onnx", rewrite=False)
    assert result.snlp_report is None
    assert result.inputs == [("idx", [1, "sequence"])]
    assert any("fixed to 1" in note for note in result.notes)
    session = make_session(result.path)
    for seq in (6, 9):
        x = torch.randint(0, 256, (1, seq))
        (got,) = session.run(None, {"idx": x.numpy()})
        with torch.no_grad():
            _close(torch.from_numpy(got), model(x))


def test_export_errors(tmp_path: Path) -> None:
    model = build_model("gpt-tiny", n_layer=2)
    idx = torch.randint(0, 256, (2, 6))
    with pytest.raises(SNLPConfigError, match="opset"):
        export_onnx(model, (idx,), tmp_path / "x.onnx", opset=17)
    transformed = snlp_compile.transform(model, (idx,), iterations=2)
    with pytest.raises(SNLPConfigError, match="already transformed"):
        export_onnx(transformed, (idx,), tmp_path / "x.onnx", iterations=2)
    with pytest.raises(SNLPConfigError, match="rewrite=False"):
        export_onnx(model, (idx,), tmp_path / "x.onnx", rewrite=False, iterations=2)
    post_norm = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        3,
        enable_nested_tensor=False,
    ).eval()
    with pytest.raises(SNLPRefusal):
        export_onnx(post_norm, (torch.randn(2, 5, 16),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# --- onnxruntime helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-built model with shape arithmetic (Shape -> Reshape) and real work (Einsum):
    output = reshape(0.5 * float(idx)^2, shape(idx))."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["idx"], ["shape"], name="shape_of_idx"),
        helper.make_node("Cast", ["idx"], ["x"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Einsum", ["x", "x"], ["sq"], name="square", equation="bt,bt->bt"),
        helper.make_node("Mul", ["sq", "half"], ["scaled"], name="scale"),
        helper.make_node("Reshape", ["scaled", "shape"], ["output"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence"])],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("small") / "small.onnx"
    onnx.save_model(model, str(path))
    return path


def test_iobinding_runner_matches_session_run(small_onnx: Path) -> None:
    session = make_session(small_onnx)
    runner = IOBindingRunner(session, "cpu")
    idx = torch.randint(0, 256, (3, 11))
    (want,) = session.run(None, {"idx": idx.numpy()})
    assert torch.equal(torch.from_numpy(want), 0.5 * idx.float() ** 2)
    (got,) = runner({"idx": idx})
    assert torch.equal(got, torch.from_numpy(want))
    buffer = runner.bound.outputs["output"]
    buffer.zero_()
    runner.run()  # re-runs into the same bound buffer
    assert torch.equal(buffer, torch.from_numpy(want))
    with pytest.raises(ProviderError, match=r"missing \['idx'\]"):
        runner({"tokens": idx})
    with pytest.raises(ProviderError, match="contiguous"):
        runner({"idx": idx.t()})


def test_gpu_session_without_gpu_provider_raises(small_onnx: Path) -> None:
    if "CUDAExecutionProvider" in available_providers():
        providers = providers_for("cuda")
        assert providers[0][0] == "CUDAExecutionProvider"
        return
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        make_session(small_onnx, "cuda")
    with pytest.raises(ProviderError, match="device must be"):
        providers_for("tpu")


def test_placement_log_parsing_and_cpu_fallback_detection(small_onnx: Path) -> None:
    proto = onnx.load(str(small_onnx), load_external_data=False)
    prefix = "2026-01-01 [V:onnxruntime:, session_state.cc:1345 VerifyEachNodeIsAssignedToAnEp]"
    log = "\n".join(
        [
            f"{prefix} Node placements",
            f"{prefix}  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 3",
            f"{prefix}   Cast (to_float)",
            f"{prefix}   Mul (scale)",
            f"{prefix}   Reshape (reshape)",
            f"{prefix}  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2",
            f"{prefix}   Shape (shape_of_idx)",
            f"{prefix}   Einsum (square)",
            "2026-01-01 [W:onnxruntime:, session_state.cc:1359 VerifyEachNodeIsAssignedToAnEp] Some nodes ...",
        ]
    )
    placements = parse_placements(log)
    assert placements["CUDAExecutionProvider"] == [
        ("Cast", "to_float"),
        ("Mul", "scale"),
        ("Reshape", "reshape"),
    ]
    assert placements["CPUExecutionProvider"] == [("Shape", "shape_of_idx"), ("Einsum", "square")]
    # the Shape node computes sizes (int64, rank 1): allowed on the CPU; the Einsum is real work
    assert cpu_fallbacks(placements, proto) == [("Einsum", "square")]
    assert cpu_fallbacks(placements, proto, allow_cpu=["Einsum"]) == []
    assert cpu_fallbacks(placements, proto, allow_cpu=["square"]) == []
    everything = parse_placements(f"{prefix}  All nodes placed on [CPUExecutionProvider]. Number of nodes: 5")
    assert everything == {"CPUExecutionProvider": 5}
    assert cpu_fallbacks(everything, proto) == [("*", "all 5 nodes")]
    assert cpu_fallbacks({"CUDAExecutionProvider": 5}, proto) == []


def test_cli_export_with_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.onnx"
    argv = ["export", "--model", "gpt-tiny", "-o", str(out), "-K", "4", "--static", "--check", "--seq", "8"]
    argv += ["--batch", "1"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert out.exists()
    assert "rewritten" in printed and "check B=1 T=8" in printed and "(ok)" in printed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_in_primitive_ops_equals_torch(
    dtype: torch.dtype, weighted: bool, eps: float | None
) -> None:
    """The rms_norm decomposition used for exports from CUDA computes what F.rms_norm computes."""
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, 16, generator=gen)).to(dtype)
    weight = torch.randn(16, generator=gen).to(dtype) if weighted else None
    want = torch.nn.functional.rms_norm(x, [16], weight, eps)
    got = _rms_norm(x, [16], weight, eps)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rms_norm_decomposition_of_an_exported_program() -> None:
    model = build_model("nanochat-tiny", n_layer=2)
    idx = torch.randint(0, 256, (2, 8))
    transformed = snlp_compile.transform(model, (idx,), iterations=2, dynamic_shapes=False)
    program = export_program(transformed, (idx,), {}, dynamic=False)
    rms = torch.ops.aten.rms_norm.default
    assert any(n.target is rms for n in program.graph.nodes)
    assert decompose_device_rms_norm(program) is program  # CPU tensors: nothing to do
    decomposed = decompose_device_rms_norm(program, force=True)
    assert not any(n.target is rms for n in decomposed.graph.nodes)
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(x), transformed(x), rtol=0, atol=0)
