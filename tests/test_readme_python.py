"""The README's Python blocks that run on a CPU without a C++ build, as written, in one namespace
(later blocks use the first block's ``model`` and ``idx``, as a reader would): a renamed or
removed API breaks this test, not a new user. Left out, each covered by its own test:
torch.compile (tests/test_compile.py), AOTInductor (tests/test_aoti.py), fine-tuning
(tests/test_hf_finetune.py), across processes (tests/test_distributed.py), and the fragments that
need names the README leaves to the reader (``hf_model``, ``prompt``, ``dist``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)

# a line that names each block this test runs, in README order
RUN = (
    'model = build_model("nanochat-small")',  # What it does
    "fused = snlp_compile.transform(model, (idx,), fused_layers=4",  # Wide layers
    "hf_model = transformers.LlamaForCausalLM(config).eval()",  # your own transformers model
    "einsum = snlp_compile.transform(model, (idx,), lowering=LoweringOptions(",  # per-transform lowering
    'res = snlp_compile.export_onnx(model, (idx,), "model.onnx"',  # ONNX
    'res = export_onnx_decode(model, "step.onnx"',  # the decode step as ONNX
)


def _block(line: str) -> str:
    (block,) = [b for b in BLOCKS if line in b]
    return block


def test_the_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for line in RUN:
        exec(_block(line), namespace)
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.export_report.md").is_file()
    logits = namespace["logits"]
    assert getattr(logits, "shape", None) == (3, 8, 256)  # the decode block's ONNX Runtime run
