"""CUDA graphs of speculative decoding's steps (``Decoder(..., cuda_graphs=True)``, CUDA only).

Captured at a decoder's first speculative generate(), on its caches (cleared afterwards), each
replay including its cache writes:
- ``blocks[g]`` (greedy): g draft steps in one replay, each feeding its argmax to the next, with
  the drafts and the warm-start traces after each step in static buffers;
- ``draft`` (sampling): one draft step (the sample is drawn outside, by the rule's generator);
- ``verify[g]``: the verifier on g + 1 tokens; ``single``: the verifier on one token (where fewer
  tokens are left than a block needs, the rounds finish one sequential step at a time).
A greedy round is then two replays, the acceptance rule and one host synchronisation (how many
tokens were accepted). The block sizes: the decoder's, or with an adaptive block size every size
up to it.

Warm init: one trace buffer, shaped by an eager call, is the solve's warm-start trace while the
graphs run (``SolveHandle.attach_trace``): every graph reads and writes that memory, rewinding it
after a rejection (``restore_trace``) copies into it, and each graph has an h0 variant for the
first draft of a sequence (after ``Decoder.reset``), which starts without a trace and then fills
the buffer. Draft steps with deferred K/V are refused: which cache slot such a step writes is
host-side state a graph cannot follow.

Steps are captured as they are: pass compiled steps (``speculative=torch.compile(draft)``, and
``Decoder.sequential`` or ``Decoder.verify_steps`` replaced before the first generate()) to
capture compiled code.
``capture=False`` runs the same code eagerly (the CPU tests check the logic with it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from . import cuda_graph
from .errors import SNLPConfigError
from .models.kv import write_cache
from .solve.handle import SolveHandle

Outputs = tuple[torch.Tensor, ...]


def _captured(fn: Callable[[], Outputs], device: torch.device, capture: bool) -> Callable[[], Outputs]:
    """``fn`` itself, or (``capture``) the replay of its CUDA graph (``cuda_graph.capture``)."""
    return cuda_graph.capture(fn, device) if capture else fn


def _variants(warm: bool) -> list[bool]:
    """The ``fresh`` flags a draft's graphs are captured for: from h0 first (it fills the trace
    buffer), then from the trace; one variant without a warm start."""
    return [True, False] if warm else [False]


class _Trace:
    """The warm-start trace a draft's graphs share (None where the draft has no warm start)."""

    def __init__(self, step: Any, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.handle = SolveHandle.of(step)
        if self.handle is not None and self.handle.deferred:
            raise SNLPConfigError(
                "cuda_graphs=True does not capture draft steps with deferred_kv: which slot such a "
                "step writes is host-side state; draft without deferred_kv or without graphs"
            )
        self.buffer: torch.Tensor | None = None
        if self.handle is not None and self.handle.init == "warm":
            batch = k_cache.shape[1]
            self.handle.reset()
            idx = torch.zeros(batch, 1, dtype=torch.long, device=k_cache.device)
            with torch.no_grad():
                step(idx, torch.zeros((), dtype=torch.long, device=k_cache.device), k_cache, v_cache)
            self.buffer = self.handle.trace  # (a copy: memory of its own, outside any graph pool)
            self.handle.reset()

    @property
    def fresh(self) -> bool:
        """Whether the next draft starts a sequence (no trace: the h0 variant)."""
        return self.buffer is not None and self.handle is not None and not self.handle.has_trace

    def begin(self, fresh: bool) -> None:
        """Before a draft step: from h0 (no trace), or from the buffer (a trace held elsewhere,
        e.g. another decoder's buffer, is copied into it first)."""
        if self.buffer is None or self.handle is None:
            return
        if fresh:
            self.handle.reset()
            return
        current = self.handle.solve.warm_trace
        if current is not None and current is not self.buffer:
            self.buffer.copy_(current)
        self.handle.attach_trace(self.buffer)

    def end(self, fresh: bool) -> None:
        """After a draft step from h0: the trace it made into the buffer (in a capture or an
        eager call; a replay wrote the buffer itself), which becomes the trace."""
        if self.buffer is None or self.handle is None or not fresh:
            return
        current = self.handle.solve.warm_trace
        if current is not None and current is not self.buffer:
            self.buffer.copy_(current)
        self.handle.attach_trace(self.buffer)


class GraphedStep:
    """A step (idx, pos, k_cache, v_cache) -> (logits, new_k, new_v) replayed for one idx shape on
    one pair of caches, writing its K/V into them (``writes_cache``). The returned tensors are
    static: the next call overwrites them."""

    writes_cache = True

    def __init__(
        self, step: Any, idx_shape: tuple[int, int], k_cache: torch.Tensor, v_cache: torch.Tensor,
        trace: _Trace | None = None, capture: bool = True,
    ) -> None:  # fmt: skip
        self.step, self.trace = step, trace
        self._orig_mod = getattr(step, "_orig_mod", step)  # (SolveHandle.of(self) finds the solve)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.idx = torch.zeros(idx_shape, dtype=torch.long, device=k_cache.device)
        self.pos = torch.zeros((), dtype=torch.long, device=k_cache.device)
        warm = trace is not None and trace.buffer is not None
        with torch.no_grad():
            self.runs = {
                f: _captured(partial(self._run, f), k_cache.device, capture) for f in _variants(warm)
            }
        if trace is not None and trace.handle is not None:
            trace.handle.reset()

    def _run(self, fresh: bool) -> Outputs:
        if self.trace is not None:
            self.trace.begin(fresh)
        logits, new_k, new_v = self.step(self.idx, self.pos, self.k_cache, self.v_cache)
        write_cache(self.k_cache, self.v_cache, new_k, new_v, self.pos)
        if self.trace is not None:
            self.trace.end(fresh)
        return logits, new_k, new_v

    def __call__(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> Outputs:
        if k_cache is not self.k_cache or v_cache is not self.v_cache or idx.shape != self.idx.shape:
            raise ValueError(
                f"a GraphedStep replays idx {tuple(self.idx.shape)} on the caches it was captured with; "
                f"got idx {tuple(idx.shape)}{'' if k_cache is self.k_cache else ' and other caches'}"
            )
        fresh = self.trace is not None and self.trace.fresh
        if self.trace is not None:
            self.trace.begin(fresh)  # (outside the graph: which buffer is the trace)
        self.idx.copy_(idx)
        self.pos.copy_(pos)
        out = self.runs[fresh]()
        if self.trace is not None:
            self.trace.end(fresh)
        return out


class DraftBlock:
    """``g`` greedy draft steps from a token at a position, in one replay: returns (drafts (B, g),
    traces (g, ...) or None), static buffers; traces[i] is the warm-start trace after step i."""

    def __init__(
        self,
        step: Any,
        g: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        trace: _Trace,
        capture: bool = True,
    ) -> None:
        device, batch = k_cache.device, k_cache.shape[1]
        self.step, self.g, self.trace = step, g, trace
        self.k_cache, self.v_cache = k_cache, v_cache
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.drafts = torch.zeros(batch, g, dtype=torch.long, device=device)
        buf = trace.buffer
        self.traces = None if buf is None else torch.zeros((g, *buf.shape), dtype=buf.dtype, device=device)
        warm = buf is not None
        with torch.no_grad():
            self.runs = {f: _captured(partial(self._run, f), device, capture) for f in _variants(warm)}
        if trace.handle is not None:
            trace.handle.reset()

    def _run(self, fresh: bool) -> Outputs:
        current = self.idx
        for i in range(self.g):
            first = fresh and i == 0
            self.trace.begin(first)
            pos = self.pos + i
            logits, new_k, new_v = self.step(current, pos, self.k_cache, self.v_cache)
            write_cache(self.k_cache, self.v_cache, new_k, new_v, pos)
            self.trace.end(first)
            if self.traces is not None:
                assert self.trace.buffer is not None
                self.traces[i].copy_(self.trace.buffer)
            token = logits[:, -1].argmax(dim=-1)
            self.drafts[:, i].copy_(token)
            current = token[:, None]
        return (self.drafts,) if self.traces is None else (self.drafts, self.traces)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        fresh = self.trace.fresh
        self.trace.begin(fresh)
        self.idx.copy_(token[:, None])
        self.pos.copy_(pos)
        self.runs[fresh]()
        self.trace.end(fresh)
        return self.drafts, self.traces


class GraphedSteps:
    """A speculative decoder's graphs (module docstring): ``blocks[g]`` and ``verify[g]`` for each g
    in ``blocks``, ``draft`` and ``single``; ``verify_step(t)`` gives the exact step on t tokens
    (``Decoder.verify_step``)."""

    def __init__(
        self, draft_step: Any, verify_step: Callable[[int], Any], blocks: list[int],
        k_cache: torch.Tensor, v_cache: torch.Tensor, capture: bool = True,
    ) -> None:  # fmt: skip
        if capture and k_cache.device.type != "cuda":
            raise SNLPConfigError(f"cuda_graphs=True needs the model on a CUDA device, not {k_cache.device}")
        batch = k_cache.shape[1]
        trace = _Trace(draft_step, k_cache, v_cache)
        self.trace = trace
        self.blocks = {g: DraftBlock(draft_step, g, k_cache, v_cache, trace, capture) for g in blocks}
        self.draft = GraphedStep(draft_step, (batch, 1), k_cache, v_cache, trace, capture)
        self.verify = {
            g: GraphedStep(verify_step(g + 1), (batch, g + 1), k_cache, v_cache, None, capture)
            for g in blocks
        }
        self.single = GraphedStep(verify_step(1), (batch, 1), k_cache, v_cache, None, capture)
        k_cache.zero_()
        v_cache.zero_()
