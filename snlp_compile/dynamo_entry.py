"""The target of the ``torch_dynamo_backends`` entry point (pyproject.toml): torch.compile finds
the backend "snlp" through it, so ``torch.compile(model, backend="snlp")`` works before (or
without) ``import snlp_compile``.

torch loads ``snlp_compile.dynamo_entry:snlp`` only when "snlp" is not registered yet and then
registers what it gets under that name. Importing the backend registers it already (importing
``snlp_compile.export`` does), so the attribute is resolved here lazily and that registration is
taken back first: torch registers the same function again right after.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name != "snlp":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from torch._dynamo.backends.registry import _COMPILER_FNS

    from .export.compile_backend import BACKEND_NAME, snlp_backend

    if _COMPILER_FNS.get(BACKEND_NAME) is snlp_backend:
        del _COMPILER_FNS[BACKEND_NAME]  # lookup_backend() registers it itself, and refuses a duplicate
    return snlp_backend
