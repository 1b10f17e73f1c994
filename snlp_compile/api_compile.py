"""``snlp_compile.compile()``: the one-call path, transform() and then torch.compile (Inductor)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .api import transform
from .config import SNLPConfig
from .errors import SNLPRefusal
from .export.compile_backend import SNLPBackendWarning


def compile(
    model: torch.nn.Module,
    example_inputs: Any,
    config: SNLPConfig | None = None,
    *,
    mode: str | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
    strict: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """Rewrite ``model`` into the layer-parallel solve, then compile it with Inductor.

    mode: torch.compile's mode; "reduce-overhead" captures CUDA graphs, which is where the
        rewrite pays off most (many small kernels per layer become few large ones).
    options: Inductor options (torch.compile's ``options``; not together with ``mode``).
    strict: raise SNLPRefusal when the model cannot be rewritten; by default the model is
        compiled as written, with an SNLPBackendWarning naming the reason.
    The result calls like the model; ``.snlp_report`` holds the explain() report.
    """
    target: torch.nn.Module
    try:
        target = transform(model, example_inputs, config, example_kwargs=example_kwargs, **overrides)
        report = target.snlp_report
        fullgraph = True
    except SNLPRefusal as why:
        if strict:
            raise
        warnings.warn(
            f"snlp_compile.compile: compiled sequentially, not rewritten: {why}",
            SNLPBackendWarning,
            stacklevel=2,
        )
        target, report, fullgraph = model, None, False
    compiled = torch.compile(target, mode=mode, dynamic=dynamic, options=options, fullgraph=fullgraph)
    setattr(compiled, "snlp_report", report)  # noqa: B010 (torch.compile's result is typed as a function)
    return compiled  # type: ignore[return-value]  # (an OptimizedModule for a module)
