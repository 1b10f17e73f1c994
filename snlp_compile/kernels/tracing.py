"""Whether ``torch.export`` is tracing, the one question the kernels ask of torch's tracing state."""

from __future__ import annotations

import torch


def exporting() -> bool:
    """True while ``torch.export`` (non-strict, as every export of this project) traces, False in
    eager code and while Dynamo traces for ``torch.compile``.

    ``torch.compiler.is_exporting()`` alone is not enough: before the fix of pytorch#176347
    (March 2026) Dynamo folded it to True inside every function it traced, ``torch.compile``
    included, which would take the PDL launch and the fused decode attention out of every compiled
    step. So Dynamo's own tracing is excluded; a strict export (traced by Dynamo) is not detected."""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()
