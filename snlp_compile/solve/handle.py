"""SolveHandle: the public run-time handle of a transformed model's solve.

Code that drives a rewritten model (``Decoder``, the evaluator, ``solve_trace``, benchmarks)
reads and changes the solve's run-time state through this handle instead of the solve module's
attributes: the iteration count K and the init, the warm-start trace, and the deferred K/V still
to be written.

    handle = SolveHandle.of(fast)        # None for a model transform() did not rewrite
    handle.iterations = 2                # K for the following calls
    handle.reset()                       # a new sequence: no warm start, nothing pending
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx

from ..config import InitKind
from ..ir.plan import SOLVE_NAME
from .solver import LayerParallelSolve


class SolveHandle:
    """The run-time state of one ``LayerParallelSolve`` (see the module docstring)."""

    def __init__(self, solve: LayerParallelSolve) -> None:
        self.solve = solve

    @staticmethod
    def of(transformed: Any) -> SolveHandle | None:
        """The handle of a transformed model's solve, also through ``torch.compile``'s wrapper
        (``_orig_mod``); None when ``transformed`` holds no solve."""
        module = getattr(transformed, "_orig_mod", transformed)
        if isinstance(module, fx.GraphModule) and hasattr(module, SOLVE_NAME):
            solve = module.get_submodule(SOLVE_NAME)
            if isinstance(solve, LayerParallelSolve):
                return SolveHandle(solve)
        return None

    @property
    def num_layers(self) -> int:
        """How many layers the solve runs in parallel."""
        return self.solve.num_layers

    @property
    def iterations(self) -> int:
        """K, the number of batched evaluations per call."""
        return self.solve.iterations

    @iterations.setter
    def iterations(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"iterations must be an int >= 1, got {k!r}")
        self.solve.iterations = k

    @property
    def init(self) -> InitKind:
        return self.solve.init

    @init.setter
    def init(self, init: InitKind) -> None:
        if init not in ("h0", "batch_fwd", "warm"):
            raise ValueError(f"init must be 'h0', 'batch_fwd' or 'warm', got {init!r}")
        self.solve.init = init
        self.solve.reset_warm()

    @property
    def deferred(self) -> bool:
        """Whether the solve defers its side outputs (``SNLPConfig.deferred_kv``): the K/V a call
        returns are provisional, the next call writes the corrected ones."""
        return self.solve.deferred_layers is not None

    @property
    def pending(self) -> bool:
        """Whether the last call's K/V are still to be written (by the next call or a flush)."""
        return self.solve.deferred_pending

    @property
    def pending_position(self) -> torch.Tensor | None:
        """The position input of the call whose K/V are pending (a copy), else None."""
        pos = self.solve.deferred_pos
        return pos.clone() if self.pending and isinstance(pos, torch.Tensor) else None

    def forget_pending(self) -> None:
        """Drop the pending K/V: the next call starts a sequence and writes nothing."""
        self.solve.reset_deferred()

    @property
    def trace(self) -> torch.Tensor | None:
        """A copy of the warm-start trace the next call starts from (the last call's solved
        trace, init "warm"), or None (the next call starts from h0)."""
        trace = self.solve.warm_trace
        return None if trace is None else trace.clone()

    def restore_trace(self, trace: torch.Tensor | None) -> None:
        """Make ``trace`` (from :attr:`trace`) the warm start of the next call; None: start from
        h0. Speculative decoding rewinds the draft's warm start to the last accepted position."""
        if trace is None:
            self.solve.reset_warm()
        else:
            self.solve.remember(trace)

    @property
    def has_trace(self) -> bool:
        """Whether the next call starts from a warm-start trace (no copy, unlike :attr:`trace`)."""
        return self.solve.warm_trace is not None

    def attach_trace(self, buffer: torch.Tensor) -> None:
        """Make ``buffer`` itself (not a copy) the warm-start trace: a CUDA graph captured with it
        reads and writes that memory, and later :meth:`restore_trace` calls copy into it."""
        self.solve.warm_trace = buffer

    def reset(self) -> None:
        """A new sequence: no warm-start trace, no pending K/V."""
        self.solve.reset_warm()
        self.solve.reset_deferred()

    @contextmanager
    def whole_trace(self, iterations: int | None = None) -> Iterator[None]:
        """Inside the block the solve returns its whole trace (no last-row solve) and runs
        ``iterations`` (default: its own K)."""
        solve = self.solve
        saved = solve.iterations, solve.last_row_only
        try:
            if iterations is not None:
                self.iterations = iterations
            solve.last_row_only = False
            yield
        finally:
            solve.iterations, solve.last_row_only = saved

    def variant(self, iterations: int, init: InitKind | None = None) -> LayerParallelSolve:
        """A copy of the solve sharing its weights (not copied) with its own K, init and run-time
        state: one transform() serves every K and init."""
        solve = copy.copy(self.solve)
        solve._buffers = dict(solve._buffers)
        handle = SolveHandle(solve)
        handle.iterations = iterations
        handle.forget_pending()
        if init is not None:
            handle.init = init
        return solve


def solve_handle(transformed: Any) -> SolveHandle:
    """``SolveHandle.of(transformed)``, or a ValueError for a model that holds no solve."""
    handle = SolveHandle.of(transformed)
    if handle is None:
        raise ValueError(f"{type(transformed).__name__} holds no SNLP solve: pass what transform() returned")
    return handle
