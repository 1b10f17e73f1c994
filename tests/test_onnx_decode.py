"""ONNX export of the KV-cached decode step with per-layer caches at the graph boundary
(``past_key_values.N.key/value`` in, ``present.N.key/value`` out): names, and parity under ONNX
Runtime (CPU) over 8 decode steps, each step's present fed back as the next past, against the same
step in PyTorch, for the sequential step, K=1 and exact mode (which also equals the sequential
model). One export per step (module fixtures), traced at batch 2 and run at batch 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

import snlp_compile
from snlp_compile import SNLPConfigError, SNLPUsageError
from snlp_compile.cli import main as cli_main
from snlp_compile.export.onnx_decode import (
    export_onnx_decode,
    ort_decode,
    past_names,
    present_names,
    torch_decode,
)
from snlp_compile.export.onnx_export import ONNXExport
from snlp_compile.export.ort import make_session
from snlp_compile.models import build_model
from snlp_compile.models.kv import CachedStep, new_cache

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

N_LAYER, MAX_LEN, STEPS = 2, 12, 8
MODES = {"sequential": None, "K=1": 1, "exact": N_LAYER}


def _model() -> torch.nn.Module:
    return build_model("nanochat-tiny", n_layer=N_LAYER)  # GQA (2 kv heads), rotary, soft-capped logits


@pytest.fixture(scope="module", params=list(MODES))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, ONNXExport]:
    mode, k = request.param, MODES[request.param]
    path = tmp_path_factory.mktemp("decode") / "step.onnx"
    kw = {"rewrite": False} if k is None else {"iterations": k}
    return mode, export_onnx_decode(_model(), path, batch=2, max_len=MAX_LEN, **kw)


def _reference_step(mode: str, model: torch.nn.Module) -> torch.nn.Module:
    k = MODES[mode]
    if k is None:
        return CachedStep(model)
    k_cache, v_cache = new_cache(model, 2, MAX_LEN)
    idx = torch.zeros(2, 1, dtype=torch.long)
    return snlp_compile.transform(CachedStep(model), (idx, torch.tensor(0), k_cache, v_cache), iterations=k)


def test_decode_step_graph_names_follow_onnxruntime_genai(exported: tuple[str, ONNXExport]) -> None:
    _, result = exported
    inputs = dict(result.inputs)
    assert list(inputs) == ["input_ids", "position", *past_names(N_LAYER)]
    assert [name for name, _ in result.outputs] == ["logits", *present_names(N_LAYER)]
    assert past_names(1) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert present_names(1) == ["present.0.key", "present.0.value"]
    assert inputs["input_ids"] == ["batch", 1] and inputs["position"] == []
    assert inputs["past_key_values.1.value"] == ["batch", 2, "max_sequence_length", 16]
    assert dict(result.outputs)["present.1.value"] == ["batch", 2, "max_sequence_length", 16]
    assert not {"Loop", "Scan", "If"} & set(result.op_counts)


def test_eight_decode_steps_under_onnxruntime_match_pytorch(exported: tuple[str, ONNXExport]) -> None:
    mode, result = exported
    model = _model()
    tokens = torch.randint(0, model.config.vocab_size, (3, STEPS), generator=torch.Generator().manual_seed(1))
    got = ort_decode(make_session(result.path), tokens, MAX_LEN)
    want = torch_decode(_reference_step(mode, model), model, tokens, MAX_LEN)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    # (L, B, H_kv, T_max, D): every decoded position written, none after
    assert got[1][:, :, :, STEPS:].abs().max() == 0 and got[1][:, :, :, :STEPS].abs().amax(-1).min() > 0
    if mode == "exact":  # exact mode is the sequential model
        seq = torch_decode(CachedStep(model), model, tokens, MAX_LEN)
        torch.testing.assert_close(got[0], seq[0], rtol=1e-4, atol=1e-4 * float(seq[0].abs().max()))
    elif mode == "K=1":  # and K=1 is not: the comparison above would catch a sequential export
        seq = torch_decode(CachedStep(model), model, tokens, MAX_LEN)
        assert float((got[0] - seq[0]).abs().max()) > 1e-3


def test_decode_export_and_driver_errors(exported: tuple[str, ONNXExport], tmp_path: Path) -> None:
    _, result = exported
    session = make_session(result.path)
    with pytest.raises(SNLPUsageError, match="do not fit caches of max_len=4"):
        ort_decode(session, torch.zeros(1, 5, dtype=torch.long), 4)
    with pytest.raises(SNLPUsageError, match="do not fit caches"):
        torch_decode(CachedStep(_model()), _model(), torch.zeros(1, 5, dtype=torch.long), 4)
    with pytest.raises(SNLPConfigError, match="config/overrides do not apply"):
        export_onnx_decode(_model(), tmp_path / "x.onnx", rewrite=False, iterations=1)
    with pytest.raises(SNLPConfigError, match="max_len >= 2"):
        export_onnx_decode(_model(), tmp_path / "x.onnx", max_len=1, rewrite=False)
    with pytest.raises(SNLPUsageError, match="has no KV-cached step"):
        export_onnx_decode(torch.nn.Linear(4, 4), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_step_with_deferred_kv_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SNLPUsageError, match="defers its K/V"):
        export_onnx_decode(_model(), tmp_path / "d.onnx", max_len=MAX_LEN, iterations=1, deferred_kv=True)


def test_cli_exports_and_checks_the_decode_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "step.onnx"
    argv = ["export", "--model", "nanochat-tiny", "--decode", "-K", "1", "--max-len", "12", "-o", str(out)]
    assert cli_main([*argv, "--check"]) == 0
    printed = capsys.readouterr().out
    assert "present.3.value[batch, 2, max_sequence_length, 16]" in printed
    checks = [line for line in printed.splitlines() if line.startswith("check 8 decode steps B=2")]
    assert len(checks) == 3 and all(line.endswith("(ok)") for line in checks)


def test_cli_export_format_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", "--format", "aoti", "-o", str(tmp_path / "m.onnx")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--format aoti writes a .pt2 package" in line and not (tmp_path / "m.onnx").exists()


def test_a_transformers_model_exports_its_decode_step_through_the_adapter(tmp_path: Path) -> None:
    """A `transformers` Llama goes through the decode adapter (models.hf_decode): the exact-mode
    decode step under ONNX Runtime, 8 tokens one at a time, gives the logits of the model's own
    full forward."""
    hf = tiny_llama(num_hidden_layers=2, vocab_size=96)
    result = export_onnx_decode(hf, tmp_path / "llama_step.onnx", batch=2, max_len=MAX_LEN, iterations=2)
    tokens = torch.randint(0, 96, (3, STEPS), generator=torch.Generator().manual_seed(2))
    logits, _, _ = ort_decode(make_session(result.path), tokens, MAX_LEN)
    with torch.no_grad():
        want = hf(tokens).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
