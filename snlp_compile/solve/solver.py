"""The layer-parallel solve: K batched evaluations of all parallel layers, each followed by the
structured Newton correction (docs/DESIGN.md section 1).

    u^(0)   = h_in for every layer           (init "h0"; "batch_fwd" seeds u_{j+1} = g_j(h_in))
    G, A    = vmap(body)(u^(k))             one evaluation of every layer at its current input
    h_j     = a A_j h_{j-1} + G_j - a A_j u_j   the correction: prefix sum (A = I, a = 1) or scan
    u^(k+1) = [h_in, h_0, ..., h_{N-2}]

The body is the template layer's graph with its weights as arguments, batched over a leading
layer axis and the stacked weights of all layers (passes.batch_layers), so the number of matmuls per iteration does not depend
on the number of layers. Everything here is plain tensor code: eager, torch.compile, torch.export
and ONNX export all see the same ops.

Stages (SNLPConfig.stages = S): the N layers are split into S consecutive stages, solved one after
another, each exactly as above with the previous stage's last output as its h_in; the weights and
the runtime externals of stage c are views of rows start_c .. start_c + M_c - 1 of the stacked
ones, and the precomputed products of the static corrections restart at every stage. One batched
body per distinct stage size (at most two): S evaluations per iteration, whatever N.

Wide layers (SNLPConfig.fused_layers = M, plan.wide): the chain is N/M wide layers, each the sum
of its M layers' first halves at its input, then of their second halves at that sum; each half is
one batched evaluation over all N layers at their wide layer's input repeated M times
(``_evaluate_wide``). The trace has N/M rows; the correction between wide layers is the identity's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

from ..ir.plan import SolvePlan
from ..ir.stream_layout import StreamLayout
from .deferred import DeferredSideOutputs, as_tuple, inputs_from_trace
from .scan import (
    apply_prefix_products,
    elementwise_affine_scan,
    identity_scan,
    matrix_affine_scan,
    static_init_products,
    static_prefix_products,
)


class LayerParallelSolve(DeferredSideOutputs):
    """Solves N structurally identical residual layers in parallel, as ``plan`` says (``ir.plan``).

    Runs the plan and analyses no graph: the body and its batched forms, the stacked weights, the
    skip's stream layout and static coefficients all come with the plan. The plan itself is not
    kept (it holds the transform-time tensors, which ``.to()`` would leave behind); what running
    needs becomes the module's buffers and attributes. ``iterations`` and ``init`` may be changed
    after construction.
    """

    # buffers (registered in __init__; None where the plan has nothing to keep)
    warm_trace: torch.Tensor | None
    static_skip: torch.Tensor
    static_scalar: torch.Tensor | None
    static_scalar_prod: torch.Tensor
    static_scalar_inv_prod: torch.Tensor
    layers: fx.GraphModule | None
    layers_short: fx.GraphModule | None
    side_layers: fx.GraphModule | None
    wide_first: fx.GraphModule | None
    wide_second: fx.GraphModule | None

    def __init__(self, plan: SolvePlan):
        super().__init__()
        self.body = plan.body
        self.layers = plan.layers
        sizes = list(plan.stage_sizes)
        self.stage_sizes = sizes
        self.stage_starts = [sum(sizes[:c]) for c in range(len(sizes))]
        # the body batched over the smaller stage size, when the stages are uneven
        self.layers_short = plan.layers_short
        self.ext_names = plan.ext_names
        self.ext_modes = plan.ext_modes
        for name, value in plan.stacked.items():
            self.register_buffer(f"stacked_{name}", value)
        # stacked weights that are row blocks of a fused one (q/k/v of fused q/k/v): rebuilt as views
        # after .to()/.half()/.cuda(), which move every buffer on its own and would duplicate them
        self.row_blocks = dict(plan.row_blocks)
        # which model attributes the stacked weights copy (the torch.compile backend aliases them)
        self.weight_sources = plan.sources
        self.num_layers = plan.num_layers
        # wide-layer fusion (SNLPConfig.fused_layers): groups of wide_group layers, each one wide
        # layer; the trace then has num_rows = N / wide_group rows (_evaluate_wide)
        self.wide_group = plan.wide.group if plan.wide is not None else 1
        self.wide_first = plan.wide.first if plan.wide is not None else None
        self.wide_second = plan.wide.second if plan.wide is not None else None
        self.num_rows = plan.num_rows
        self.skip_kind = plan.skip_kind
        self.skip_constant = plan.skip_constant
        self.iterations = plan.options.iterations
        self.init = plan.options.init
        self.damping = float(plan.options.damping)
        # side outputs (a decode step's new K/V): the batched part of the body computing them,
        # evaluated once more at the corrected inputs after the last iteration
        self.side_body = plan.side_body
        self.side_layers = plan.side_layers
        # the graph reads only the trace's last row (returns_last_row_only)
        self.last_row_only = plan.last_row_only
        # IDN's correction (A = I) whatever the skips: the baseline of identity_surrogate()
        self.identity_correction = False
        # init "warm": the previous call's solved trace (N, *h_in.shape); None until the first call
        self.register_buffer("warm_trace", None, persistent=False)
        self.init_deferred()  # deferred K/V (solve.deferred): off until enable_deferred()
        self.stream_layout = plan.stream_layout
        # HCN with static H: A, and per stage the transfer matrices T[j, i] = A_j..A_{i+1} and
        # P_j = A_j..A_0 (j, i counted from the stage's first layer), computed once here; the
        # correction is then one block matmul instead of a scan.
        self.use_prefix_products = False
        static = plan.static_skip
        if self.stream_layout is not None and static is not None:
            # products in float64 (bf16 products of 32 layers would drift)
            a = static.double() * self.damping
            flat = a.reshape(a.shape[0], *a.shape[-2:])
            self.register_buffer("static_skip", a.to(static.dtype))
            for c, (start, size) in enumerate(zip(self.stage_starts, self.stage_sizes)):
                part = flat[start : start + size]
                transfer = static_prefix_products(part, matrix=True).to(static.dtype)
                self.register_buffer(self._stage_name("static_transfer", c), transfer)
                init_products = static_init_products(part, matrix=True).to(static.dtype)
                self.register_buffer(self._stage_name("static_init", c), init_products)
            self.use_prefix_products = True
        # Scaled IDN with per-layer scalars folded at transform time (nanochat's resid_lambdas):
        # with P_j = a_j..a_0, h_j = P_j (h_in + sum_{i<=j} d_i / P_i): one cumsum over the layer
        # axis (one pass over the trace, like IDN) instead of log2(N) scan levels that each re-read
        # it. Kept to well-conditioned products, where dividing by P_i loses nothing measurable.
        # With stages, the products restart at each stage's first layer.
        self.register_buffer("static_scalar", None)
        if (
            plan.skip_kind == "elementwise"
            and plan.skip_constant is None
            and self.stream_layout is None
            and static is not None
            and static.numel() == self.num_layers
            and self.wide_first is None  # (wide layers correct with the identity)
        ):
            a64 = static.reshape(self.num_layers).double() * self.damping
            p64 = torch.cat([torch.cumprod(part, dim=0) for part in a64.split(self.stage_sizes)])
            if bool((p64.abs() > 0).all()) and float(p64.abs().max() / p64.abs().min()) <= 1e4:
                self.register_buffer("static_scalar", a64.to(static.dtype))
                self.register_buffer("static_scalar_prod", p64.to(static.dtype))
                self.register_buffer("static_scalar_inv_prod", (1.0 / p64).to(static.dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> LayerParallelSolve:
        """Module._apply (behind .to(), .cuda(), .half(), ...), then the row-block weights made views
        of their fused weight again, so a moved solve still holds each weight once."""
        out = super()._apply(fn, recurse)
        for name, block in self.row_blocks.items():
            base = self._buffers[f"stacked_{block.base}"]
            assert base is not None
            self._buffers[f"stacked_{name}"] = base[:, block.start : block.start + block.rows]
        return out

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    def _stage_name(self, name: str, stage: int) -> str:
        """Buffer name of a per-stage precomputed product (unchanged names for one stage)."""
        return name if self.num_stages == 1 else f"{name}_{stage}"

    def _layers_of(self, stage: int) -> fx.GraphModule:
        """The batched body for a stage's size (a plan of wide layers has none: _evaluate_wide)."""
        assert self.layers is not None
        if self.stage_sizes[stage] == self.stage_sizes[0] or self.layers_short is None:
            return self.layers
        return self.layers_short

    def _rows(self, t: torch.Tensor, stage: int | None) -> torch.Tensor:
        """A stage's rows of a tensor over all N layers (a view); the tensor itself for one stage."""
        if stage is None or self.num_stages == 1:
            return t
        start = self.stage_starts[stage]
        return t[start : start + self.stage_sizes[stage]]

    def extra_repr(self) -> str:
        stages = f"stages={self.num_stages}" + (f" {self.stage_sizes}" if self.num_stages > 1 else "")
        return (
            f"num_layers={self.num_layers}, iterations={self.iterations}, init={self.init!r}, "
            f"damping={self.damping}, skip={self.skip_kind}, {stages}"
            + (f", wide layers of {self.wide_group}" if self.wide_first is not None else "")
        )

    def _externals(self, passed: tuple[object, ...]) -> list[object]:
        values: list[object] = []
        it = iter(passed)
        for name, mode in zip(self.ext_names, self.ext_modes):
            values.append(getattr(self, f"stacked_{name}") if mode == "stacked" else next(it))
        return values

    def _stage_externals(self, ext: list[object], stage: int) -> list[object]:
        """A stage's externals: rows of the stacked and runtime ones (views), shared ones as is."""
        if self.num_stages == 1:
            return ext
        return [
            v if mode == "shared" or not isinstance(v, torch.Tensor) else self._rows(v, stage)
            for v, mode in zip(ext, self.ext_modes)
        ]

    def _evaluate(
        self, u: torch.Tensor, ext: list[object], stage: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """All layers (of a stage) at once: g_j(u_j) and their skip coefficients A_j."""
        if self.wide_first is not None:
            return self._evaluate_wide(u, ext), 1.0
        return self._split_evaluation(self._layers_of(stage)(u, *ext), u)

    def _spread(self, x: torch.Tensor) -> torch.Tensor:
        """Wide layers' inputs (C, ...) as the inputs of their N = C * M layers (each repeated)."""
        m = self.wide_group
        return x.unsqueeze(1).expand(x.shape[0], m, *x.shape[1:]).reshape(x.shape[0] * m, *x.shape[1:])

    def _group_sum(self, d: torch.Tensor) -> torch.Tensor:
        """Per-layer increments (N, ...) summed over each wide layer's M layers: (C, ...)."""
        return d.reshape(d.shape[0] // self.wide_group, self.wide_group, *d.shape[1:]).sum(1)

    def _evaluate_wide(self, u: torch.Tensor, ext: list[object]) -> torch.Tensor:
        """The wide layers at their inputs u (C, ...): every layer's first half (attention) at its
        wide layer's input, y = u + their increments summed; every second half (MLP) at y, out =
        y + theirs (``passes.wide_layers``). The correction between wide layers is the identity's."""
        assert self.wide_first is not None and self.wide_second is not None
        x = self._spread(u)
        y = u + self._group_sum(self.wide_first(x, *ext) - x)
        z = self._spread(y)
        return y + self._group_sum(self.wide_second(z, *ext) - z)

    def _split_evaluation(
        self, out: torch.Tensor | tuple[torch.Tensor, ...], u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """A batched body's result as (g, A), A aligned for correct()."""
        if self.skip_constant is not None:
            return out, self.skip_constant  # type: ignore[return-value]
        g, a = out
        if self.stream_layout is not None:
            return g, a  # (N, *batch, n, n): aligned against the stream view in correct()
        # right-align the per-layer coefficient (N, *s) against the hidden state (N, *h)
        a = a.reshape(a.shape[:1] + (1,) * (u.dim() - a.dim()) + a.shape[1:])
        return g, a

    def correct(
        self,
        g: torch.Tensor,
        a: torch.Tensor | float,
        u: torch.Tensor,
        h_in: torch.Tensor,
        stage: int | None = None,
    ) -> torch.Tensor:
        """The structured Newton correction: h_j = a_j h_{j-1} + (g_j - a_j u_j), over the layers of
        one stage (``stage`` selects its precomputed products; None: the only stage)."""
        if self.identity_correction:  # (identity_surrogate)
            return identity_scan(g - u, h_in)
        if self.stream_layout is not None:
            assert isinstance(a, torch.Tensor)
            return self.correct_streams(g, a, u, h_in, self.stream_layout, stage)
        summed = self._summed_increments(g, a, u, stage)
        if summed is not None:
            d, products = summed
            h = identity_scan(d, h_in)
            return h if products is None else products * h
        a = a * self.damping
        if isinstance(a, float):
            a = torch.full((u.shape[0],) + (1,) * (u.dim() - 1), a, dtype=u.dtype, device=u.device)
        return elementwise_affine_scan(a, g - a * u, h_in)

    def correct_last(
        self,
        g: torch.Tensor,
        a: torch.Tensor | float,
        u: torch.Tensor,
        h_in: torch.Tensor,
        stage: int | None = None,
    ) -> torch.Tensor:
        """The last row of :meth:`correct`'s trace, as (1, ...): all a graph that reads only the
        last layer's output (a forward) needs. With identity or folded scalar skips it is a sum
        over the layers instead of a prefix sum, so the correction writes one row instead of N
        (at T=2048 on the 0.5B shape the scan wrote a 84 MB trace of which one row was read);
        other recurrences take their full trace's last row."""
        summed = self._summed_increments(g, a, u, stage)
        if summed is None:
            return self.correct(g, a, u, h_in, stage)[-1:]
        d, products = summed
        h = (h_in + d.sum(0)).unsqueeze(0)
        return h if products is None else products[-1:] * h

    def _summed_increments(
        self, g: torch.Tensor, a: torch.Tensor | float, u: torch.Tensor, stage: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(d, P) with h_j = P_j (h_in + sum_{i<=j} d_i) where the recurrence is a plain sum:
        identity skips (P None) and per-layer scalars folded at transform time; else None."""
        if self.stream_layout is not None:
            return None
        if isinstance(a, float) and a == 1.0 and self.damping == 1.0:
            return g - u, None
        if self.static_scalar is None:
            return None
        shape = (-1,) + (1,) * (u.dim() - 1)
        a = self._rows(self.static_scalar, stage).reshape(shape)
        d = (g - a * u) * self._rows(self.static_scalar_inv_prod, stage).reshape(shape)
        return d, self._rows(self.static_scalar_prod, stage).reshape(shape)

    def correct_streams(
        self,
        g: torch.Tensor,
        a: torch.Tensor,
        u: torch.Tensor,
        h_in: torch.Tensor,
        layout: StreamLayout,
        stage: int | None = None,
    ) -> torch.Tensor:
        """HCN: the same recurrence in the stream view Z = (*batch, n, m), A_j an n x n matrix:
        a log-depth scan, or (static H) the precomputed prefix products."""
        c = stage or 0
        prefix = self.use_prefix_products and hasattr(self, self._stage_name("static_transfer", c))
        if prefix:
            a = self._rows(self.static_skip, stage)
        elif self.damping != 1.0:
            a = a * self.damping
        zu, zg = layout.to_streams(u), layout.to_streams(g)
        # (models may mix in float32, e.g. the hyper-connections package: correct in h's dtype)
        a = a.to(zu.dtype).reshape(a.shape[:1] + (1,) * (zu.dim() - a.dim()) + a.shape[1:])
        d, z_in = zg - a @ zu, layout.to_streams(h_in)
        if prefix:
            transfer = getattr(self, self._stage_name("static_transfer", c))
            init = getattr(self, self._stage_name("static_init", c))
            z = apply_prefix_products(transfer, d, z_in, True, init)
        else:
            z = matrix_affine_scan(a, d, z_in)
        return layout.from_streams(z, tuple(h_in.shape))

    def initial_inputs(self, h_in: torch.Tensor, ext: list[object], stage: int = 0) -> torch.Tensor:
        """u^(0) of a stage (of all layers for one stage). "warm" starts layer j+1 from the previous
        call's solved h_j (in decoding: the previous token's trace; with stages, that stage's rows of
        it); its first call, or one whose shapes differ, starts from h0."""
        u = h_in.unsqueeze(0).expand((self.stage_sizes[stage] // self.wide_group, *h_in.shape))
        if self.init == "batch_fwd":
            g, _ = self._evaluate(u, ext, stage)
            u = inputs_from_trace(h_in, g)
        elif self.init == "warm" and self._has_warm_trace(h_in):
            assert self.warm_trace is not None
            rows = self._rows(self.warm_trace, stage)
            u = inputs_from_trace(h_in, rows.to(h_in.dtype))
        return u

    def returns_last_row_only(self) -> bool:
        """Whether a call returns only the trace's last row, (1, ...): the rewrite found that the
        graph reads nothing else (``last_row_only``), and neither side outputs nor a warm start
        need the rest of the trace. The graph indexes the trace with -1 either way."""
        return (
            self.last_row_only
            and self.side_layers is None
            and self.deferred_layers is None
            and self.init != "warm"
        )

    def _has_warm_trace(self, h_in: torch.Tensor) -> bool:
        prev = self.warm_trace
        return prev is not None and tuple(prev.shape) == (self.num_rows, *h_in.shape)

    def remember(self, h: torch.Tensor) -> None:
        """Keep the solved trace for the next call's warm start, in place when the shapes allow
        (a captured CUDA graph keeps writing the same buffer)."""
        self._keep("warm_trace", h)

    def reset_warm(self) -> None:
        """Forget the previous trace: the next call starts from h0 (e.g. a new sequence)."""
        self.warm_trace = None

    def solve_stage(
        self,
        h_in: torch.Tensor,
        ext: list[object],
        stage: int = 0,
        first_evaluation: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]] | None = None,
        last_row_only: bool = False,
    ) -> torch.Tensor:
        """K iterations over one stage's layers from its input ``h_in``: the stage's solved trace.
        ``ext`` are the stage's externals (:meth:`_stage_externals`); ``first_evaluation(u)``, when
        given, replaces the first iteration's evaluation (deferred side outputs); ``last_row_only``:
        the last iteration corrects only the stage's last row (:meth:`correct_last`)."""
        u = self.initial_inputs(h_in, ext, stage)
        h = u
        # after k iterations the stage's first k layers are exact: more than its size change nothing
        iterations = min(self.iterations, self.stage_sizes[stage] // self.wide_group)
        for step in range(iterations):
            if step == 0 and first_evaluation is not None:
                g, a = first_evaluation(u)
            else:
                g, a = self._evaluate(u, ext, stage)
            if last_row_only and step + 1 == iterations:
                return self.correct_last(g, a, u, h_in, stage)
            h = self.correct(g, a, u, h_in, stage)
            if step + 1 < iterations:
                u = inputs_from_trace(h_in, h)
        return h

    def _keep(self, name: str, value: torch.Tensor) -> None:
        """``self.<name> = value``, copied in place when the buffer fits (a CUDA graph keeps
        writing the same memory)."""
        prev = getattr(self, name)
        if (
            isinstance(prev, torch.Tensor)
            and prev.shape == value.shape
            and prev.dtype == value.dtype
            and prev.device == value.device
        ):
            prev.copy_(value)
        else:
            setattr(self, name, value.detach().clone())

    def forward(
        self, h_in: torch.Tensor, *passed: object, position: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The solved trace: (N, *h_in.shape), the outputs of the N parallel layers; with side
        outputs, (trace, *side outputs each stacked over the N layers). With deferred side
        outputs, ``position`` is the step's position input: the previous call's side outputs are
        written at the position it had, and the ones returned are provisional (at u^(0))."""
        ext = self._externals(passed)
        if self.deferred_layers is not None:
            if position is None:
                raise ValueError("a solve with deferred side outputs is called with position=")
            h, provisional = self._solve_deferred(h_in, ext, position)
            if self.init == "warm":
                self.remember(h)
            return (h, *provisional)
        last = self.returns_last_row_only()
        if self.num_stages == 1:
            h = self.solve_stage(h_in, ext, last_row_only=last)
        else:
            parts, x = [], h_in
            for c in range(self.num_stages):  # (a stage hands on only its last row)
                part = self.solve_stage(x, self._stage_externals(ext, c), c, last_row_only=last)
                parts.append(part)
                x = part[-1]
            h = parts[-1] if last else torch.cat(parts, dim=0)
        if self.init == "warm":
            self.remember(h)
        if self.side_layers is None:
            return h
        # Side outputs at the corrected inputs u_j = h_{j-1} of the solved trace, not at the
        # inputs of the last evaluation: what the layers hand out (K/V for the cache) is then what
        # each layer computes from the input the returned trace says it had. One evaluation over
        # all N layers, staged or not.
        # (wide layers: every layer's side outputs at its wide layer's input)
        inputs = inputs_from_trace(h_in, h)
        if self.wide_first is not None:
            inputs = self._spread(inputs)
        return (h, *as_tuple(self.side_layers(inputs, *ext)))


@contextmanager
def identity_surrogate(solve: LayerParallelSolve) -> Iterator[None]:
    """Inside the block, ``solve`` corrects as if every skip were the identity (IDN's correction,
    A = I) whatever its skips are: the baseline a structured (HCN) correction is measured against
    (``tests/test_hcn.py``, ``benchmarks/hcn_convergence.py``)."""
    saved, solve.identity_correction = solve.identity_correction, True
    try:
        yield
    finally:
        solve.identity_correction = saved
