"""Errors the compiler raises on purpose: each names the graph node and module path at fault."""

from __future__ import annotations


class SNLPError(Exception):
    """Base class of every error snlp_compile raises deliberately."""


class SNLPRefusal(SNLPError):
    """The model's structure cannot be rewritten without changing the function it computes.

    ``node`` and ``module_path`` point at the place in the captured graph that decided it, so the
    message can be acted on (e.g. the LayerNorm that sits on a post-norm model's skip path).
    """

    def __init__(self, reason: str, *, node: str | None = None, module_path: str | None = None):
        self.reason = reason
        self.node = node
        self.module_path = module_path
        where = []
        if node is not None:
            where.append(f"node '{node}'")
        if module_path is not None:
            where.append(f"module '{module_path or '<root>'}'")
        suffix = f" [{', '.join(where)}]" if where else ""
        super().__init__(reason + suffix)


class SNLPCaptureError(SNLPError):
    """torch.export could not capture the model; the message carries torch's own explanation."""


class SNLPConfigError(SNLPError, ValueError):
    """A configuration field holds a value the compiler cannot use; the message names the field."""


class SNLPUsageError(SNLPError, RuntimeError):
    """The rewritten model was used in a way it does not support (e.g. switched to training mode)."""
