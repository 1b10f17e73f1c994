"""Lowering of the rewritten graph to deployment runtimes: torch.compile (backend "snlp",
registered on import), ONNX export and ONNX Runtime sessions (``snlp_compile.export.ort``)."""

from .compile_backend import (
    BACKEND_NAME,
    SNLPBackendWarning,
    backend_records,
    clear_backend_records,
    register,
)

register()

__all__ = ["BACKEND_NAME", "SNLPBackendWarning", "backend_records", "clear_backend_records", "register"]
