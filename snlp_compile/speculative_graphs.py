"""CUDA graphs of speculative decoding's steps (``Decoder(..., cuda_graphs=True)``, CUDA only).

Three graphs per decoder, captured at its first speculative generate(): the draft step (one
token), the verifier on a whole block (γ + 1 tokens) and the verifier on one token (the rounds
near the end, where fewer than γ + 1 tokens are left, finish with it one token at a time, which is
the sequential decode). With an adaptive block size, one verifier graph per size 1 .. γ. Each graph includes its cache
write, so a round launches γ + 1 replays, the acceptance rule and one host synchronisation (how
many tokens were accepted).

Warm init: the draft has two graphs, from h0 (the first draft of a sequence, after
``Decoder.reset``) and from the warm-start trace; both read and write one trace buffer, which stays
the solve's trace (``SolveHandle.attach_trace``) so that rewinding it after a rejection
(``restore_trace``) copies into the memory the graphs read. Draft steps with deferred K/V are
refused: which cache slot such a step writes is host-side state a graph cannot follow.

Steps are captured as they are: pass compiled steps (``speculative=torch.compile(draft)``, and
``Decoder.sequential`` replaced before the first generate()) to capture compiled code.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import SNLPConfigError
from .models.kv import write_cache
from .solve.handle import SolveHandle

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class GraphedStep:
    """A step (idx, pos, k_cache, v_cache) -> (logits, new_k, new_v) replayed from CUDA graphs, for
    one idx shape and one pair of caches; the replay also writes the new K/V into the caches
    (``writes_cache``). The returned tensors are static: the next call overwrites them."""

    writes_cache = True

    def __init__(
        self,
        step: Any,
        idx_shape: tuple[int, int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        warmup: int = 3,
    ) -> None:
        device = k_cache.device
        if device.type != "cuda":
            raise SNLPConfigError(f"cuda_graphs=True needs the model on a CUDA device, not {device}")
        self.step = step
        self.handle = SolveHandle.of(step)
        if self.handle is not None and self.handle.deferred:
            raise SNLPConfigError(
                "cuda_graphs=True does not capture draft steps with deferred_kv: which slot such a "
                "step writes is host-side state; draft without deferred_kv or without graphs"
            )
        self._orig_mod = getattr(step, "_orig_mod", step)  # (SolveHandle.of(self) finds the solve)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.idx = torch.zeros(idx_shape, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.warm = self.handle is not None and self.handle.init == "warm"
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, Outputs]] = {}
        self.trace_buffer: torch.Tensor | None = None
        with torch.no_grad():
            self.graphs[False] = self._capture(fresh=self.warm, warmup=warmup)
            if self.warm:
                assert self.handle is not None
                self.trace_buffer = self.handle.solve.warm_trace  # (allocated by the capture)
                assert self.trace_buffer is not None
                self.graphs[True] = self._capture(fresh=False, warmup=warmup)
                self.handle.reset()

    def _run(self, fresh: bool) -> Outputs:
        if fresh:
            assert self.handle is not None
            self.handle.reset()  # (the h0 path: no trace)
        logits, new_k, new_v = self.step(self.idx, self.pos, self.k_cache, self.v_cache)
        write_cache(self.k_cache, self.v_cache, new_k, new_v, self.pos)
        return logits, new_k, new_v

    def _capture(self, fresh: bool, warmup: int) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        """Warm-up calls on a side stream (compiles, cuBLAS handles, lazy allocations), then the
        capture; the caches hold garbage afterwards (``GraphedSteps`` clears them)."""
        device = self.k_cache.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._run(fresh)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(fresh)
        return graph, out

    def __call__(
        self, idx: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> Outputs:
        if k_cache is not self.k_cache or v_cache is not self.v_cache or idx.shape != self.idx.shape:
            raise ValueError(
                f"a GraphedStep replays idx {tuple(self.idx.shape)} on the caches it was captured with; "
                f"got idx {tuple(idx.shape)}{'' if k_cache is self.k_cache else ' and other caches'}"
            )
        fresh = self.warm and self.handle is not None and not self.handle.has_trace
        graph, out = self.graphs[self.warm and not fresh]
        self.idx.copy_(idx)
        self.pos.copy_(pos)
        graph.replay()
        if fresh:
            assert self.handle is not None and self.trace_buffer is not None
            self.handle.attach_trace(self.trace_buffer)  # (the h0 graph wrote it)
        return out


class GraphedSteps:
    """A speculative decoder's graphs (module docstring), captured on its caches, which are
    cleared afterwards: ``verify[g]`` verifies g drafts (g + 1 tokens), for each g in ``blocks``
    (the block size; with an adaptive block size every size up to it)."""

    def __init__(
        self,
        draft_step: Any,
        sequential: Any,
        blocks: list[int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ):
        batch = k_cache.shape[1]
        self.draft = GraphedStep(draft_step, (batch, 1), k_cache, v_cache)
        self.verify = {g: GraphedStep(sequential, (batch, g + 1), k_cache, v_cache) for g in blocks}
        self.single = GraphedStep(sequential, (batch, 1), k_cache, v_cache)
        k_cache.zero_()
        v_cache.zero_()
