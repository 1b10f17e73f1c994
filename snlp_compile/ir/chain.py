"""LayerChain: the IR of the analysis, over the captured graph (docs/DESIGN.md section 2).

It records, over one captured ``torch.fx`` graph, which nodes make up each residual layer, which
tensor carries the hidden state from layer to layer, what each layer reads from outside (weights,
x0, rotary tables, masks) and who else reads the hidden states (final norm, backout readers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.fx as fx

from .coef import Coef
from .matexpr import StreamMix

SkipKind = Literal["identity", "elementwise", "matrix"]
# the skip coefficient: a scalar expression ("identity": Const(1); "elementwise") or a
# stream-mixing matrix ("matrix", HCN)
SkipCoefficient = Coef | StreamMix


@dataclass
class Layer:
    """One residual layer as a region of the captured graph."""

    index: int
    module_path: str
    hidden_in: fx.Node
    output: fx.Node
    nodes: list[fx.Node]  # the region: depends on hidden_in and feeds output (topological order)
    externals: list[fx.Node]  # what the region reads from outside, aligned with the template's order
    # region values the rest of the model also reads (a decode step's new K/V), aligned likewise
    side_outputs: list[fx.Node] = field(default_factory=list)


@dataclass
class SkipPath:
    """The linear part S of the layer map g(h) = S h + b(h): the surrogate Jacobian A = S.

    coefficient is an expression tree over the template's externals (``ir.coef``) or, for HCN, a
    stream-mixing matrix expression (``ir.matexpr.StreamMix``); kind says how the correction
    recurrence is solved.
    """

    kind: SkipKind
    coefficient: SkipCoefficient
    description: str


@dataclass
class HiddenReader:
    """A node outside the layers that reads a hidden state of the chain."""

    layer_index: int  # reads the output of this layer (-1: the chain's input)
    node: fx.Node
    module_path: str


@dataclass
class LayerChain:
    container: str  # module path of the ModuleList holding the layers
    layers: list[Layer]  # every layer of the chain, parallel or not
    first_parallel: int  # index of the first layer solved in parallel
    template: Layer  # the layer whose region is the body evaluated for all parallel layers
    skip: SkipPath
    readers: list[HiddenReader] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def parallel_layers(self) -> list[Layer]:
        return self.layers[self.first_parallel :]

    @property
    def num_parallel(self) -> int:
        return len(self.layers) - self.first_parallel
