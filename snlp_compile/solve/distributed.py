"""The layer-parallel solve across processes: one contiguous block of the parallel layers per rank.

Rank r of G holds the weights (and the caller the K/V caches) of layers start_r .. start_r + M_r - 1
only. Per iteration (docs/DESIGN.md section 1, the recurrence h_j = A_j h_{j-1} + D_j):

    g, A      = the block's layers evaluated at once at their current inputs u   (batched, local)
    (P_r, c_r) = the block's total: its composed map P_r = A_last..A_first and its offset c_r, the
                 block's output from a zero input                                 (local)
    all_gather of the G totals                                                    (ONE collective)
    x_r       = (P_{r-1}, c_{r-1}) o .. o (P_0, c_0) applied to h_in: the exclusive scan of the
                ranks before r, i.e. this block's input                           (local, G steps)
    h         = the block's correction from x_r (the single-process correction of one stage)
    u         = [x_r, h_0, .., h_{M_r-2}]

IDN exchanges only c_r (P = I, c_r the block's summed delta); scaled IDN a scalar or elementwise
P_r; HCN the n x n product of the block's stream-mixing matrices. After the last iteration every
rank folds all G totals into the last layer's output, so every rank computes the logits and no
further collective is needed. The block's correction runs twice per iteration, from a zero input
for its total and from x_r for its trace (IDN: a sum and a cumsum): elementwise passes over the
block's rows, small beside its evaluation, and what lets the one collective carry only totals.
The math is the single-process solve's with the stage boundaries at the ranks: the same Jacobi
iteration, so K >= the number of layers is exact and K = 1 equals the single-process K = 1 solve
to rounding.

``mode="pipeline"`` runs the block sequentially instead (the exact sequential model, e.g. the
prefill): rank r receives its input from rank r-1, runs its layers one after another and sends
its output on; the last rank broadcasts the final hidden state.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.fx as fx

from ..ir.plan import SolvePlan
from .deferred import as_tuple, inputs_from_trace
from .solver import LayerParallelSolve

Mode = Literal["solve", "pipeline"]


class DistributedSolve(LayerParallelSolve):
    """Rank ``rank``'s block of a layer-parallel solve (see the module docstring).

    ``plan`` is the block's own plan (its ``num_layers`` = the block's layers, its stacked weights
    only the block's rows); ``total_layers`` the layers of all ranks: the graph around the solve
    indexes the trace with them. ``side_layers`` is the side-output body batched over the block
    (it reads the body's unfused externals, ``body_inputs`` of them)."""

    warm_input: torch.Tensor | None

    def __init__(
        self,
        plan: SolvePlan,
        *,
        group: dist.ProcessGroup,
        total_layers: int,
        side_layers: fx.GraphModule | None,
        body_inputs: int,
        mode: Mode = "solve",
    ):
        super().__init__(plan)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.total_layers = total_layers
        self.block_side_layers = side_layers
        self.body_inputs = body_inputs
        self.mode: Mode = mode
        # init "warm" on ranks > 0: the first layer restarts from the previous call's block input
        self.register_buffer("warm_input", None, persistent=False)

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.world}, mode={self.mode}, " + super().extra_repr()

    def reset_warm(self) -> None:
        super().reset_warm()
        self.warm_input = None

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def forward(
        self, h_in: torch.Tensor, *passed: object, position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(the last layer's output expanded over all layers' rows, *side outputs of this block):
        the graph around the solve reads only the trace's last row (checked when it was built)."""
        ext = self._externals(passed)
        if self.mode == "pipeline":
            u, last = self._pipeline(h_in, ext)
        else:
            u, last = self._solve(h_in, ext)
        trace = last.unsqueeze(0).expand(self.total_layers, *last.shape)
        if self.block_side_layers is None:
            return (trace,)
        side = self.block_side_layers(u, *ext[: self.body_inputs])
        return (trace, *as_tuple(side))

    def _solve(self, h_in: torch.Tensor, ext: list[object]) -> tuple[torch.Tensor, torch.Tensor]:
        """K iterations, one all_gather each: (the block's solved inputs, the last layer's output)."""
        u = self._initial(h_in)
        block_in, last, h = h_in, h_in, h_in
        for _ in range(self.iterations):
            g, a = self._evaluate(u, ext)
            block_in, last = self._exchange(g, a, u, h_in)
            h = self.correct(g, a, u, block_in)
            u = inputs_from_trace(block_in, h)
        if self.init == "warm":
            self.remember(h)
            self._keep("warm_input", block_in)
        return u, last

    def _initial(self, h_in: torch.Tensor) -> torch.Tensor:
        """u^(0): h_in for every layer ("h0"), or the previous call's trace ("warm")."""
        warm = self.warm_trace
        if self.init == "warm" and warm is not None and warm.shape[1:] == h_in.shape:
            first = h_in if self.rank == 0 or self.warm_input is None else self.warm_input
            return inputs_from_trace(first, warm.to(h_in.dtype))
        return h_in.unsqueeze(0).expand(self.num_layers, *h_in.shape)

    def _exchange(
        self, g: torch.Tensor, a: torch.Tensor | float, u: torch.Tensor, h_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' block totals, gathered: (this block's input, the last block's output)."""
        offset = self.correct_last(g, a, u, torch.zeros_like(h_in))[0]
        block_map = self._block_map(a, u)
        payload = offset.reshape(-1)
        if block_map is not None:
            payload = torch.cat([payload, block_map.reshape(-1).to(offset.dtype)])
        gathered = torch.empty(self.world, payload.numel(), dtype=payload.dtype, device=payload.device)
        dist.all_gather(list(gathered.unbind(0)), payload.contiguous(), group=self.group)
        x, block_in = h_in, h_in
        for q in range(self.world):
            if q == self.rank:
                block_in = x
            c_q = gathered[q, : offset.numel()].reshape(offset.shape)
            p_q = None if block_map is None else gathered[q, offset.numel() :].reshape(block_map.shape)
            x = self._apply_total(p_q, c_q, x)
        return block_in, x

    def _block_map(self, a: torch.Tensor | float, u: torch.Tensor) -> torch.Tensor | None:
        """P = A_last .. A_first over the block (damped), as ``correct`` applies the A's; None for
        the identity. The same case analysis as ``correct``."""
        if self.identity_correction:
            return None
        if self.stream_layout is not None:
            if self.use_prefix_products and hasattr(self, "static_init"):
                return self.get_buffer("static_init")[-1]
            assert isinstance(a, torch.Tensor)
            mats = (a * self.damping if self.damping != 1.0 else a).to(u.dtype)
            prod = mats[0]
            for j in range(1, mats.shape[0]):
                prod = mats[j] @ prod
            return prod
        if isinstance(a, float) and a == 1.0 and self.damping == 1.0:
            return None
        if self.static_scalar is not None:
            return self.static_scalar_prod[-1]
        if isinstance(a, float):
            return torch.tensor((a * self.damping) ** self.num_layers, dtype=u.dtype, device=u.device)
        return torch.prod(a * self.damping, dim=0)

    def _apply_total(self, p: torch.Tensor | None, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(p, c) applied to a block input x: p x + c (in the stream view for HCN)."""
        if p is None:
            return x + c
        layout = self.stream_layout
        if layout is None:
            return p * x + c
        z = p @ layout.to_streams(x) + layout.to_streams(c)
        return layout.from_streams(z, tuple(x.shape))

    def _pipeline(self, h_in: torch.Tensor, ext: list[object]) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's layers one after another from the previous rank's output (exact)."""
        x = h_in
        if self.rank > 0:
            x = torch.empty_like(h_in)
            dist.recv(x, src=self._global(self.rank - 1), group=self.group)
        inputs = []
        for j in range(self.num_layers):
            inputs.append(x)
            one = [
                v[j] if mode != "shared" and isinstance(v, torch.Tensor) else v
                for v, mode in zip(ext[: self.body_inputs], self.ext_modes)
            ]
            out = self.body(x, *one)
            x = out[0] if isinstance(out, (tuple, list)) else out
        if self.rank + 1 < self.world:
            dist.send(x.contiguous(), dst=self._global(self.rank + 1), group=self.group)
        last = x.contiguous() if self.rank + 1 == self.world else torch.empty_like(h_in)
        dist.broadcast(last, src=self._global(self.world - 1), group=self.group)
        return torch.stack(inputs), last
