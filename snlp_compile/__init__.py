"""snlp_compile: rewrite a Transformer's residual layer chain into a layer-parallel SNLP solve.

import snlp_compile
fast = snlp_compile.transform(model, (idx,), iterations=2)
print(snlp_compile.explain(model, (idx,)))

The names below are imported on first use, so that ``import snlp_compile`` (and the command
line's ``--help``) does not import torch. The torch.compile backend "snlp" is registered when
torch is already imported, on first use of a name here, or by torch itself through the package's
``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "explain": ".api",
    "solve_trace": ".api",
    "transform": ".api",
    "compile": ".api_compile",
    "SNLPConfig": ".config",
    "SNLPCaptureError": ".errors",
    "SNLPConfigError": ".errors",
    "SNLPError": ".errors",
    "SNLPRefusal": ".errors",
    "SNLPUsageError": ".errors",
    "export_onnx": ".export.onnx_export",
    "Decoder": ".decoding",
    "generate": ".decoding",
    "ExplainReport": ".report",
    "LoweringOptions": ".options",
    "SolveHandle": ".solve.handle",
    "solve_handle": ".solve.handle",
}

__all__ = [
    "Decoder",
    "ExplainReport",
    "LoweringOptions",
    "SNLPCaptureError",
    "SNLPConfig",
    "SNLPConfigError",
    "SNLPError",
    "SNLPRefusal",
    "SNLPUsageError",
    "SolveHandle",
    "compile",
    "explain",
    "export_onnx",
    "generate",
    "solve_handle",
    "solve_trace",
    "transform",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snlp_compile' has no attribute {name!r}")
    if module != ".errors":
        importlib.import_module(".api_compile", __name__)  # registers the torch.compile backend "snlp"
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING or "torch" in sys.modules:  # a library user: keep the eager behaviour
    from .api import explain, solve_trace, transform
    from .api_compile import compile  # also registers the torch.compile backend "snlp"
    from .config import SNLPConfig
    from .decoding import Decoder, generate
    from .errors import SNLPCaptureError, SNLPConfigError, SNLPError, SNLPRefusal, SNLPUsageError
    from .export.onnx_export import export_onnx
    from .options import LoweringOptions
    from .report import ExplainReport
    from .solve.handle import SolveHandle, solve_handle
