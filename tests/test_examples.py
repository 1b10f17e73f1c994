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


def test_train_regularised_reduces_the_trace_error() -> None:
    terms = _load("train_regularised").main(steps=12)
    assert terms[-1] < terms[0]
