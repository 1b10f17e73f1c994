"""The examples run as documented (small settings) and check what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transform_hf_llama_is_exact_at_k_equal_layers() -> None:
    pytest.importorskip("transformers")
    errors = _load("transform_hf_llama").main(layers=3)
    assert errors[3] < 1e-5 and errors[1] > errors[3]


def test_generate_kv_exact_mode_matches_every_token() -> None:
    agree = _load("generate_kv").main(new_tokens=12)
    assert agree["exact (K=4)"] == 12


def test_export_onnx_ort_matches_the_rewrite() -> None:
    pytest.importorskip("onnxruntime")
    assert _load("export_onnx_ort").main(iterations=1) < 1e-4


def test_train_regularised_reduces_the_trace_error(recwarn: pytest.WarningsRecorder) -> None:
    terms = _load("train_regularised").main(steps=12)
    assert terms[-1] < terms[0]
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]  # its printing warned


def test_generate_across_processes_without_cuda_stops_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun ... examples/generate_across_processes.py --cuda` on a machine without CUDA: rank 0
    says why in one line (SystemExit's message), the other ranks stop silently, no process group."""
    example = _load("generate_across_processes")
    monkeypatch.setattr(example.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        SystemExit, match=r"^generate_across_processes.py --cuda: no CUDA GPU .*; run without --cuda"
    ):
        example.main(cuda=True)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        example.main(cuda=True)
    assert stop.value.code == 2
    assert not example.dist.is_initialized()
