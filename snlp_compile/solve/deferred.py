"""Deferred K/V at run time: the part of the layer-parallel solve that keeps a decode step's side
outputs (its K/V) for the next call (``SNLPConfig.deferred_kv``, ``passes.defer_kv``).

The solve holds the merged first evaluation the pass built (``DeferredPlan``): the previous call's
side values, computed from its corrected inputs and written into their caches, share the weight
reads of this call's first evaluation. What is kept between calls: the previous call's input,
solved trace and position, and the externals the side values read. The trace is kept, not the
inputs it implies ([h_in, h_0 .. h_{N-2}], built where it is read): a copy of the trace fuses
into the kernel that writes it, a copy of its shifted rows took a kernel of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..ir.plan import DeferredPlan


def inputs_from_trace(h_in: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The layer inputs a trace h (N, ...) implies: u_0 = h_in, u_j = h_{j-1}."""
    return torch.cat([h_in.unsqueeze(0), h[:-1]], dim=0)


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class DeferredSideOutputs(nn.Module):
    """The deferred-K/V state of ``LayerParallelSolve`` (its base class; see the module docstring)."""

    deferred_plan: DeferredPlan | None  # what passes.defer_kv handed over (None: no deferral)
    deferred_layers: fx.GraphModule | None
    deferred_saved: list[int]
    deferred_h_in: torch.Tensor | None
    deferred_h: torch.Tensor | None
    deferred_pos: torch.Tensor | None

    if TYPE_CHECKING:  # what the solve provides
        side_layers: fx.GraphModule | None
        skip_constant: float | None
        num_layers: int

        @property
        def num_stages(self) -> int: ...

        def _evaluate(
            self, u: torch.Tensor, ext: list[object], stage: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor | float]: ...

        def _split_evaluation(
            self, out: torch.Tensor | tuple[torch.Tensor, ...], u: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor | float]: ...

        def _keep(self, name: str, value: torch.Tensor) -> None: ...

        def solve_stage(
            self,
            h_in: torch.Tensor,
            ext: list[object],
            stage: int = 0,
            first_evaluation: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | float]]
            | None = None,
            last_row_only: bool = False,
        ) -> torch.Tensor: ...

    def init_deferred(self) -> None:
        """No deferral yet: ``enable_deferred`` turns it on."""
        self.deferred_plan = None
        self.deferred_layers = None
        self.deferred_saved = []
        self.register_buffer("deferred_h_in", None, persistent=False)
        self.register_buffer("deferred_h", None, persistent=False)
        self.register_buffer("deferred_pos", None, persistent=False)

    def enable_deferred(self, deferred: DeferredPlan) -> None:
        """Defer the side outputs (a decode step's K/V) to the next call: ``deferred`` is the
        merged first evaluation ``passes.defer_kv`` built for this solve."""
        if self.side_layers is None or self.num_stages != 1:
            raise ValueError("deferred side outputs need side outputs and one stage")
        self.deferred_plan = deferred
        self.deferred_layers, self.deferred_saved = deferred.layers, list(deferred.saved)
        for i in deferred.saved:
            self.register_buffer(f"deferred_ext_{i}", None, persistent=False)

    @property
    def deferred_pending(self) -> bool:
        """Whether the last call's side outputs are still to be written (by the next call)."""
        return self.deferred_layers is not None and self.deferred_h is not None

    def reset_deferred(self) -> None:
        """Forget the pending side outputs: the next call starts a sequence (writes nothing)."""
        self.deferred_h_in = None
        self.deferred_h = None
        self.deferred_pos = None

    def _solve_deferred(
        self, h_in: torch.Tensor, ext: list[object], position: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """solve_stage with the first evaluation merged with the previous call's side outputs
        (written into their caches by it) and returning this call's provisional ones."""
        provisional: tuple[torch.Tensor, ...] = ()
        ready = self.deferred_h is not None and tuple(self.deferred_h.shape) == (self.num_layers, *h_in.shape)

        def first_evaluation(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
            nonlocal provisional
            assert self.side_layers is not None and self.deferred_layers is not None
            if not ready:  # the first call of a sequence: nothing to write
                provisional = as_tuple(self.side_layers(u, *ext))
                return self._evaluate(u, ext)
            assert self.deferred_h_in is not None and self.deferred_h is not None
            saved = [getattr(self, f"deferred_ext_{i}") for i in self.deferred_saved]
            previous_u = inputs_from_trace(self.deferred_h_in, self.deferred_h)
            out = self.deferred_layers(u, *ext, previous_u, *saved, self.deferred_pos)
            n_body = 1 if self.skip_constant is not None else 2
            provisional = tuple(out[n_body:])
            return self._split_evaluation(out[0] if n_body == 1 else tuple(out[:2]), u)

        h = self.solve_stage(h_in, ext, first_evaluation=first_evaluation)
        self._keep("deferred_h_in", h_in)
        self._keep("deferred_h", h)
        self._keep("deferred_pos", position)
        for i in self.deferred_saved:
            value = ext[i]
            assert isinstance(value, torch.Tensor)
            self._keep(f"deferred_ext_{i}", value)
        return h, provisional
