"""Lowering of the rewritten graph to deployment runtimes: torch.compile (backend "snlp",
registered on import), ONNX export (the model, or its decode step with per-layer KV caches) and
ONNX Runtime sessions (``snlp_compile.export.ort``), and AOTInductor packages (``export_aoti``)."""

from .aoti import export_aoti, load_aoti, run_in_fresh_process
from .compile_backend import (
    BACKEND_NAME,
    SNLPBackendWarning,
    backend_records,
    clear_backend_records,
    register,
)
from .onnx_decode import export_onnx_decode, ort_decode

register()

__all__ = [
    "BACKEND_NAME",
    "SNLPBackendWarning",
    "backend_records",
    "clear_backend_records",
    "export_aoti",
    "export_onnx_decode",
    "load_aoti",
    "ort_decode",
    "register",
    "run_in_fresh_process",
]
