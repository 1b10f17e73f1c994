"""Export the rewritten model to ONNX and run it with ONNX Runtime (CPU here; on a GPU pass
"cuda" to make_session, which needs onnxruntime-gpu and refuses silent CPU fallbacks).

    python examples/export_onnx_ort.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import snlp_compile
from snlp_compile.export.ort import make_session
from snlp_compile.models import build_model


def main(iterations: int = 2) -> float:
    torch.manual_seed(0)
    model = build_model("nanochat-tiny").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nanochat_snlp.onnx"
        result = snlp_compile.export_onnx(model, (idx,), path, iterations=iterations)
        print(result)
        session = make_session(path, "cpu")
        name = session.get_inputs()[0].name
        other = torch.randint(0, model.config.vocab_size, (3, 24))  # dynamic batch and length
        (logits,) = session.run(None, {name: other.numpy()})
    with torch.no_grad():
        expected = snlp_compile.transform(model, (idx,), iterations=iterations)(other).numpy()
    err = float(np.abs(logits - expected).max())
    print(f"ONNX Runtime against the PyTorch rewrite, K={iterations}: max abs difference {err:.1e}")
    assert err < 1e-4
    return err


if __name__ == "__main__":
    main()
