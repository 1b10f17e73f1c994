"""SolvePlan: everything the layer-parallel solve is built from, decided at transform time.

``passes.plan`` produces it from a ``LayerChain`` (external classification, folded weights, the
layer body and its batched forms, fused weights, the skip's stream layout and static products);
``passes.emit`` and the training regulariser hand it to ``solve.LayerParallelSolve``, which runs
it and analyses no graph. ``DeferredPlan`` is what ``passes.defer_kv`` adds for deferred K/V.

Plans are frozen: a pass that changes one returns a new one (``dataclasses.replace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from ..config import InitKind
from .chain import SkipKind
from .stream_layout import StreamLayout

# the solve's submodule name in a rewritten graph (``transformed.get_submodule(SOLVE_NAME)``)
SOLVE_NAME = "snlp_solve"

ExtMode = Literal["stacked", "runtime", "shared"]
"""How the solve gets one of the body's externals: "stacked" (a buffer of the solve, stacked over
the layers at transform time), "runtime" (passed in, stacked over the layers by the graph),
"shared" (passed in, the same for every layer)."""


@dataclass(frozen=True)
class External:
    """One of the body's inputs after the hidden state.

    ``column``: the value each parallel layer reads in the captured graph (one node per layer; the
    same node for a shared one; empty for a weight the plan made itself, e.g. fused q/k/v)."""

    name: str
    mode: ExtMode
    column: tuple[fx.Node, ...] = ()


@dataclass(frozen=True)
class RowBlock:
    """A stacked weight that is rows ``start .. start + rows`` (dim 1) of another stacked weight
    (q, k, v of a fused q/k/v weight): the solve keeps it a view of ``base`` across ``.to()``."""

    base: str
    start: int
    rows: int


@dataclass(frozen=True)
class WeightSources:
    """Which model attributes the solve's stacked weights copy, so that a caller holding the
    model (the torch.compile backend) can make its weights views of them instead of checking
    the copies for staleness on every call.

    rows: stacked name -> the attribute (get_attr target of the captured graph) whose plain copy
        each layer's row is, for the stacked weights whose every row is one;
    folded: attributes something else was computed from at transform time (a stacked value that
        is not a plain copy, the static skip products): a view cannot follow an edit of them."""

    rows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    folded: frozenset[str] = frozenset()

    def layers(self, start: int, stop: int) -> WeightSources:
        """The sources of layers ``start .. stop - 1`` (a block of the stacked rows)."""
        return WeightSources({k: v[start:stop] for k, v in self.rows.items()}, self.folded)


@dataclass(frozen=True)
class WideLayers:
    """Wide-layer fusion (``SNLPConfig.fused_layers``, ``passes.wide_layers``): groups of ``group``
    consecutive layers, each group one wide layer reading one input x.

    first: the layers' first residual half (h -> h + attention branch), batched over all N layers;
    second: their second half (s -> s + MLP branch), likewise. The wide layer of group c computes
    y = x + sum_j (first_j(x) - x), out = y + sum_j (second_j(y) - y) over its layers j.
    split: the body node between the halves (for the report)."""

    group: int
    first: fx.GraphModule
    second: fx.GraphModule
    split: str = ""


@dataclass(frozen=True)
class SolveOptions:
    """The solve's run-time knobs (SNLPConfig's; may change after transform, e.g. K)."""

    iterations: int = 1
    init: InitKind = "h0"
    damping: float = 1.0


@dataclass(frozen=True)
class SolvePlan:
    """The layer-parallel solve of ``num_layers`` structurally identical layers.

    body: the template layer, (h, *externals) -> out, or (out, skip coefficient) when the
        coefficient is not a constant.
    layers: the body batched over a leading layer axis of ``stage_sizes[0]`` layers (None with
        ``wide``: wide layers are evaluated by their two halves, never layer by layer);
        layers_short: over the other stage size when the stages differ (at most two sizes; the
        smaller one for SNLPConfig.stages as a count), else None.
    side_body / side_layers: the part of the body computing the layers' side outputs (a decode
        step's new K/V) and its batched form over all ``num_layers``; None without side outputs.
    externals: the body's inputs after h, in order; stacked: the "stacked" ones' values (N, ...),
        plus fused weights; row_blocks: which stacked weights are views of which.
    skip_kind / skip_constant: the correction recurrence; the skip coefficient when it is a
        number (1.0 for IDN), else None (the body returns it).
    stream_layout: HCN's view of h as streams ("matrix" skips), else None.
    static_skip: every layer's skip coefficient when it depends on stacked weights alone
        (folded at transform time: nanochat's scalars, static H), concatenated over the stages.
    last_row_only: the graph reads only the last layer's output (a forward).
    wide: wide-layer fusion (``WideLayers``): the solve's chain is then N / wide.group wide
        layers (its trace has that many rows), their correction the identity's; None: none.
    fused: the stacked weights made by fusing linears that share an input (``fuse_linears``).
    sources: which model attributes the stacked weights copy (``WeightSources``).
    fallbacks: the body ops batched by torch.vmap (no batching rule).
    notes: what building the plan decided (batching fallbacks, fused weights), for the report.
    """

    num_layers: int
    skip_kind: SkipKind
    skip_constant: float | None
    body: fx.GraphModule
    layers: fx.GraphModule | None
    externals: tuple[External, ...]
    stacked: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row_blocks: Mapping[str, RowBlock] = field(default_factory=dict)
    stage_sizes: tuple[int, ...] = ()
    layers_short: fx.GraphModule | None = None
    side_body: fx.GraphModule | None = None
    side_layers: fx.GraphModule | None = None
    stream_layout: StreamLayout | None = None
    static_skip: torch.Tensor | None = None
    options: SolveOptions = SolveOptions()
    last_row_only: bool = False
    wide: WideLayers | None = None
    fused: tuple[str, ...] = ()
    sources: WeightSources = WeightSources()
    fallbacks: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = self.stage_sizes or (self.num_layers,)
        if sum(sizes) != self.num_layers or min(sizes) < 1:
            raise ValueError(f"stage_sizes {sizes}: positive, adding up to {self.num_layers}")
        if (len(set(sizes)) > 1) != (self.layers_short is not None) or len(set(sizes)) > 2:
            raise ValueError(f"stage_sizes {sizes}: at most two sizes, layers_short iff they differ")
        if (self.skip_kind == "matrix") != (self.stream_layout is not None):
            raise ValueError("a 'matrix' skip needs its stream_layout, and only it has one")
        object.__setattr__(self, "stage_sizes", tuple(int(m) for m in sizes))
        if self.wide is not None and (self.num_layers % self.wide.group or len(sizes) > 1):
            raise ValueError(f"wide layers of {self.wide.group}: one stage of a multiple of them")
        if (self.layers is None) != (self.wide is not None):
            raise ValueError("the per-layer batched body is built exactly when the layers are not wide")
        if any(len(targets) != self.num_layers for targets in self.sources.rows.values()):
            raise ValueError(f"sources: one attribute per layer ({self.num_layers}) for each stacked weight")

    @property
    def num_rows(self) -> int:
        """Rows of the solved trace: the layers, or the wide layers with fusion."""
        return self.num_layers // (self.wide.group if self.wide is not None else 1)

    def trace_row(self, layer: int) -> int:
        """The trace row holding parallel layer ``layer``'s output: with wide layers, the row of the
        wide layer holding it (its output when it is the wide layer's last; for another layer only
        a metadata check reads it, ``passes.wide_layers.check_fusable``: the same shape and dtype)."""
        return layer if self.wide is None else layer // self.wide.group

    @property
    def ext_names(self) -> list[str]:
        return [e.name for e in self.externals]

    @property
    def ext_modes(self) -> list[ExtMode]:
        return [e.mode for e in self.externals]

    @property
    def passed(self) -> tuple[External, ...]:
        """The externals the graph passes to the solve (not stacked), in call order."""
        return tuple(e for e in self.externals if e.mode != "stacked")


@dataclass(frozen=True)
class DeferredPlan:
    """Deferred K/V (``passes.defer_kv``): the merged first evaluation of a decode step.

    layers: (u, *externals, u_prev, *prev side externals, pos_prev) -> (*body outputs,
        *provisional side outputs), writing the previous call's side outputs into their caches;
    saved: indices of the externals whose previous-call values the solve keeps;
    shared: the weight reads the merged evaluation shares (for the report)."""

    layers: fx.GraphModule
    saved: tuple[int, ...]
    shared: tuple[str, ...] = ()
