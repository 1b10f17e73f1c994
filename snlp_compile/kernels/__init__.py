"""Hand-written GPU kernels the rewritten graphs call where the standard lowering is slow.

``layer_gemv`` (the layer-batched GEMV) and ``decode_attention`` (one new token's attention over
its cache) hold the Triton kernels and their launches; ``ops`` registers every ``snlp::`` custom op
(imported here, so importing any kernel module registers them); ``layer_ops`` and ``attention``
are the functions graphs call, each choosing its kernel from explicit keyword arguments.

Which kernels a transform's rewritten graph may use is its ``SNLPConfig.lowering``
(``options.LoweringOptions``; None: the process defaults, read once from the ``SNLP_*``
environment variables), written into the graph's calls by ``passes.lowering``: two transforms in
one process can lower differently, and nothing here changes once imported. Exports decide from
torch's export state and their own lowering: the opaque ops (PDL launch, fused decode attention)
are never traced into an exported program, and ONNX exports a graph lowered without any kernel.
"""

from __future__ import annotations

from . import decode_attention, layer_gemv, ops

__all__ = ["decode_attention", "layer_gemv", "ops"]
