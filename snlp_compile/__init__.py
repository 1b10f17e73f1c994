"""snlp_compile: rewrite a Transformer's residual layer chain into a layer-parallel SNLP solve.

import snlp_compile
fast = snlp_compile.transform(model, (idx,), iterations=2)
print(snlp_compile.explain(model, (idx,)))
"""

from .api import explain, solve_trace, transform
from .api_compile import compile  # also registers the torch.compile backend "snlp"
from .config import SNLPConfig
from .errors import SNLPCaptureError, SNLPConfigError, SNLPError, SNLPRefusal, SNLPUsageError
from .export.onnx_export import export_onnx
from .generate import Decoder, generate
from .options import LoweringOptions
from .report import ExplainReport
from .solve.handle import SolveHandle, solve_handle

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
__version__ = "0.1.0"
