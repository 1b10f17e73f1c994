"""The compiler's data, no behaviour: what analysis finds and what the runtime consumes.

``chain``         LayerChain: the layers, their skip paths and readers, over the captured graph
``coef``          scalar skip coefficients (identity / scaled residuals) and their emission
``matexpr``       stream-mixing skip matrices (HCN) and their emission
``stream_layout`` the replayable view of a hidden state as (*batch, n, m) streams
``plan``          SolvePlan: everything the layer-parallel solve is built from

Dependency order: ``ir`` imports nothing of the package but ``errors``; passes produce it, the
runtime (``solve``) consumes it.
"""

from .chain import HiddenReader, Layer, LayerChain, SkipKind, SkipPath

__all__ = ["HiddenReader", "Layer", "LayerChain", "SkipKind", "SkipPath"]
